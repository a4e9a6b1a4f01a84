"""``kalm-st eval``: run MTEB with the KaLM instructions (same as ``evaluation/run_mteb.py``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (or Hub id when online)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", nargs="+", help="MTEB task names, comma or space separated; 'local' = offline tasks")
    which.add_argument("--benchmark", help="an MTEB benchmark name, or 'local'")
    parser.add_argument(
        "--output",
        default="eval-results",
        help="results folder (mteb layout; default eval-results); several models may share it, a rerun of the same "
        "model skips its finished tasks",
    )
    parser.add_argument("--truncate-dim", type=int, default=None, help="Matryoshka dimension to evaluate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--data-dir", default=None, help="offline data folder (default: bundled data/, else ../shared/data)"
    )
    parser.add_argument(
        "--instructions",
        choices=("model", "kalm", "none"),
        default="model",
        help="prompts: the model's own (default), kalm-st's table, or none",
    )
    parser.add_argument("--model-name", default=None, help="org/name for the results folder")
    parser.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-report", action="store_true", help="skip report.md / scores.png")


def run(args: argparse.Namespace) -> int:
    from kalm_st.evaluation.report import write_report
    from kalm_st.evaluation.run import evaluate_model

    run_ = evaluate_model(
        args.model,
        args.tasks,
        benchmark=args.benchmark,
        output_dir=args.output,
        instructions=args.instructions,
        truncate_dim=args.truncate_dim,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        model_name=args.model_name,
        overwrite=args.overwrite,
        device=args.device,
    )
    for task, score in run_.scores.items():
        print(f"{task}\t{100 * score:.2f}")  # noqa: T201
    if run_.reused:
        print(  # noqa: T201
            f"reused from an earlier run of this same model (weights fingerprint {run_.fingerprint}): "
            f"{', '.join(run_.reused)}; --overwrite recomputes them",
            file=sys.stderr,
        )
    print(f"results: {run_.results_dir}", file=sys.stderr)  # noqa: T201
    if not args.no_report:
        files = write_report(args.output)
        print(f"report: {files['report']}", file=sys.stderr)  # noqa: T201
        if "chart" not in files:
            print("no charts: matplotlib is not installed (pip install 'kalm-st[plot]')", file=sys.stderr)  # noqa: T201
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model on MTEB tasks with KaLM instructions")
    add_arguments(parser)
    parser.set_defaults(func=run)
