"""``kalm-st run RECIPE.yaml``: the whole pipeline from a recipe file (:mod:`kalm_st.recipe.runner`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (training/recipes/*.yaml)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every step, the step graph and the local sources; report every problem; run nothing",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--from",
        dest="start",
        metavar="STEP",
        help="run this step even when it is up to date, then the later steps that are not",
    )
    which.add_argument(
        "--only", metavar="STEP", help="run only this step, even when it is up to date (its inputs must exist)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STEP.KEY=VALUE",
        help="override a step's setting (--set stage1.set.args.max_steps=4) or output_dir / seed (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from kalm_st.recipe.recipe import RecipeError, load_recipe
    from kalm_st.recipe.runner import run_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        report = run_recipe(recipe, dry_run=args.dry_run, start=args.start, only=args.only)
    except RecipeError as error:
        print(f"kalm-st run: {error}", file=sys.stderr)  # noqa: T201
        return 2
    for name, status in report.status.items():
        seconds = report.seconds.get(name)
        print(f"{name}\t{status}" + (f"\t{seconds:.1f} s" if seconds is not None else ""))  # noqa: T201
    if not args.dry_run:
        table = scores_table(recipe)
        if table:
            print(table)  # noqa: T201
    if args.dry_run and report.unchecked:
        print("not checked offline (remote):", file=sys.stderr)  # noqa: T201
        for item in report.unchecked:
            print(f"  {item}", file=sys.stderr)  # noqa: T201
    return 0


def scores_table(recipe) -> str:  # noqa: ANN001 - a kalm_st.recipe.recipe.Recipe
    """The main scores (x100) of every eval step, side by side (e.g. before / after training)."""
    from pathlib import Path

    from kalm_st.recipe.steps import read_scores

    columns = {s.name: read_scores(Path(recipe.output_dir) / s.name) for s in recipe.steps if s.kind == "eval"}
    columns = {name: scores for name, scores in columns.items() if scores}
    if not columns:
        return ""
    tasks = list(dict.fromkeys(task for scores in columns.values() for task in scores))
    width = max(len(t) for t in tasks) + 2
    lines = ["scores".ljust(width) + "".join(f"{name:>12}" for name in columns)]
    for task in tasks:
        cells = "".join(f"{columns[name][task]:12.2f}" if task in columns[name] else f"{'-':>12}" for name in columns)
        lines.append(task.ljust(width) + cells)
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run a recipe: every step in order, skipping finished ones")
    add_arguments(parser)
    parser.set_defaults(func=run)
