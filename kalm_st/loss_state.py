"""Loss state: what a loss holds besides the model's weights, saved into each checkpoint, restored on resume and kept
identical on every process (DDP or FSDP2).

The Trainer checkpoints the model, the optimizer, the scheduler and the global RNGs, never the losses. A loss (or an
option object it holds in an attribute) takes part by implementing :class:`LossState`:

- ``loss_state()`` / ``load_loss_state(state)``: its state (``HardNegativeMixing``: its generator;
  ``EmbeddingDistillation``: its projection's weights), written by :class:`LossStateCallback` into each
  ``checkpoint-N`` as ``{loss_state_file}`` (one file per kind, a list in the losses' order, atomically) and read back
  by :func:`load_loss_state` before ``trainer.train(resume_from_checkpoint=...)``;
- optionally ``replicated_parameters()``: trainable parameters outside the model (a projection). Neither DDP nor
  FSDP2 sees them, so the callback starts every process from rank 0's values and averages their gradients over the
  processes before each optimizer step, as DDP does for the model; it then sets the holder's ``gradients_synced``.

``kalm-st train`` adds the callback whenever a loss holds state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kalm_st.io import save_torch_atomic

logger = logging.getLogger(__name__)


@runtime_checkable
class LossState(Protocol):
    """What a loss (or an object in one of its attributes) implements to have its state checkpointed and synced."""

    loss_state_file: ClassVar[str]
    """File name in ``checkpoint-N``, one per kind of holder."""
    loss_state_noun: ClassVar[str]
    """What the file holds, plural, for messages (``hard-negative mixing states``)."""
    loss_state_missing: ClassVar[str]
    """What happens when a checkpoint lacks the file (logged as a warning)."""

    def loss_state(self) -> Any: ...

    def load_loss_state(self, state: Any) -> None: ...


def _is_holder(value: Any) -> bool:
    return isinstance(getattr(type(value), "loss_state_file", None), str) and isinstance(value, LossState)


def loss_state_holders(losses: nn.Module | Mapping[str, nn.Module] | Iterable[nn.Module]) -> list[Any]:
    """Every distinct holder reachable from ``losses`` (wrappers such as MatryoshkaLoss included), in a fixed order:
    the loss modules and the objects in their attributes (``hard_negative_mixing``)."""
    if isinstance(losses, nn.Module):
        losses = [losses]
    elif isinstance(losses, Mapping):
        losses = list(losses.values())
    found: list[Any] = []
    for loss in losses:
        for module in loss.modules():
            for value in (module, *vars(module).values()):
                if _is_holder(value) and all(value is not other for other in found):
                    found.append(value)
    return found


def _by_file(holders: Sequence[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for holder in holders:
        groups.setdefault(type(holder).loss_state_file, []).append(holder)
    return groups


def save_loss_state(holders: Sequence[Any], folder: str | os.PathLike[str]) -> list[Path]:
    """Write each kind's states to ``folder/{loss_state_file}`` (atomically, file mode as umask says)."""
    written = []
    for name, group in _by_file(holders).items():
        path = Path(folder) / name
        save_torch_atomic(path, [holder.loss_state() for holder in group])
        written.append(path)
    return written


def load_loss_state(holders: Sequence[Any], folder: str | os.PathLike[str]) -> bool:
    """Restore the states saved in ``folder``; False (and a warning per missing kind) if a file is missing.

    Raises:
        ValueError: The checkpoint holds another number of states of a kind, or a state that does not fit.
    """
    complete = True
    for name, group in _by_file(holders).items():
        path = Path(folder) / name
        kind = type(group[0])
        if not path.is_file():
            logger.warning("%s has no %s: %s", folder, name, kind.loss_state_missing)
            complete = False
            continue
        states = torch.load(path, weights_only=True)
        if len(states) != len(group):
            raise ValueError(
                f"{path} holds {len(states)} {kind.loss_state_noun} but the losses of this run have {len(group)}: "
                "resume with the config the checkpoint was trained with."
            )
        for holder, state in zip(group, states, strict=True):
            try:
                holder.load_loss_state(state)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
    return complete


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replicated_parameters(holders: Sequence[Any]) -> list[nn.Parameter]:
    return [
        p for holder in holders if hasattr(holder, "replicated_parameters") for p in holder.replicated_parameters()
    ]


def broadcast_parameters(params: Sequence[nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s values to every process (no-op in one process)."""
    if _world_size() == 1:
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=src)


def all_reduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients over the processes, as DDP averages the model's (no-op in one process).

    A rank whose batch did not reach a parameter contributes zeros, as DDP counts an unused parameter; a parameter no
    rank used keeps ``grad = None`` (the optimizer then skips it, as in one process). One collective per call: every
    gradient and a has-gradient flag per parameter travel in one flat buffer of the parameters' dtype.
    """
    world = _world_size()
    params = [p for p in params if p.requires_grad]
    if world == 1 or not params:
        return
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        raise ValueError("all_reduce_gradients: the parameters must share one dtype and device.")
    flags = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] + [flags])
    dist.all_reduce(flat)  # sum over ranks
    offset = 0
    for index, param in enumerate(params):
        size = param.numel()
        used = bool(flat[flat.numel() - len(params) + index] > 0)
        param.grad = (flat[offset : offset + size].view_as(param) / world).clone() if used else None
        offset += size


class LossStateCallback(TrainerCallback):
    """Saves the losses' state into every checkpoint (main process) and keeps their replicated parameters identical
    on every process: rank 0's values when training begins, gradients averaged before each optimizer step (after
    gradient accumulation; the Trainer's gradient clipping covers the model's parameters only, in one process as in
    several)."""

    def __init__(self, holders: Sequence[Any]) -> None:
        self.holders = list(holders)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (TrainerCallback signature)
        broadcast_parameters(replicated_parameters(self.holders))
        for holder in self.holders:
            if hasattr(holder, "gradients_synced"):
                holder.gradients_synced = True
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        all_reduce_gradients(replicated_parameters(self.holders))
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.is_world_process_zero and self.holders:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                save_loss_state(self.holders, folder)
        return control


__all__ = [
    "LossState",
    "LossStateCallback",
    "all_reduce_gradients",
    "broadcast_parameters",
    "load_loss_state",
    "loss_state_holders",
    "replicated_parameters",
    "save_loss_state",
]
