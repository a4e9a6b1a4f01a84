"""Data of the ablation: the training data (built once) and the (sub)sampled evaluation data folders."""

from __future__ import annotations

import csv
import logging
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .assets import load_teacher
from .config import CommonConfig, EvalSubsample

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger("ablation")


# ----------------------------------------------------------------------------------------------------------------
# Training data (built once, shared by every arm and seed; teacher scores cached by score_with_teacher).


def _source_dir(task: str) -> Path:
    from kalm_st.evaluation.tasks import find_task_data

    return find_task_data(task)


def build_training_data(
    common: CommonConfig, work_dir: Path, cache_dir: Path, teacher_labels: Literal["scores", "embeddings"] = "scores"
) -> DatasetDict:
    """``DatasetDict`` of the three training tasks with ``anchor, positive, negative_1..n, label``.

    ``label`` holds the teacher's scores of ``[positive, negative_1..n]`` (``teacher_labels="scores"``, cached by
    ``score_with_teacher`` under ``cache_dir``) or its embeddings ``(2 + n, 768)`` of ``[anchor, positive,
    negative_1..n]`` (``"embeddings"``, the ``kalm-st teacher-embed`` cache under ``work_dir/data``).
    """
    if teacher_labels not in ("scores", "embeddings"):
        raise ValueError(f"teacher_labels must be 'scores' or 'embeddings', got {teacher_labels!r}")
    from datasets import Dataset, DatasetDict, load_from_disk

    target = work_dir / "data" / "train"
    if (target / "dataset_dict.json").is_file():
        cached = load_from_disk(str(target))
        kinds = {task: _label_kind(ds) for task, ds in cached.items()}
        if set(kinds.values()) != {teacher_labels}:
            raise ValueError(
                f"{target} holds training data with teacher {kinds} labels, not {teacher_labels}: use another "
                "--work-dir or delete that folder."
            )
        return cached
    from sentence_transformers import SentenceTransformer

    from kalm_st.data import label_examples, mine_hard_negatives, score_with_teacher
    from kalm_st.testing import minilm_dir

    n_neg = common.num_negatives
    rng = random.Random(common.data_seed)

    # STS-B train: score >= 4 pairs; hard negatives mined with the starting MiniLM among the pairs' positives.
    with (_source_dir("STSBenchmark") / "train.csv").open(encoding="utf8", newline="") as handle:
        rows = list(csv.reader(handle))
    pairs = [(a, b) for a, b, score in rows if float(score) >= common.stsb_min_score]
    pairs = rng.sample(pairs, min(common.stsb_pairs, len(pairs)))
    miner = SentenceTransformer(str(minilm_dir()))
    stsb = mine_hard_negatives(
        Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [b for _, b in pairs]}),
        miner,
        range_min=common.mining_range[0],
        range_max=common.mining_range[1],
        num_negatives=n_neg,
        seed=common.data_seed,
    )
    logger.info("STS-B: %d positive pairs, %d with %d mined negatives", len(pairs), len(stsb), n_neg)

    # TrecQA train: each correct answer is a positive; the retriever's wrong answers (label 0) are hard negatives.
    with (_source_dir("TrecQAReranking") / "train.csv").open(encoding="utf8", newline="") as handle:
        trec_rows = list(csv.DictReader(handle))
    by_question: dict[str, dict[int, list[str]]] = defaultdict(lambda: {0: [], 1: []})
    for row in trec_rows:
        by_question[row["qtext"]][int(row["label"])].append(row["atext"])
    trec: dict[str, list[str]] = {"anchor": [], "positive": [], **{f"negative_{k + 1}": [] for k in range(n_neg)}}
    for question, answers in by_question.items():
        wrong = sorted(set(answers[0]))
        if len(wrong) < n_neg:
            continue
        for positive in answers[1]:
            trec["anchor"].append(question)
            trec["positive"].append(positive)
            for k, negative in enumerate(rng.sample(wrong, n_neg)):
                trec[f"negative_{k + 1}"].append(negative)
    trecqa = Dataset.from_dict(trec)
    if common.trecqa_rows is not None and common.trecqa_rows < len(trecqa):
        trecqa = trecqa.select(sorted(rng.sample(range(len(trecqa)), common.trecqa_rows)))

    # Banking77 train: example-based labelling (positive = another text of the intent, negatives = other intents).
    with (_source_dir("Banking77Classification") / "train.csv").open(encoding="utf8", newline="") as handle:
        bank_rows = list(csv.DictReader(handle))
    bank_rows = rng.sample(bank_rows, min(common.banking77_rows, len(bank_rows)))
    banking = label_examples(
        Dataset.from_dict({"text": [r["text"] for r in bank_rows], "label": [r["category"] for r in bank_rows]}),
        num_negatives=n_neg,
        seed=common.data_seed,
        show_progress_bar=False,
    )
    data = DatasetDict({"STSBenchmark": stsb, "TrecQA": trecqa, "Banking77Classification": banking})

    teacher = load_teacher(cache_dir)
    columns = ["anchor", "positive", *[f"negative_{k + 1}" for k in range(n_neg)]]
    if teacher_labels == "embeddings":  # teacher embeddings of every text, resumable (kalm-st teacher-embed's cache)
        from kalm_st.data.teacher_embeddings import attach_teacher_embeddings, embed_texts

        folder = work_dir / "data" / "teacher_embeddings"
        texts = [text for task in data for column in columns for text in data[task][column]]
        embed_texts(texts, teacher, folder, teacher_name="all-mpnet-base-v2", batch_size=64)
        for task in list(data):
            data[task] = attach_teacher_embeddings(data[task].select_columns(columns), folder, columns)
        target.parent.mkdir(parents=True, exist_ok=True)
        data.save_to_disk(str(target))
        return data
    # Teacher scores of [positive, negative_1..n] per row, cached on disk by score_with_teacher.
    for task in list(data):
        data[task] = score_with_teacher(
            data[task].select_columns(columns),
            teacher,
            cache_dir=cache_dir / "teacher_scores",
            teacher_id="all-mpnet-base-v2",
            batch_size=64,
            show_progress_bar=False,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    data.save_to_disk(str(target))
    return data


def _label_kind(dataset: Any) -> str:
    """``"embeddings"`` for a ``label`` of vectors per row, else ``"scores"``."""
    feature = dataset.features["label"]
    inner = getattr(feature, "feature", None)
    return "embeddings" if hasattr(inner, "feature") else "scores"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation data (subsampled copies of the offline task files, or the dev splits for --select).


def eval_data_dir(spec: EvalSubsample, work_dir: Path, tag: str, dev: bool = False) -> Path | None:
    """A data folder in the layout of ``shared/data`` holding the (sub)sampled evaluation files; None = the originals.

    With ``dev``, STS-B dev and TrecQA dev take the place of their test files (hyperparameter selection only).
    """
    if spec.is_full() and not dev:
        return None
    target = work_dir / "eval_data" / tag
    if (target / ".complete").is_file():
        return target
    rng_seed = 1234

    def sample(rows: list[Any], n: int | None) -> list[Any]:
        return rows if n is None or n >= len(rows) else random.Random(rng_seed).sample(rows, n)

    stsb_src, sick_src = _source_dir("STSBenchmark"), _source_dir("SICK-R")
    bank_src, trec_src = _source_dir("Banking77Classification"), _source_dir("TrecQAReranking")
    for folder in ("stsb", "sick", "banking77", "trecqa"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    split = "dev" if dev else "test"
    lines = (stsb_src / f"{split}.csv").read_text(encoding="utf8").splitlines(keepends=True)
    (target / "stsb" / "test.csv").write_text("".join(sample(lines, spec.stsb_pairs)), encoding="utf8")
    header, *body = (sick_src / "SICK.txt").read_text(encoding="utf8").splitlines(keepends=True)
    (target / "sick" / "SICK.txt").write_text(header + "".join(sample(body, spec.sick_pairs)), encoding="utf8")
    shutil.copy(bank_src / "train.csv", target / "banking77" / "train.csv")
    shutil.copy(bank_src / "categories.json", target / "banking77" / "categories.json")
    # records, not lines: some Banking77 texts hold a quoted newline, and a sampled line would cut the record
    with (bank_src / "test.csv").open(encoding="utf8", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, bank_rows = reader.fieldnames, list(reader)
    with (target / "banking77" / "test.csv").open("w", encoding="utf8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(sample(bank_rows, spec.banking77_test))
    with (trec_src / f"{split}.csv").open(encoding="utf8", newline="") as handle:
        trec_rows = list(csv.DictReader(handle))
    questions = sample(sorted({r["qtext"] for r in trec_rows}), spec.trecqa_questions)
    keep = set(questions)
    with (target / "trecqa" / "test.csv").open("w", encoding="utf8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["qtext", "label", "atext"])
        writer.writeheader()
        writer.writerows(r for r in trec_rows if r["qtext"] in keep)
    (target / ".complete").write_text("ok")
    return target
