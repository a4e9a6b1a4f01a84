"""``kalm-st quickstart``: a shortcut for ``kalm-st run training/recipes/quickstart.yaml`` (the whole KaLM recipe,
offline, on CPU, on data bundled in the repository)."""

from __future__ import annotations

import argparse
from pathlib import Path

QUICKSTART_RECIPE = Path("training/recipes/quickstart.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run training/recipes/quickstart.yaml (SmolLM2-135M, bundled data, 11-17 min on 2 CPU cores) -> kalm-v2/",
        description="Run from the root of a kalm-st clone. The same as `kalm-st run training/recipes/quickstart.yaml`: "
        "stage 1 (in-batch InfoNCE), filtering + mining + labelling with the stage-1 model, teacher scores, stage 2 "
        "(focal + mixing + Matryoshka), stage 3 (distillation) and a soup, with held-out scores before and after. "
        "Work files go to outputs/quickstart/; a second run skips finished steps.",
    )
    parser.add_argument("--output", default="kalm-v2", help="final model folder (default: kalm-v2)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STEP.KEY=VALUE",
        help="override a step of the recipe, e.g. --set stage1.set.args.max_steps=4",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kalm_st.cli.run import run as run_recipe_command

    if not QUICKSTART_RECIPE.is_file():
        raise FileNotFoundError(
            f"The quickstart runs from the root of a kalm-st clone (it needs {QUICKSTART_RECIPE} and data/)."
        )
    recipe_args = argparse.Namespace(
        recipe=str(QUICKSTART_RECIPE),
        overrides=[f"soup.output={args.output}", *args.overrides],
        dry_run=False,
        start=None,
        only=None,
    )
    return run_recipe_command(recipe_args)
