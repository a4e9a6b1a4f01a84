"""Which ``checkpoint-N`` a ``--resume`` may use, and whether this run may continue it.

- A checkpoint is *complete* when the Trainer finished writing it (``trainer_state.json``, written last, parses; the
  model's ``modules.json`` is there, or under FSDP2 the metadata of its ``model_shards/``) and none of its files is
  damaged (:func:`kalm_st.io.damaged_files`: truncated weights or optimizer states, unparsable JSON). The newest complete one is used; each one skipped is logged with
  the file and the reason.
- A resume must continue the *same* run: :class:`RunInfoCallback` records the resolved config and the number of
  processes in every checkpoint's ``trainer_state.json`` (as a transformers ``ExportableState``, so the record is
  written with the completion marker, never without it), and :func:`check_resume` refuses a changed config (except
  the keys in :data:`MAY_CHANGE_ON_RESUME`) or another world size, naming what differs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from kalm_st.io import damaged_files
from kalm_st.recipe.config import ConfigError, StageConfig

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
SHARDED_MODEL_METADATA = "model_shards/.metadata"
"""Written by ``torch.distributed.checkpoint`` once every process has written its shard of an FSDP2 checkpoint."""

MAY_CHANGE_ON_RESUME: frozenset[str] = frozenset(
    {
        "output_dir",  # the folder may have been moved
        "args.max_steps",  # train longer (or stop earlier)
        "args.num_train_epochs",
        "args.save_steps",
        "args.save_strategy",
        "args.save_total_limit",
        "args.logging_steps",
        "args.logging_strategy",
        "args.logging_first_step",
        "args.report_to",
        "args.run_name",
        "args.disable_tqdm",
        "args.dataloader_num_workers",
        "args.dataloader_prefetch_factor",
        "args.dataloader_persistent_workers",
    }
)
"""Config keys a resumed run may change: where and how often it saves and logs, and how long it trains. Any other
change (data, loss, learning rate, batch size, seed, ...) would silently continue a different run."""


def checkpoint_problems(path: Path) -> list[str]:
    """Why ``path`` cannot be resumed from (empty when it can)."""
    try:
        json.loads((path / TRAINER_STATE).read_text(encoding="utf8"))
    except (OSError, ValueError):
        return [f"no readable {TRAINER_STATE} (an interrupted save)"]
    sharded = (path / SHARDED_MODEL_METADATA).is_file()  # an FSDP2 run's checkpoint (kalm_st.distributed)
    if not sharded and not (path / "modules.json").is_file():
        return ["no modules.json (an interrupted model save)"]
    return damaged_files(path)


def scan_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[Path, list[str]]]:
    """Every ``checkpoint-N`` folder in ``output_dir``, newest first, with its problems."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    candidates = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit():
            candidates.append((int(step), path))
    return [(path, checkpoint_problems(path)) for _, path in sorted(candidates, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoint-N`` (see the module docstring); the ones skipped are logged."""
    for path, problems in scan_checkpoints(output_dir):
        if not problems:
            return path
        logger.warning("Skipping checkpoint %s: %s", path, "; ".join(problems))
    return None


class RunInfoCallback(TrainerCallback, ExportableState):
    """Records the resolved config and the world size in each checkpoint's ``trainer_state.json``."""

    def __init__(self, world_size: int, config: Mapping[str, Any]) -> None:
        self.world_size = int(world_size)
        self.config = dict(config)

    def state(self) -> dict[str, Any]:
        return {"args": {"world_size": self.world_size, "config": self.config}, "attributes": {}}


def recorded_run(checkpoint: Path) -> dict[str, Any] | None:
    """``{"world_size": ..., "config": ...}`` recorded by :class:`RunInfoCallback`, or None (an older checkpoint)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf8"))
    record = (state.get("stateful_callbacks") or {}).get(RunInfoCallback.__name__)
    return record.get("args") if isinstance(record, dict) else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def check_resume(config: StageConfig, checkpoint: Path, world_size: int) -> None:
    """Raise :class:`ConfigError` when this run is not the one ``checkpoint`` belongs to (config or world size)."""
    record = recorded_run(checkpoint)
    if record is None:
        logger.warning(
            "%s records no config or world size (written by an older kalm-st): resuming without checking them.",
            checkpoint,
        )
        return
    if int(record["world_size"]) != world_size:
        raise ConfigError(
            f"--resume: {checkpoint} was written by a run with {record['world_size']} process(es), this run has "
            f"{world_size}: the batches and the per-process random states depend on it. Resume with "
            f"{record['world_size']} process(es) (torchrun --nproc_per_node {record['world_size']}), or train "
            "into a new output_dir."
        )
    old, new = _flatten(record["config"]), _flatten(config.to_dict())
    changed = [
        k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k not in MAY_CHANGE_ON_RESUME
    ]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in changed[:10])
        raise ConfigError(
            f"--resume: the config ({config.source}) differs from the one {checkpoint} was trained with: {shown}. "
            "Resume with the same config (only the save, logging and length settings may change), or train into a "
            "new output_dir."
        )


__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "RunInfoCallback",
    "check_resume",
    "checkpoint_problems",
    "last_complete_checkpoint",
    "recorded_run",
    "scan_checkpoints",
]
