"""Recipe files: the whole pipeline as an ordered list of named steps, validated into frozen dataclasses.

A recipe reads top to bottom like the paper's pipeline (STYLE.md §2 "Recipes and runners"): each step names its kind,
its inputs (data sources, model folders, or ``@step`` for the output of an earlier step) and its settings; its output
goes to ``{output_dir}/{name}/`` (or ``output:``). Paths are relative to the working directory, as in stage files
(run from the clone's root). No logic, no interpolation beyond ``@step`` references, no recipes
inheriting from recipes. :mod:`kalm_st.recipe.runner` runs it; ``kalm-st run RECIPE.yaml`` is the command.

Example::

    output_dir: outputs/my-run
    steps:
      - name: stage1
        kind: train
        config: training/configs/stage1_pretrain.yaml  # a stage file
      - name: mine
        kind: mine
        model: "@stage1"                              # the final model of step stage1
        data: corpora/finetune.jsonl
        task_types: {my_qa: Retrieval}
      - name: stage2
        kind: train
        config: training/configs/stage2_finetune.yaml
        set:                                          # merged into the stage file
          model: {init_from: "@stage1"}
          data: {tasks: {my_qa: {path: "@mine"}}}

Step kinds and their keys are the dataclasses below, each declared once by :func:`step_kind` (read by the parser, the
runner, the dry run and the CLI); unknown keys, wrong types and bad references are
:class:`~kalm_st.recipe.config.ConfigError`\\ s naming the step, the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kalm_st.recipe import steps as runners
from kalm_st.recipe.config import ConfigError, SourceConfig, TaskType, _build, apply_overrides, parse_yaml
from kalm_st.recipe.steps import DATA_FILE

REFERENCE_PREFIX = "@"
"""``"@stage1"`` in a step's value is the output of the earlier step ``stage1``."""

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class StepKind:
    """A step kind, declared once on its settings dataclass by :func:`step_kind`."""

    name: str
    settings: type
    run: Callable[[Any], dict[str, Any]]
    """A :class:`~kalm_st.recipe.steps.StepContext` -> the manifest's summary (heavy imports inside it)."""
    inputs: tuple[str, ...] = ()
    """Keys naming data it reads (files, globs, folders, ``sources``, ``@step``): fingerprinted, dry-run checked."""
    models: tuple[str, ...] = ()
    """Keys naming models it loads (a folder, a Hub id, ``builtin:``, ``@step``)."""
    output: str | None = None
    """Its output in the step's folder (``final``, ``data.parquet``); None: none."""
    plan: Callable[[Any, Any, Step, Path], tuple[list[tuple[str, bool]], dict[str, Any]]] | None = None
    """Instead of ``inputs`` / ``models``, for settings naming a config of their own (train: a stage file):
    (settings, settings to fingerprint, step, step folder) -> (inputs, config to fingerprint)."""
    every_rank: bool = False
    """Runs on every process of a launcher (training); other kinds on rank 0 while the others wait."""

    def inputs_of(self, settings: Any) -> list[tuple[str, bool]]:
        """The paths and model ids ``settings`` (references resolved) reads, each with whether it is a model."""
        found: list[tuple[str, bool]] = []
        for key in (*self.models, *self.inputs):
            value = getattr(settings, key)
            values = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
            found += [(v.path if isinstance(v, SourceConfig) else v, key in self.models) for v in values]
        return found


STEP_KINDS: dict[str, StepKind] = {}
"""Step kind name -> its declaration (the one table; filled by :func:`step_kind`)."""


def step_kind(name: str, run: Callable[[Any], dict[str, Any]], **declaration: Any) -> Callable[[type], type]:
    """Class decorator declaring a settings dataclass as the step kind ``name`` run by ``run``; ``declaration``: the
    other fields of :class:`StepKind`. The class gets the declaration as ``step_kind``."""

    def declare(settings: type) -> type:
        if name in STEP_KINDS:
            raise ValueError(f"step kind {name!r} is declared twice ({STEP_KINDS[name].settings.__name__}).")
        settings.step_kind = STEP_KINDS[name] = StepKind(name, settings, run, **declaration)
        return settings

    return declare


@step_kind("train", runners.run_train, output="final", plan=runners.plan_train, every_rank=True)
@dataclass(frozen=True)
class TrainStep:
    """Train one stage (:func:`kalm_st.recipe.build.run_stage`); output: the stage's ``final/`` model.

    Args:
        config: The stage YAML.
        set: Nested mapping merged into the stage config (``{model: {init_from: "@stage1"}}``; ``null`` deletes a
            key, as in a JSON merge patch); the stage's ``output_dir`` is always the step's folder.
    """

    config: str
    set: dict[str, Any] = field(default_factory=dict)


@step_kind("mine", runners.run_mine, models=("model",), inputs=("data", "sources", "corpus"), output=DATA_FILE)
@dataclass(frozen=True)
class MineStep:
    """Hard-negative mining with a model (:func:`kalm_st.data.mine_hard_negatives`); output: a training file.

    KaLM's settings [read]: ranks 50-100 of the previous stage's retrieval, 7 negatives, sampled at random.
    ``data`` names training files or earlier steps; ``sources`` reads folders, globs and Hub datasets exactly as a
    stage's ``data.sources`` does (the paper's KaLM / FlagEmbedding layouts). Embeddings are cached per model and
    prompt under ``{output_dir}/embeddings`` (shared with other steps, resumed after a kill); ``faiss``: None uses it
    when installed.
    """

    model: str
    data: tuple[str, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    corpus: str | None = None
    task_types: dict[str, TaskType] = field(default_factory=dict)
    range_min: int = 50
    range_max: int = 100
    num_negatives: int = 7
    sampling: Literal["random", "top"] = "random"
    scores: bool = False
    batch_size: int = 32
    instructions: bool = True
    faiss: bool | None = None
    chunk_size: int = 8192
    seed: int = 0


@step_kind("filter", runners.run_filter, models=("model",), inputs=("data", "sources", "corpus"), output=DATA_FILE)
@dataclass(frozen=True)
class FilterStep:
    """Ranking-consistency filtering (:func:`kalm_st.data.filter_by_rank`): drop rows whose positive is not in the
    model's top ``top_k``; output: a training file. ``data``, ``sources``, ``faiss`` and the embedding cache as in
    :class:`MineStep`."""

    model: str
    data: tuple[str, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    corpus: str | None = None
    task_types: dict[str, TaskType] = field(default_factory=dict)
    top_k: int = 50
    batch_size: int = 32
    instructions: bool = True
    faiss: bool | None = None
    chunk_size: int = 8192


@step_kind("label", runners.run_label, inputs=("data",), output=DATA_FILE)
@dataclass(frozen=True)
class LabelStep:
    """Example-based multi-class labelling (:func:`kalm_st.data.label_examples`) of a labelled table (``data``: files,
    globs or folders of shards, read as one table); output: a training file of task ``task`` (train it as a
    ``Classification`` task)."""

    data: tuple[str, ...]
    task: str
    text_column: str = "text"
    label_column: str = "label"
    num_negatives: int = 7
    seed: int = 0


@step_kind(
    "teacher-score", runners.run_teacher_score, models=("teacher",), inputs=("data", "sources"), output=DATA_FILE
)
@dataclass(frozen=True)
class TeacherScoreStep:
    """Teacher scores of each row's positive and negatives (:func:`kalm_st.data.score_with_teacher`) into ``label``;
    output: a training file. ``teacher`` is an embedding model (a sentence-transformers folder or Hub id with its own
    prompts and pooling, e.g. Qwen/Qwen3-Embedding-8B), or a reranker with ``cross_encoder: true``; ``dtype: auto``
    loads a Hub teacher in bfloat16 on a GPU, float32 on CPU. Embeddings are cached per chunk (resumable)."""

    teacher: str
    data: tuple[str, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    cross_encoder: bool = False
    task_types: dict[str, TaskType] = field(default_factory=dict)
    batch_size: int = 32
    instructions: bool = True
    teacher_id: str | None = None
    chunk_size: int = 8192
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    flag_embedding: bool = False
    """Also write FlagEmbedding jsonl (``query, pos, neg, pos_scores, neg_scores``), one file per task, under
    ``{step_dir}/flag_embedding/``."""


@step_kind(
    "teacher-embed", runners.run_teacher_embed, models=("teacher",), inputs=("data", "sources"), output=DATA_FILE
)
@dataclass(frozen=True)
class TeacherEmbedStep:
    """Teacher embeddings of every text of each row (:func:`kalm_st.data.teacher_embeddings.embed_training_data`)
    into ``label``, ``(2 + n, d)`` per row: what :class:`~kalm_st.losses.EmbeddingDistillation` and in-batch
    :class:`~kalm_st.losses.ContrastiveDistillation` read; output: a training file. The texts are embedded as they
    are (no student prompts); the cache (``{step_dir}/cache``) is keyed by text and teacher, memory-mapped and
    resumable. ``teacher`` and ``dtype`` as for ``teacher-score``."""

    teacher: str
    data: tuple[str, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    batch_size: int = 32
    chunk_size: int = 1024
    teacher_id: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    task_types: dict[str, TaskType] = field(default_factory=dict)
    instructions: bool = True
    """How the input files' ``instruction`` column is read (as for the other curation steps)."""


@step_kind("soup", runners.run_soup, models=("models",), output="final")
@dataclass(frozen=True)
class SoupStep:
    """Parameter average of models (:func:`kalm_st.recipe.soup.soup`); output: the souped model."""

    models: tuple[str, ...]
    weights: tuple[float, ...] | None = None


@step_kind("eval", runners.run_eval, models=("model",), inputs=("data_dir",), output="results")
@dataclass(frozen=True)
class EvalStep:
    """MTEB evaluation with the KaLM instructions (:func:`kalm_st.evaluation.evaluate_model`); output: mteb's results
    folder and ``scores.json``."""

    model: str
    tasks: tuple[str, ...]
    data_dir: str | None = None
    batch_size: int = 32
    instructions: Literal["model", "kalm", "none"] = "model"
    max_seq_length: int | None = None


@step_kind("push", runners.run_push, models=("model",), inputs=("results",))
@dataclass(frozen=True)
class PushStep:
    """Model card + upload to the Hub (:func:`kalm_st.evaluation.hub.push_model`); needs the network and a token."""

    model: str
    repo_id: str
    private: bool = False
    results: str | None = None


_LIST_KEYS = ("data", "models", "tasks")  # a single value may be written without brackets


@dataclass(frozen=True)
class Step:
    """One named step: its kind, its settings, and where its output goes."""

    name: str
    kind: str
    settings: Any
    output: str | None = None
    """Explicit output path (e.g. the final ``kalm-v2`` folder); default ``{output_dir}/{name}/...``."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The step's mapping as written (after ``--set``), for manifests."""

    def output_path(self, step_dir: Path) -> Path | None:
        """Where the step writes: ``output:``, else its kind's output in ``step_dir`` (None: it writes nothing)."""
        if self.output is not None:
            return Path(self.output)
        output = STEP_KINDS[self.kind].output
        return step_dir / output if output is not None else None

    def references(self) -> list[str]:
        """Names of the earlier steps this step reads (every ``@name`` in its settings)."""
        return sorted({ref for ref in _references_in(dataclasses.asdict(self.settings))})


@dataclass(frozen=True)
class Recipe:
    """A validated recipe file."""

    output_dir: str
    steps: tuple[Step, ...]
    path: Path
    seed: int = 0
    description: str = ""
    keep_intermediate_models: bool = True
    """False: the runner removes a train step's model (``final/``, checkpoints) once every step that reads it is done,
    keeping its manifest, so a re-run still skips it (:mod:`kalm_st.recipe.runner`)."""

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


def _references_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value[len(REFERENCE_PREFIX) :]] if is_reference(value) else []
    if isinstance(value, Mapping):
        return [ref for v in value.values() for ref in _references_in(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _references_in(v)]
    return []


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(REFERENCE_PREFIX) and len(value) > 1


class RecipeError(ConfigError):
    """One or more problems with a recipe; ``problems`` lists each (file, step, key)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the recipe:\n" + "\n".join(f"- {p}" for p in problems))


_TOP_LEVEL = ("description", "output_dir", "seed", "keep_intermediate_models", "steps")


def _split_overrides(
    overrides: Sequence[str], names: Sequence[str], source: str
) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` items: top-level ones (``output_dir=runs/x``) and per step (``stage1.set.args.max_steps=4``)."""
    top: list[str] = []
    grouped: dict[str, list[str]] = {}
    for item in overrides:
        head, _, _ = item.partition("=")
        if head.strip() in ("output_dir", "seed", "keep_intermediate_models"):
            top.append(item)
            continue
        step, dot, rest = item.partition(".")
        if not dot or "=" not in rest or "=" in step:
            raise ConfigError(
                f"--set {item!r}: expected STEP.KEY.PATH=VALUE (e.g. stage1.set.args.max_steps=4), output_dir=... "
                "or seed=..."
            )
        if step not in names:
            raise ConfigError(f"--set {item!r}: no step named {step!r} in {source} (steps: {', '.join(names)}).")
        grouped.setdefault(step, []).append(rest)
    return top, grouped


def parse_step(raw: Any, index: int, source: str) -> Step:
    """Validate one entry of ``steps:``; raises :class:`ConfigError` naming ``steps[index]`` (and the step's name)."""
    where = f"steps[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping with name and kind, got {type(raw).__name__}.")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{source}: {where}.name must be a name of letters, digits, '_' or '-' (starting with a letter), "
            f"got {name!r}."
        )
    where = f"{where} ({name})"
    kind = raw.get("kind")
    if kind not in STEP_KINDS:
        raise ConfigError(f"{source}: {where}: unknown step kind {kind!r} (kinds: {', '.join(STEP_KINDS)}).")
    output = raw.get("output")
    if output is not None and not isinstance(output, str):
        raise ConfigError(f"{source}: {where}.output must be a path, got {type(output).__name__}.")
    values = {k: v for k, v in raw.items() if k not in ("name", "kind", "output")}
    for key in _LIST_KEYS:
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    settings = _build(STEP_KINDS[kind].settings, values, f"steps.{name}.", source)
    _check_values(settings, f"{source}: steps.{name}")
    return Step(name=name, kind=kind, settings=settings, output=output, raw=dict(raw))


def _check_values(settings: Any, where: str) -> None:
    """Value checks the types cannot express (counts >= 1, ranges in order), each naming the key."""
    if "sources" in settings.step_kind.inputs and not (getattr(settings, "data", ()) or settings.sources):
        raise ConfigError(f"{where}: needs data (files or @steps) or sources (folders, globs, hf:// datasets).")
    for key in ("batch_size", "num_negatives", "top_k", "range_max", "chunk_size"):
        value = getattr(settings, key, None)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key} must be >= 1, got {value}.")
    if isinstance(settings, MineStep) and not 0 <= settings.range_min < settings.range_max:
        raise ConfigError(
            f"{where}: range_min must be >= 0 and below range_max, got {settings.range_min} and {settings.range_max}."
        )
    if isinstance(settings, SoupStep):
        from kalm_st.recipe.soup import soup_weights

        try:
            soup_weights(len(settings.models), settings.weights)
        except ValueError as error:
            raise ConfigError(f"{where}.{error}") from error


def recipe_from_dict(data: Any, path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """Validate a parsed recipe (with ``--set STEP.key=value`` overrides applied to the steps first)."""
    source = str(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a recipe must be a mapping with output_dir and steps.")
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} (allowed: {', '.join(_TOP_LEVEL)}).")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{source}: steps must be a non-empty list of steps.")
    names = [s.get("name") if isinstance(s, Mapping) else None for s in raw_steps]
    top, grouped = _split_overrides(overrides, [n for n in names if isinstance(n, str)], source)
    if top:
        data = apply_overrides({k: v for k, v in data.items() if k != "steps"}, top, source) | {"steps": raw_steps}
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"
    if "output_dir" not in data:
        raise ConfigError(f"{source}: missing required key output_dir.")
    if not isinstance(data["output_dir"], str):
        raise ConfigError(f"{source}: output_dir must be a path, got {type(data['output_dir']).__name__}.")
    steps, problems = [], []
    for index, raw in enumerate(raw_steps):  # every step's problems at once
        try:
            if isinstance(raw, Mapping) and raw.get("name") in grouped:
                raw = apply_overrides(raw, grouped[raw["name"]], source)
            steps.append(parse_step(raw, index, source))
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise RecipeError(problems)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{source}: seed must be int, got {seed!r}.")
    keep = data.get("keep_intermediate_models", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"{source}: keep_intermediate_models must be true or false, got {keep!r}.")
    return Recipe(
        output_dir=data["output_dir"],
        steps=tuple(steps),
        path=path,
        seed=seed,
        description=str(data.get("description", "")),
        keep_intermediate_models=keep,
    )


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe YAML (the step graph is checked by :func:`kalm_st.recipe.runner.check_recipe`)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Recipe file {os.fspath(path)!r} does not exist.")
    return recipe_from_dict(parse_yaml(file.read_text(encoding="utf8"), str(file)), file, overrides)


__all__ = [
    "REFERENCE_PREFIX",
    "STEP_KINDS",
    "EvalStep",
    "FilterStep",
    "LabelStep",
    "MineStep",
    "PushStep",
    "Recipe",
    "RecipeError",
    "SoupStep",
    "Step",
    "StepKind",
    "TeacherEmbedStep",
    "TeacherScoreStep",
    "TrainStep",
    "is_reference",
    "load_recipe",
    "parse_step",
    "recipe_from_dict",
    "step_kind",
]
