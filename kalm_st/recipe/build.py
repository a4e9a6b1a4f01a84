"""Build everything one training stage needs from its :class:`~kalm_st.recipe.config.StageConfig`: model, datasets,
per-task losses, training arguments and the ``SentenceTransformerTrainer``; then run it with resume and an atomic final
save. The ``kalm-st train`` command is a thin wrapper around :func:`run_stage`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kalm_st.data.tasks import resolve_tasks
from kalm_st.io import check_output_path, write_text_atomic
from kalm_st.precision import use_bf16
from kalm_st.recipe.checkpoints import RunInfoCallback, check_resume, last_complete_checkpoint, scan_checkpoints
from kalm_st.recipe.config import (
    RESOLVED_CONFIG_NAME,
    TRAINING_DATA_NAME,
    ConfigError,
    LossConfig,
    LossName,
    StageConfig,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Losses: one explicit table, name -> class (imported when used; no importlib on config strings)
# ----------------------------------------------------------------------------------------------------------------------


def _focal_infonce() -> type[nn.Module]:
    from kalm_st.losses import FocalInfoNCE

    return FocalInfoNCE


def _cached_focal_infonce() -> type[nn.Module]:
    from kalm_st.losses import CachedFocalInfoNCE

    return CachedFocalInfoNCE


def _contrastive_distillation() -> type[nn.Module]:
    from kalm_st.losses import ContrastiveDistillation

    return ContrastiveDistillation


def _embedding_distillation() -> type[nn.Module]:
    from kalm_st.losses import EmbeddingDistillation

    return EmbeddingDistillation


def _mnrl() -> type[nn.Module]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss


def _cached_mnrl() -> type[nn.Module]:
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    return CachedMultipleNegativesRankingLoss


LOSSES: dict[LossName, Callable[[], type[nn.Module]]] = {
    "focal_infonce": _focal_infonce,
    "cached_focal_infonce": _cached_focal_infonce,
    "contrastive_distillation": _contrastive_distillation,
    "embedding_distillation": _embedding_distillation,
    "multiple_negatives_ranking": _mnrl,
    "cached_multiple_negatives_ranking": _cached_mnrl,
}
"""Loss name (``loss.name`` in a stage YAML, a :data:`~kalm_st.recipe.config.LossName`) -> the loss class.
``focal_infonce`` with ``gamma: 0`` is InfoNCE."""

_KALM_LOSSES = ("focal_infonce", "cached_focal_infonce")
_WRAPPING_LOSSES = ("contrastive_distillation", "embedding_distillation")
"""Losses that add a term to a contrastive ``loss.base`` (one forward pass for both)."""


def build_loss(
    model: Any, loss: LossConfig, *, classification: bool = False, source: str = "<config>", key: str = "loss"
) -> nn.Module:
    """One loss module. ``classification=True`` turns in-batch negatives off (same-class texts are false negatives).

    The loss classes validate their own hyperparameters; their errors are re-raised as :class:`ConfigError` naming
    the config file and the key (``key`` is the section: ``loss`` or ``loss.base``).
    """
    if loss.name not in LOSSES:
        raise ConfigError(f"{source}: {key}.name {loss.name!r} is unknown (known: {', '.join(sorted(LOSSES))}).")
    cls = LOSSES[loss.name]()
    kwargs = dict(loss.kwargs)
    if "hard_negative_mixing" in kwargs and isinstance(kwargs["hard_negative_mixing"], dict):
        from kalm_st.losses import HardNegativeMixing

        try:
            kwargs["hard_negative_mixing"] = HardNegativeMixing(**kwargs["hard_negative_mixing"])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{source}: {key}.kwargs.hard_negative_mixing: {error}") from error
    if loss.name in _WRAPPING_LOSSES:
        assert loss.base is not None  # checked by the config
        kwargs["base_loss"] = build_loss(
            model, loss.base, classification=classification, source=source, key=f"{key}.base"
        )
    elif classification:
        if loss.name not in _KALM_LOSSES:
            raise ConfigError(
                f"{source}: loss {loss.name!r} always uses in-batch negatives; classification tasks need "
                f"one of {', '.join(_KALM_LOSSES)} (in_batch_negatives=False)."
            )
        kwargs["in_batch_negatives"] = False
    try:
        return cls(model, **kwargs)
    except TypeError as error:
        raise ConfigError(f"{source}: {key}.kwargs do not fit {cls.__name__}: {error}") from error
    except ValueError as error:
        raise ConfigError(f"{source}: {key}.kwargs: {error}") from error


def matryoshka_schedule(
    dims: Sequence[int], weights: Sequence[float], model_dim: int
) -> tuple[list[int], list[float]]:
    """Clamp explicit Matryoshka dims to the model's embedding size, dropping the duplicates this creates.

    KaLM's dims (896, 512, ...) are for the 896-d Qwen2-0.5B; a 576-d SmolLM2 gets (576, 512, 256, 128, 64) with the
    same weights, a 64-d test model gets (64,) with the first weight.
    """
    out_dims: list[int] = []
    out_weights: list[float] = []
    for dim, weight in zip(dims, weights, strict=True):
        dim = min(int(dim), model_dim)
        if dim not in out_dims:
            out_dims.append(dim)
            out_weights.append(float(weight))
    return out_dims, out_weights


def build_losses(model: Any, config: StageConfig, tasks: dict[str, Any] | None = None) -> dict[str, nn.Module]:
    """Per-task losses (a dict keyed like the training ``DatasetDict``), wrapped in ``MatryoshkaLoss`` if enabled.

    ``tasks`` (default ``data.tasks``): name -> an object with ``type`` and ``in_batch_negatives`` (None: off for the
    classification types); a task without in-batch negatives gets the classification loss settings.
    """
    assert config.loss is not None and config.data is not None
    losses: dict[str, nn.Module] = {}
    for task, task_config in (config.data.tasks if tasks is None else tasks).items():
        in_batch = task_config.in_batch_negatives
        classification = task_config.type in CLASSIFICATION_TYPES if in_batch is None else not in_batch
        loss = build_loss(model, config.loss, classification=classification, source=config.source)
        if config.matryoshka.enabled:
            from kalm_st.losses import MATRYOSHKA_WEIGHTS, kalm_matryoshka

            dims, weights = config.matryoshka.dims, config.matryoshka.weights
            if dims is not None:
                if weights is None:
                    weights = tuple(
                        MATRYOSHKA_WEIGHTS[i] if i < len(MATRYOSHKA_WEIGHTS) else 0.1 for i in range(len(dims))
                    )
                dims, weights = matryoshka_schedule(dims, weights, model.get_embedding_dimension())
            loss = kalm_matryoshka(model, loss, dims=dims, weights=weights)
        losses[task] = loss
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def build_stage_model(config: StageConfig) -> Any:
    """The stage's starting model (``model.init_from``, read by :func:`kalm_st.model_source.resolve_model`); errors
    name the config file and the ``model`` key (a missing folder, an unsupported architecture, a bad attention
    back-end)."""
    from kalm_st.model_source import resolve_model

    assert config.model is not None
    spec = config.model
    try:
        return resolve_model(
            spec.init_from,
            what=f"{config.source}: model.init_from",
            seed=config.seed,
            dtype=spec.dtype,
            attn_implementation=spec.attn_implementation,
            max_seq_length=spec.max_seq_length,
        )
    except (ConfigError, OSError):
        raise
    except ValueError as error:  # the architecture or back-end checks of transformers and kalm-st
        message = str(error)
        raise ConfigError(
            message if message.startswith(config.source) else f"{config.source}: model: {message}"
        ) from error


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


CLASSIFICATION_TYPES: frozenset[str] = frozenset({"Classification", "MultilabelClassification", "Clustering"})
"""Task types trained without in-batch negatives: other texts of the same class are false negatives (METHOD.md §3)."""


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_sources(config: StageConfig, tasks: dict[str, Any], *, skip_remote: bool = False) -> tuple[Any, dict]:
    """``(DatasetDict, {name: TaskSource with the type the data asked for})`` of a stage's tasks: the one reader
    (:func:`kalm_st.data.load_tasks`) with the stage's policy, then the global batch each task must fill."""
    from kalm_st.data.load import LoadOptions, load_tasks
    from kalm_st.data.tasks import TaskSource, task_source

    assert config.data is not None
    specs = {n: t if isinstance(t, TaskSource) else task_source(n, t, f"data.tasks.{n}") for n, t in tasks.items()}
    options = LoadOptions(
        num_negatives=config.data.num_negatives,
        require_negatives=config.stage in ("finetune", "distill") and config.data.num_negatives != 0,
        ragged_negatives=config.data.ragged_negatives,
        instructed_queries=config.data.instructed_queries,
        positives=config.data.positives,
        seed=config.seed,
        source=config.source,
        skip_remote=skip_remote,
    )
    result, resolved = load_tasks(specs, options)
    global_batch = int(config.args.get("per_device_train_batch_size", 8)) * _world_size()
    for name, dataset in result.items():
        if len(dataset) < global_batch:
            raise ConfigError(
                f"{config.source}: {specs[name].key} ({specs[name].path}) has {len(dataset)} rows, fewer than one "
                f"global batch of {global_batch} (per_device_train_batch_size x {_world_size()} processes)."
            )
    return result, resolved


def build_prompts(tasks: dict[str, Any], datasets: Any) -> dict[str, dict[str, str]]:
    """sentence-transformers' nested ``prompts`` (``{task: {column: prompt}}``) from the one instruction resolver.

    :func:`kalm_st.data.build_training_prompts` with each task's configured ``type``: the same prompts the curation
    commands encode with (``--task-type``), see ``docs/instructions.md``.
    """
    from kalm_st.data import build_training_prompts

    return build_training_prompts(datasets, {name: task.type or "Retrieval" for name, task in tasks.items()})


def _multi_dataset_sampler(
    config: StageConfig, task_names: Sequence[str] | None = None, positive_groups: dict[str, Any] | None = None
) -> Any:
    """The rank-aware, task-homogeneous batch sampler (every rank draws the same task at each step); tasks with
    ``positive_groups`` train one positive per query per epoch."""
    from kalm_st.sampling import TaskHomogeneousBatchSampler

    assert config.data is not None
    return functools.partial(
        TaskHomogeneousBatchSampler,
        homogeneous_ratio=config.data.homogeneous_ratio,
        length_aware=config.data.length_aware,
        task_order=config.data.task_order,
        task_names=list(config.data.tasks if task_names is None else task_names),
        positive_groups=positive_groups or None,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """What :func:`build_stage` built; ``trainer.train()`` runs the stage."""

    config: StageConfig
    model: Any
    train_dataset: Any
    eval_dataset: Any
    losses: dict[str, nn.Module]
    args: Any
    trainer: Any
    tasks: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The training tasks as loaded (:class:`kalm_st.data.tasks.TaskSource`: path, type, revision)."""


def training_arguments(
    config: StageConfig,
    prompts: dict[str, Any] | None = None,
    task_names: Sequence[str] | None = None,
    positive_groups: dict[str, Any] | None = None,
) -> Any:
    """``SentenceTransformerTrainingArguments(**config.args)`` plus what YAML cannot hold (sampler class, prompts,
    the positive groups of :func:`kalm_st.data.positive_groups.split_positive_groups`)."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    assert config.data is not None
    args: dict[str, Any] = {"seed": config.seed, "data_seed": config.seed, **config.args}
    args["output_dir"] = config.output_dir
    if "bf16" in args:  # "auto": bf16 on a GPU that has it, on a CPU only where bf16 is fast (kalm_st.precision)
        on_cuda = torch.cuda.is_available() and not args.get("use_cpu", False)
        try:
            args["bf16"] = use_bf16(args["bf16"], cuda=on_cuda, what=f"{config.source}: args.bf16")
        except ValueError as error:
            raise ConfigError(str(error)) from error
    args.setdefault("multi_dataset_batch_sampler", _multi_dataset_sampler(config, task_names, positive_groups))
    if prompts is not None and "prompts" not in config.args:
        args["prompts"] = prompts
    try:
        return SentenceTransformerTrainingArguments(**args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{config.source}: args: {error}") from error


def _fit_projections(losses: dict[str, nn.Module], datasets: Any, prompts: Any, seed: int) -> None:
    """Start each ``projection_init: ridge`` projection at its ridge fit on the task's training rows (a resumed run
    then loads the checkpoint's projection over it)."""
    from kalm_st.losses import distillation_losses, fit_projection

    for task, loss in losses.items():
        for distillation in distillation_losses(loss):
            if distillation.projection_init == "ridge":
                task_prompts = prompts.get(task) if isinstance(prompts, dict) else None
                fit_projection(distillation, datasets[task], task_prompts if isinstance(task_prompts, dict) else None,
                               seed=seed)  # fmt: skip


def _split_groups(datasets: Any) -> tuple[Any, dict[str, Any]]:
    import numpy as np
    from datasets import DatasetDict

    from kalm_st.data.positive_groups import split_positive_groups

    plain, groups = split_positive_groups(datasets)
    for task, starts in groups.items():  # the sampler loads and checks the starts; here only their count (header)
        queries = len(np.load(starts, mmap_mode="r") if isinstance(starts, str) else starts)
        logger.info(
            "Task %r: %d rows, one per positive of %d queries: one per query per epoch",
            task,
            len(plain[task]),
            queries,
        )
    return DatasetDict(plain), groups


def build_stage(config: StageConfig, *, callbacks: Sequence[Any] = (), dry_run: bool = False) -> StageRun:
    """Build model, datasets, losses, arguments and trainer of a training stage (nothing is trained)."""
    from kalm_st.loss_state import LossStateCallback, loss_state_holders
    from kalm_st.recipe.trainer import KaLMTrainer
    from kalm_st.sampling import SamplerEpochCallback

    assert config.data is not None
    train_tasks = resolve_tasks(config, config.data.tasks, skip_remote=dry_run)
    train_dataset, train_tasks = load_sources(config, train_tasks, skip_remote=dry_run)
    eval_dataset = None
    eval_tasks: dict[str, Any] = {}
    if config.data.eval_tasks:
        eval_tasks = resolve_tasks(config, config.data.eval_tasks, with_sources=False, skip_remote=dry_run)
        eval_dataset, eval_tasks = load_sources(config, eval_tasks, skip_remote=dry_run)
    # one row per positive of a query: the sampler draws one per epoch; the group column must not reach the collator
    train_dataset, positive_groups = _split_groups(train_dataset)
    if eval_dataset is not None:
        eval_dataset, _ = _split_groups(eval_dataset)  # evaluated on every positive
    prompts = build_prompts({**train_tasks, **eval_tasks}, train_dataset)
    if eval_dataset is not None:
        prompts.update(build_prompts(eval_tasks, eval_dataset))
    if config.data.instructed_queries == "strip":  # converted tasks: the texts as stripped, no prompt added
        for name, task in {**train_tasks, **eval_tasks}.items():
            if task.converted:
                prompts[name] = {}
    # The model first: creating the training arguments initialises torch.distributed under torchrun, after which
    # transformers' save_pretrained (used when building a model from a config) writes on rank 0 only.
    model = build_stage_model(config)
    if config.model is not None and config.model.lora is not None:  # only the adapters train
        from kalm_st.lora import apply_lora

        apply_lora(model, config.model.lora, seed=config.seed, source=config.source)
    args = training_arguments(config, prompts, list(train_tasks), positive_groups)
    losses = build_losses(model, config, train_tasks)
    if dry_run and not len(train_dataset):  # every source is remote: nothing to build a trainer on offline
        return StageRun(config, model, train_dataset, eval_dataset, losses, args, None)
    # the sampler's epoch must reach it through accelerate's wrappers on every transformers version and on resume
    callbacks = [SamplerEpochCallback(), *callbacks]
    from kalm_st.losses.false_negative_logging import FalseNegativeLoggingCallback, masked_losses

    if not dry_run:  # the fit encodes training texts: nothing a dry run should spend time on
        _fit_projections(losses, train_dataset, args.prompts, config.seed)
    holders = loss_state_holders(losses)
    if holders:  # mixing generators, projections: saved into each checkpoint and kept the same on every process
        callbacks.append(LossStateCallback(holders))
    if masked_losses(losses):  # logs the count of masked in-batch candidates per step
        callbacks.append(FalseNegativeLoggingCallback(losses))
    callbacks.append(RunInfoCallback(args.world_size, config.to_dict()))  # what --resume checks
    trainer_kwargs: dict[str, Any] = {}
    trainer_class = KaLMTrainer
    if config.sharding is not None and config.sharding.strategy == "fsdp2" and not dry_run:
        from kalm_st.distributed.sharded_trainer import ShardedTrainer

        trainer_class, trainer_kwargs = ShardedTrainer, {"sharding": config.sharding, "source": config.source}
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        loss=losses,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    return StageRun(config, model, train_dataset, eval_dataset, losses, args, trainer, train_tasks)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and running
# ----------------------------------------------------------------------------------------------------------------------


def save_training_data(run: StageRun) -> Path:
    """Write ``{output_dir}/training_data.yaml``: per task its source, type, rows trained on and the instruction each
    column was given (the model card's data and instruction tables; main process only)."""
    prompts = run.args.prompts if isinstance(run.args.prompts, dict) else {}
    record = {}
    for name, dataset in run.train_dataset.items():
        task = run.tasks.get(name)
        task_prompts = prompts.get(name)
        record[name] = {
            "path": getattr(task, "path", None),
            "revision": getattr(task, "revision", None),
            "type": getattr(task, "type", None),
            "rows": len(dataset),
            "instructions": dict(task_prompts) if isinstance(task_prompts, dict) else {},
        }
    path = Path(run.config.output_dir) / TRAINING_DATA_NAME
    write_text_atomic(path, yaml.safe_dump({"tasks": record}, sort_keys=False, allow_unicode=True))
    return path


def save_resolved_config(config: StageConfig) -> Path:
    """Write the resolved config to ``{output_dir}/resolved_config.yaml`` (atomically, main process only)."""
    path = Path(config.output_dir) / RESOLVED_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, f"# Resolved from {config.source}\n" + config.to_yaml())
    return path


def run_stage(
    config: StageConfig, *, resume: bool = False, dry_run: bool = False, callbacks: Sequence[Any] = ()
) -> Path | None:
    """Run one stage: train and write ``{output_dir}/final`` atomically. Rank-aware under torchrun.

    Args:
        config: The validated stage config.
        resume: Continue from the last complete ``checkpoint-N`` in ``output_dir`` (error if there is none).
        dry_run: Build everything (model, data, losses, trainer), save nothing, train nothing.
        callbacks: Extra ``transformers.TrainerCallback`` objects.

    Returns:
        The final model folder, or None for a dry run.
    """
    checkpoint = None
    if resume:
        checkpoint = last_complete_checkpoint(config.output_dir)
        if checkpoint is None:
            skipped = "".join(
                f"; {path.name}: {', '.join(problems)}" for path, problems in scan_checkpoints(config.output_dir)
            )
            raise FileNotFoundError(
                f"--resume: no complete checkpoint-N folder in {config.output_dir!r} to resume from "
                f"(run without --resume to start fresh){skipped}."
            )
        check_resume(config, checkpoint, _world_size())
    elif not dry_run and any(Path(config.output_dir).glob("checkpoint-*")):
        logger.warning(
            "%s already holds checkpoints of an earlier run; this run starts fresh and overwrites them as it saves "
            "(pass --resume to continue the earlier run instead).",
            config.output_dir,
        )
    if not dry_run:
        _check_writable(config)
    run = build_stage(config, callbacks=callbacks, dry_run=dry_run)
    if dry_run:
        logger.info(
            "Dry run of %s: model %s (dim %d), tasks %s, %d training rows, losses %s; nothing trained.",
            config.source,
            type(run.model[0].auto_model).__name__,
            run.model.get_embedding_dimension(),
            list(run.train_dataset),
            sum(len(ds) for ds in run.train_dataset.values()),
            {task: type(loss).__name__ for task, loss in run.losses.items()},
        )
        return None
    from kalm_st.loss_state import load_loss_state, loss_state_holders

    trainer = run.trainer
    if trainer.is_world_process_zero():
        save_resolved_config(config)
        save_training_data(run)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
        load_loss_state(loss_state_holders(run.losses), checkpoint)
    final = config.final_model_dir
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        from kalm_st.distributed.final_save import save_final_model

        save_final_model(trainer, run.model, final, config)  # atomic and portable; gathers a sharded model once
        if trainer.is_world_process_zero() and (final / "modules.json").is_file():
            from kalm_st.evaluation.card import write_model_card

            write_model_card(final)  # kalm-st's card (stages, data, instructions) in place of the automatic one
    except Exception as error:
        if _is_write_failure(error):
            raise _write_failure(config, error) from error
        raise
    trainer.accelerator.wait_for_everyone()
    return final


def _check_writable(config: StageConfig) -> None:
    """Fail before loading anything when ``output_dir`` cannot take files, not at the first checkpoint; on the main
    process, remove the temporary folders of saves that a killed run left behind (atomic saves write beside)."""
    folder = check_output_path(config.output_dir, folder=True, name=f"{config.source}: output_dir")
    if int(os.environ.get("RANK", "0")) == 0:
        for stale in folder.glob(".*.tmp-*"):
            if stale.is_dir():
                logger.warning("Removing %s, left by an interrupted save.", stale)
                shutil.rmtree(stale, ignore_errors=True)


# errno of a full disk, a file size limit, a disk quota; the messages torch and safetensors give for them
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_WRITE_MESSAGES = re.compile(
    r"No space left|File too large|Disk quota|os error (27|28|122)\b|file write failed|unexpected pos \d+ vs \d+"
)


def _is_write_failure(error: BaseException) -> bool:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            return True
        if _WRITE_MESSAGES.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _write_failure(config: StageConfig, error: BaseException) -> OSError:
    last = last_complete_checkpoint(config.output_dir)
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return OSError(
        f"{config.source}: writing to output_dir {config.output_dir!r} failed ({type(error).__name__}: "
        f"{first_line}): the disk is full or a file size limit is set. The last complete checkpoint is "
        f"{last if last is not None else 'none'} (incomplete ones are skipped); free space, then rerun with --resume.",
    )


__all__ = [
    "LOSSES",
    "StageRun",
    "build_loss",
    "build_losses",
    "build_stage",
    "build_stage_model",
    "last_complete_checkpoint",
    "matryoshka_schedule",
    "run_stage",
    "save_resolved_config",
    "save_training_data",
    "training_arguments",
]
