"""Stage configs: one YAML file per training stage, validated into frozen dataclasses (STYLE.md §2 "Configs").

A stage file has the sections ``model:``, ``data:``, ``loss:``, ``matryoshka:`` and ``args:`` (pre-training,
fine-tuning, distillation; a model soup is a recipe step, :mod:`kalm_st.recipe.recipe`). ``args:`` is passed as
``SentenceTransformerTrainingArguments(**args)``; its keys and simple types are checked here, against that class's own
fields, so a typo fails before any model is loaded. Stages chain by explicit paths (``model.init_from:
outputs/stage1/final``): no interpolation, no Hydra, no ``exec``.

Every error names the offending key and the file it came from (or ``--set`` for a command-line override).

Example::

    config = load_config("training/configs/stage2_finetune.yaml", overrides=["loss.kwargs.gamma=2"])
    config.loss.kwargs["gamma"]  # 2
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

StageKind = Literal["pretrain", "finetune", "distill"]

LossName = Literal[
    "focal_infonce",
    "cached_focal_infonce",
    "contrastive_distillation",
    "embedding_distillation",
    "multiple_negatives_ranking",
    "cached_multiple_negatives_ranking",
]
"""The keys of :data:`kalm_st.recipe.build.LOSSES` (a test keeps the two equal): checked when the file is read."""

FINAL_MODEL_DIRNAME = "final"
"""The trained model of a stage is written (atomically) to ``{output_dir}/final``."""
RESOLVED_CONFIG_NAME = "resolved_config.yaml"
"""The fully resolved config (file + overrides) is saved as ``{output_dir}/resolved_config.yaml``."""
TRAINING_DATA_NAME = "training_data.yaml"
"""Next to the resolved config: each task's source, type, rows trained on and instructions (for the model card)."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


# ----------------------------------------------------------------------------------------------------------------------
# YAML: PyYAML's safe loader with YAML 1.2 scalars: floats without a dot (``1e-5``, a string in YAML 1.1) and only
# true/false as booleans (YAML 1.1 turns ``no``, e.g. ``save_strategy: no``, into False).
# ----------------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML safely (no Python tags); ``1e-5`` is a float as in YAML 1.2."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from error


# ----------------------------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the backbone (through ``peft``; :mod:`kalm_st.lora`). Only the adapters train.

    Args:
        rank: The adapters' rank ``r``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        target_modules: Names of the backbone's linear layers that get adapters (Qwen2/Qwen3/Gemma3 attention and MLP
            projections by default).
        dropout: ``lora_dropout``.
        save: ``merged`` (default): the final model is the portable folder with the adapters merged into the weights;
            ``adapter``: the adapter alone (``final/adapter``) beside the merged model.
    """

    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.0
    save: Literal["merged", "adapter"] = "merged"


@dataclass(frozen=True)
class ShardingConfig:
    """How several processes share the model (:mod:`kalm_st.distributed.sharding`). Without this section: DDP.

    Args:
        strategy: ``ddp`` (every process holds the whole model; right for backbones up to ~1B) or ``fsdp2``
            (``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state split over the
            processes, each decoder layer gathered only while it computes).
        reshard_after_forward: FSDP2: free each layer's gathered weights after its forward (less memory, one more
            all-gather in the backward).
        mixed_precision: FSDP2: ``auto`` (bf16 compute with fp32 gradient reduction on a GPU, none on a CPU),
            ``bf16`` or ``no``.
        activation_checkpointing: Recompute each decoder layer's activations in the backward (less memory, ~30% more
            compute).
    """

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    reshard_after_forward: bool = True
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Where the stage's model comes from.

    Args:
        init_from: A previous stage's output (``outputs/stage1/final``), a sentence-transformers folder, a decoder
            checkpoint (Hub id or folder, e.g. ``Qwen/Qwen2-0.5B``), or a built-in offline backbone
            (``builtin:tiny-qwen2``, ``builtin:smollm2-135m``; see :mod:`kalm_st.recipe.backbones`).
        max_seq_length: Truncation length (KaLM: 512).
        dtype: Weights dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        attn_implementation: transformers attention back-end (default: transformers' choice).
        lora: Train LoRA adapters instead of the full backbone (:class:`LoraConfig`; needs the ``lora`` extra).
    """

    init_from: str
    max_seq_length: int = 512
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    lora: LoraConfig | None = None


TaskType = Literal[
    "Retrieval",
    "Reranking",
    "STS",
    "PairClassification",
    "Classification",
    "MultilabelClassification",
    "Clustering",
]


@dataclass(frozen=True)
class TaskConfig:
    """One training task (one dataset of the ``DatasetDict``; every batch comes from one task).

    Args:
    The task's name (its key in ``data.tasks``) picks its instruction in :data:`kalm_st.TASK_INSTRUCTIONS` (e.g.
    ``STSBenchmark``, ``Banking77Classification``); unknown names fall back to the ``type``'s instruction.

    Args:
        path: A jsonl, csv or parquet file, a glob of shards (``corpus/train-*.parquet``), a folder of shards, a
            folder laid out as a Hub dataset repository, or a Hub dataset ``hf://datasets/ORG/NAME[/SUBFOLDER]``
            (:mod:`kalm_st.data.load`), in kalm-st's, KaLM / FlagEmbedding's or F2LLM's columns.
        type: The MTEB task type. ``Classification``, ``MultilabelClassification`` and ``Clustering`` data (example-
            based labels) train without in-batch negatives (METHOD.md §3) and put the instruction on every column.
        max_rows: Keep at most this many rows (the first ones), for smoke runs.
        revision: The Hub revision (branch, tag or commit) of an ``hf://`` path.
        in_batch_negatives: False trains the task on its own hard negatives only (default: off for the
            classification types and for names ending in ``no_in_batch_neg``, on otherwise).
    """

    path: str
    type: TaskType = "Retrieval"
    max_rows: int | None = None
    revision: str | None = None
    in_batch_negatives: bool | None = None


@dataclass(frozen=True)
class SourceConfig:
    """A folder or Hub dataset that becomes one task or one task per sub-folder (``data.sources`` entry).

    Example (the paper's fine-tuning data, one task per sub-folder, instructions baked into the queries)::

        data:
          sources:
            - path: hf://datasets/KaLM-Embedding/KaLM-embedding-finetuning-data
              tasks: subfolders
              max_rows_per_task: 100000
              types: {Multi-CPR: Retrieval, banking77_no_in_batch_neg: Classification}

    Args:
        path: A local folder, glob or file, or ``hf://datasets/ORG/NAME[/SUBFOLDER]``.
        tasks: ``subfolders``: one task per sub-folder (or per README ``configs:`` entry), named after it; ``one``:
            the whole path is one task, named ``name`` (default: the last path component); ``column``: one task per
            value of the file's ``task`` column (a curation step's output: ``{path: "@mine", tasks: column}``).
        name: The task name for ``tasks: one``.
        revision: Hub revision of an ``hf://`` path.
        type: The task type of every task of the source (default: the data's FlagEmbedding ``type`` column, else
            ``Retrieval``); ``types`` overrides it per task.
        types: Task name -> task type.
        instructions: Task name -> instruction (default: the instruction table, by task name then type). Queries
            that already carry the KaLM template keep theirs unless ``data.instructed_queries`` says otherwise.
        max_rows_per_task: Keep at most this many rows of each task (the first ones).
        include: Only these sub-folders (default: all).
    """

    path: str
    tasks: Literal["one", "subfolders", "column"] = "one"
    name: str | None = None
    revision: str | None = None
    type: TaskType | None = None
    types: dict[str, TaskType] = field(default_factory=dict)
    instructions: dict[str, str] = field(default_factory=dict)
    max_rows_per_task: int | None = None
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    """Training data.

    Args:
        tasks: Task name -> :class:`TaskConfig`.
        num_negatives: Use the first ``n`` hard negatives of each row (None: all there are; 0: none).
        homogeneous_ratio: Share of each global batch drawn from one task, in (0, 1] (1.0: fully task-homogeneous);
            :class:`kalm_st.sampling.TaskHomogeneousBatchSampler` fills the rest from the other tasks.
        length_aware: Group rows of similar length within a task (less padding), see the sampler.
        task_order: ``shuffled`` (default) or ``even``: each task's steps spread evenly over the epoch, so a run
            shorter than an epoch trains each task in proportion (:class:`kalm_st.sampling.TaskHomogeneousBatchSampler`).
        eval_tasks: Optional held-out tasks evaluated with the loss during training (``args.eval_strategy``).
        sources: Folders or Hub datasets expanded into tasks (:class:`SourceConfig`), added to ``tasks``.
        instructed_queries: KaLM / FlagEmbedding / F2LLM rows whose query already carries the KaLM template:
            ``keep`` the row's instruction (default), ``replace`` it with the task's, or ``strip`` it (no instruction).
        ragged_negatives: Rows with ``0 < len(neg) < num_negatives``: ``resample`` (seeded draws with replacement
            from the row's own, the authors' behaviour) or ``drop`` the row.
        positives: KaLM / FlagEmbedding rows with several positives: ``epoch`` (one per row per epoch, a seeded draw
            of the sampler; :mod:`kalm_st.data.positive_groups`) or ``once`` (one drawn at load, every epoch).
    """

    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    num_negatives: int | None = None
    homogeneous_ratio: float = 1.0
    length_aware: bool = False
    task_order: Literal["shuffled", "even"] = "shuffled"
    eval_tasks: dict[str, TaskConfig] = field(default_factory=dict)
    sources: tuple[SourceConfig, ...] = ()
    instructed_queries: Literal["keep", "strip", "replace"] = "keep"
    ragged_negatives: Literal["resample", "drop"] = "resample"
    positives: Literal["epoch", "once"] = "epoch"


@dataclass(frozen=True)
class LossConfig:
    """A loss from :data:`kalm_st.recipe.build.LOSSES`, by name, with its keyword arguments.

    Args:
        name: A :data:`LossName` (e.g. ``focal_infonce``, ``contrastive_distillation``).
        kwargs: Constructor arguments, except ``model``. ``hard_negative_mixing: {...}`` becomes a
            :class:`~kalm_st.losses.HardNegativeMixing`.
        base: For ``contrastive_distillation`` / ``embedding_distillation``: the contrastive loss they add to.
    """

    name: LossName
    kwargs: dict[str, Any] = field(default_factory=dict)
    base: LossConfig | None = None


@dataclass(frozen=True)
class MatryoshkaConfig:
    """sentence-transformers' ``MatryoshkaLoss`` around each task's loss (:func:`kalm_st.losses.kalm_matryoshka`).

    Args:
        enabled: Wrap the loss.
        dims: Dimensions; default KaLM's for the model's size (896, 512, 256, 128, 64 at 896-d; the model's own
            dimension then KaLM's smaller ones otherwise). Explicit dims larger than the model's are clamped to it
            (duplicates dropped with their weights), so a 896-d config also dry-runs on a 64-d test model.
        weights: One weight per dim; default KaLM's 1, 0.3, 0.2, 0.1, 0.1.
    """

    enabled: bool = True
    dims: tuple[int, ...] | None = None
    weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class StageConfig:
    """One stage of the recipe.

    Args:
        stage: ``pretrain``, ``finetune`` or ``distill``.
        output_dir: Checkpoints (``checkpoint-N``), the resolved config and the final model (``final/``) go here.
        seed: Seed of the model initialisation and the Trainer (``args.seed`` defaults to it).
        model, data, loss: Required.
        sharding: DDP (default) or FSDP2 across processes (:class:`ShardingConfig`).
    """

    stage: StageKind
    output_dir: str
    seed: int = 0
    model: ModelConfig | None = None
    data: DataConfig | None = None
    loss: LossConfig | None = None
    matryoshka: MatryoshkaConfig = field(default_factory=lambda: MatryoshkaConfig(enabled=False))
    args: dict[str, Any] = field(default_factory=dict)
    sharding: ShardingConfig | None = None
    source: str = field(default="<dict>", compare=False, repr=False)
    """Where the config came from (file name and overrides), for error messages. Not a YAML key."""

    @property
    def final_model_dir(self) -> Path:
        return Path(self.output_dir) / FINAL_MODEL_DIRNAME

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> StageConfig:
        """Validate a parsed YAML mapping; raise :class:`ConfigError` naming the key and ``source``."""
        config = _build(cls, data, "", source, exclude=("source",))
        config = dataclasses.replace(config, source=source)
        _check_stage(config)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-ready), the inverse of :meth:`from_dict`; ``None`` sections are left out."""
        return _to_plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and overrides
# ----------------------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> StageConfig:
    """Read a stage YAML, apply ``key.path=value`` overrides (values parsed as YAML), validate."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file {os.fspath(path)!r} does not exist.")
    raw = parse_yaml(file.read_text(encoding="utf8"), str(file))
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    source = str(file)
    if overrides:
        raw = apply_overrides(raw, overrides, source)
        source = f"{file} (with --set {' '.join(overrides)})"
    return StageConfig.from_dict(raw, source)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], source: str = "<dict>") -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied; ``value`` is parsed as YAML (typed, no exec)."""
    result = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. loss.kwargs.gamma=2.")
        value = parse_yaml(text, f"--set {key}") if text.strip() else ""
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"--set {item!r}: {'.'.join(parts[: depth + 1])} is a {type(child).__name__} in {source}, "
                    "not a section."
                )
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Validation: dataclass fields and their annotations (str, int, float, bool, None, Literal, tuple, dict, dataclasses)
# ----------------------------------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str, source: str, exclude: tuple[str, ...] = ()) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__} ({data!r:.60}).")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s} (allowed in {where}: {', '.join(sorted(fields))})."
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key {prefix}{name}.")
            continue
        values[name] = _convert(data[name], hints[name], f"{prefix}{name}", source)
    return cls(**values)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    origin, type_args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in type_args:
            return None
        errors = []
        for option in (a for a in type_args if a is not type(None)):
            try:
                return _convert(value, option, key, source)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(
            f"{source}: {key} must be {_type_name(annotation)}, got {type(value).__name__} {value!r:.60}."
        )
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in type_args:
            close = difflib.get_close_matches(str(value), [str(a) for a in type_args], n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ConfigError(
                f"{source}: {key} must be one of {', '.join(map(repr, type_args))}, got {value!r:.60}{hint}"
            )
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, f"{key}.", source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__} {value!r:.60}.")
        item_type = type_args[0]
        return tuple(_convert(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__} {value!r:.60}.")
        key_type, value_type = type_args
        return {
            _convert(k, key_type, f"{key} key", source): _convert(v, value_type, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation in (str, int, bool):
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
    else:  # pragma: no cover - a schema type this validator does not know
        raise TypeError(f"Unsupported config annotation {annotation!r} for {key}.")
    raise ConfigError(f"{source}: {key} must be {_type_name(annotation)}, got {type(value).__name__} {value!r:.60}.")


def _check_stage(config: StageConfig) -> None:
    source = config.source
    for section in ("model", "data", "loss"):
        if getattr(config, section) is None:
            raise ConfigError(f"{source}: missing required key {section} (stage {config.stage!r}).")
    _check_sharding(config)
    if "output_dir" in config.args:
        raise ConfigError(f"{source}: args.output_dir is set from the top-level output_dir; remove it.")
    check_training_args(config.args, source)
    mat = config.matryoshka
    if mat.dims is not None and mat.weights is not None and len(mat.dims) != len(mat.weights):
        raise ConfigError(
            f"{source}: matryoshka.weights has {len(mat.weights)} entries but matryoshka.dims has {len(mat.dims)}."
        )
    if config.loss.name in ("contrastive_distillation", "embedding_distillation") and config.loss.base is None:
        raise ConfigError(f"{source}: missing required key loss.base (the contrastive loss distillation adds to).")
    if config.loss.base is not None and config.loss.name not in ("contrastive_distillation", "embedding_distillation"):
        raise ConfigError(f"{source}: unknown key loss.base for loss {config.loss.name!r}.")
    ratio = config.data.homogeneous_ratio
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"{source}: data.homogeneous_ratio must be in (0, 1], got {ratio}.")
    if not config.data.tasks and not config.data.sources:
        raise ConfigError(f"{source}: data.tasks is empty.")
    _check_sources(config)
    _check_sizes(config)


def _check_sharding(config: StageConfig) -> None:
    """FSDP is configured in ``sharding:`` only; the Trainer's own ``fsdp`` / ``deepspeed`` arguments would wrap the
    model a second way."""
    source = config.source
    for key in ("fsdp", "fsdp_config", "deepspeed"):
        if config.args.get(key):
            raise ConfigError(f"{source}: args.{key}: shard the model with the sharding: section (strategy: fsdp2).")
    sharding = config.sharding
    if sharding is not None and sharding.strategy == "ddp":  # the FSDP2 settings would be silently ignored
        if sharding.activation_checkpointing:
            raise ConfigError(
                f"{source}: sharding.activation_checkpointing is for strategy fsdp2; under ddp set "
                "args.activation_checkpointing: true."
            )
        if sharding.mixed_precision == "bf16" or not sharding.reshard_after_forward:
            raise ConfigError(f"{source}: sharding.mixed_precision / reshard_after_forward are for strategy fsdp2.")
    lora = config.model.lora if config.model is not None else None
    if lora is not None:
        if lora.rank < 1:
            raise ConfigError(f"{source}: model.lora.rank must be >= 1, got {lora.rank}.")
        if not lora.target_modules:
            raise ConfigError(f"{source}: model.lora.target_modules is empty.")
        if not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"{source}: model.lora.dropout must be in [0, 1), got {lora.dropout}.")


def _check_sizes(config: StageConfig) -> None:
    """Counts and sizes that would train silently wrong (or fail deep inside the Trainer) when zero or negative."""
    assert config.model is not None and config.data is not None
    source = config.source
    if config.model.max_seq_length < 1:  # 0 would truncate every text to nothing
        raise ConfigError(f"{source}: model.max_seq_length must be >= 1, got {config.model.max_seq_length}.")
    if config.data.num_negatives is not None and config.data.num_negatives < 0:  # -1 would drop the last negative
        raise ConfigError(
            f"{source}: data.num_negatives must be >= 0 (or null for all), got {config.data.num_negatives}."
        )
    for section, tasks in (("tasks", config.data.tasks), ("eval_tasks", config.data.eval_tasks)):
        for name, task in tasks.items():
            if task.max_rows is not None and task.max_rows < 1:
                raise ConfigError(
                    f"{source}: data.{section}.{name}.max_rows must be >= 1 (or null), got {task.max_rows}."
                )
    for i, dim in enumerate(config.matryoshka.dims or ()):
        if dim < 1:
            raise ConfigError(f"{source}: matryoshka.dims[{i}] must be >= 1, got {dim}.")
    for i, weight in enumerate(config.matryoshka.weights or ()):
        if not math.isfinite(weight) or weight < 0:  # a negative weight would maximise that dimension's loss
            raise ConfigError(f"{source}: matryoshka.weights[{i}] must be a finite number >= 0, got {weight}.")


def _check_sources(config: StageConfig) -> None:
    assert config.data is not None
    for i, entry in enumerate(config.data.sources):
        key = f"{config.source}: data.sources[{i}]"
        if not entry.path.strip():
            raise ConfigError(f"{key}.path is empty.")
        if entry.path.startswith("hf://") and not entry.path.startswith("hf://datasets/"):
            raise ConfigError(
                f"{key}.path {entry.path!r}: a Hub dataset is written hf://datasets/ORG/NAME[/SUBFOLDER]."
            )
        if entry.max_rows_per_task is not None and entry.max_rows_per_task < 1:
            raise ConfigError(f"{key}.max_rows_per_task must be >= 1 (or null), got {entry.max_rows_per_task}.")
        if entry.tasks != "one" and entry.name is not None:
            raise ConfigError(f"{key}.name is for tasks: one (other tasks are named after their folder or value).")
        if entry.tasks == "one" and entry.include:
            raise ConfigError(f"{key}.include is for tasks: subfolders or column.")
        if entry.tasks == "column" and entry.path.startswith("hf://"):
            raise ConfigError(f"{key}: tasks: column reads a local file's task column; a Hub dataset uses subfolders.")


_ARGS_AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
_ARGS_POSITIVE = ("num_train_epochs", "save_steps", "eval_steps", "logging_steps")
_ARGS_NON_NEGATIVE = ("learning_rate", "weight_decay", "warmup_steps", "warmup_ratio")


def _check_training_arg_values(args: Mapping[str, Any], source: str) -> None:
    """Values the Trainer accepts but trains wrongly with (``max_steps: 0`` silently trains 3 epochs)."""
    for key, value in args.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if key in _ARGS_AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{source}: args.{key} must be >= 1, got {value}.")
        if key in _ARGS_POSITIVE and value <= 0:
            raise ConfigError(f"{source}: args.{key} must be > 0, got {value}.")
        if key in _ARGS_NON_NEGATIVE and value < 0:
            raise ConfigError(f"{source}: args.{key} must be >= 0, got {value}.")
        if key == "max_steps" and value != -1 and value < 1:
            raise ConfigError(
                f"{source}: args.max_steps must be >= 1, or -1 to train args.num_train_epochs, got {value}."
            )


def check_training_args(args: Mapping[str, Any], source: str) -> None:
    """Check ``args:`` keys (and simple value types) against ``SentenceTransformerTrainingArguments``' fields."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    fields = {f.name: f for f in dataclasses.fields(SentenceTransformerTrainingArguments) if f.init}
    for key, value in args.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key args.{key} (not a SentenceTransformerTrainingArguments field).")
        if key == "bf16":  # kalm-st adds "auto", resolved per device when the arguments are built (kalm_st.precision)
            if value not in (True, False, "auto"):
                raise ConfigError(f"{source}: args.bf16 must be true, false or 'auto', got {value!r:.60}.")
            continue
        expected = _simple_type(fields[key].type)
        if expected is None or value is None:
            continue
        ok = isinstance(value, expected) and not (bool not in expected and isinstance(value, bool))
        if not ok:
            names = " or ".join(t.__name__ for t in expected)
            raise ConfigError(f"{source}: args.{key} must be {names}, got {type(value).__name__} {value!r:.60}.")
    _check_training_arg_values(args, source)


def _simple_type(annotation: Any) -> tuple[type, ...] | None:
    """The accepted Python types of a TrainingArguments field declared as a plain scalar; None when not simple."""
    text = annotation if isinstance(annotation, str) else _type_name(annotation)
    text = text.replace(" ", "").replace("|None", "").replace("Optional[", "").rstrip("]")
    return {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(text)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {
            f.name: _to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "source" and getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


__all__ = [
    "FINAL_MODEL_DIRNAME",
    "RESOLVED_CONFIG_NAME",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "LossConfig",
    "LossName",
    "MatryoshkaConfig",
    "ModelConfig",
    "ShardingConfig",
    "SourceConfig",
    "StageConfig",
    "TaskConfig",
    "apply_overrides",
    "check_training_args",
    "load_config",
    "parse_yaml",
]
