"""Checkpointing of the losses' own trainable weights (``EmbeddingDistillation``'s projection).

The SentenceTransformerTrainer optimises the loss's parameters (its ``get_optimizer_cls_and_kwargs`` collects
``loss.named_parameters()``) and checkpoints the optimizer's state, but saves only the model's weights: a resumed
run would restart the projection from its initialisation while its Adam moments continue. :class:`ProjectionStateCallback`
writes the projections' ``state_dict`` into each ``checkpoint-N`` folder (``loss_projections.pt``, atomically);
:func:`load_projection_state` copies them back (in place, so the optimizer keeps its references) before
``trainer.train(resume_from_checkpoint=...)``. The final model never holds them.

Several processes (torchrun): the projection lives in the loss, outside the DDP-wrapped model, so DDP does not average
its gradients and each rank's copy would drift apart on its own data. :class:`ProjectionSyncCallback` broadcasts rank
0's projections when training begins and averages their gradients over the processes before every optimizer step
(what DDP does for the model's parameters), so every rank keeps the same projection. ``kalm-st train`` adds both
callbacks whenever a loss has a projection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kalm_st.io import save_torch_atomic
from kalm_st.losses.embedding_distillation import EmbeddingDistillation

logger = logging.getLogger(__name__)

STATE_FILE = "loss_projections.pt"


def distillation_losses(
    losses: nn.Module | Mapping[str, nn.Module] | Iterable[nn.Module],
) -> list[EmbeddingDistillation]:
    """Every distinct ``EmbeddingDistillation`` reachable from ``losses`` (wrappers such as MatryoshkaLoss included)."""
    if isinstance(losses, nn.Module):
        losses = [losses]
    elif isinstance(losses, Mapping):
        losses = list(losses.values())
    found: list[EmbeddingDistillation] = []
    for loss in losses:
        for module in loss.modules():
            if isinstance(module, EmbeddingDistillation) and all(module is not other for other in found):
                found.append(module)
    return found


def save_projection_state(losses: Sequence[EmbeddingDistillation], folder: str | os.PathLike[str]) -> Path:
    """Write the projections to ``folder/loss_projections.pt`` (temporary file, then rename)."""
    path = Path(folder) / STATE_FILE
    save_torch_atomic(
        path, [{k: v.detach().cpu() for k, v in loss.projection.state_dict().items()} for loss in losses]
    )
    return path


def load_projection_state(losses: Sequence[EmbeddingDistillation], folder: str | os.PathLike[str]) -> bool:
    """Restore the projections saved in ``folder`` in place; False (and a warning) if the checkpoint holds none."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        logger.warning(
            "%s has no %s: the distillation projection restarts from its initialisation.", folder, STATE_FILE
        )
        return False
    states = torch.load(path, weights_only=True)
    if len(states) != len(losses):
        raise ValueError(
            f"{path} holds {len(states)} projection(s) but the losses of this run have {len(losses)}: resume with "
            "the losses the checkpoint was trained with."
        )
    for loss, state in zip(losses, states, strict=True):
        own = loss.projection.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in own.items()}:
            raise ValueError(
                f"{path}: projection shapes {shapes} do not fit this run's ({loss.student_dim} -> {loss.teacher_dim})."
            )
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(state[name])
    return True


class ProjectionStateCallback(TrainerCallback):
    """Saves the losses' projections into every checkpoint the Trainer writes (main process)."""

    def __init__(self, losses: Sequence[EmbeddingDistillation]) -> None:
        self.losses = list(losses)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (TrainerCallback signature)
        if state.is_world_process_zero and self.losses:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                save_projection_state(self.losses, folder)
        return control


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_projections(losses: Sequence[EmbeddingDistillation], src: int = 0) -> None:
    """Copy rank ``src``'s projection weights to every process (no-op in one process)."""
    if _world_size() == 1:
        return
    with torch.no_grad():
        for loss in losses:
            for param in loss.projection.parameters():
                dist.broadcast(param.data, src=src)


def all_reduce_projection_grads(losses: Sequence[EmbeddingDistillation]) -> None:
    """Average the projections' gradients over the processes, as DDP averages the model's (no-op in one process).

    A rank whose batch did not reach a projection contributes zeros, as DDP counts an unused parameter; a projection
    no rank used keeps ``grad = None`` (the optimizer then skips it, as in one process). One collective per call:
    every gradient and a has-gradient flag per parameter travel in one flat buffer of the parameters' dtype.
    """
    world = _world_size()
    if world == 1:
        return
    params = [p for loss in losses for p in loss.projection.parameters() if p.requires_grad]
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        raise ValueError("all_reduce_projection_grads: the projections must share one dtype and device.")
    flags = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] + [flags])
    dist.all_reduce(flat)  # sum over ranks
    offset = 0
    for index, param in enumerate(params):
        size = param.numel()
        used = bool(flat[flat.numel() - len(params) + index] > 0)
        param.grad = (flat[offset : offset + size].view_as(param) / world).clone() if used else None
        offset += size


class ProjectionSyncCallback(TrainerCallback):
    """Keeps the losses' projections identical on every process: rank 0's weights at the start, gradients averaged
    over the processes before each optimizer step (after gradient accumulation; the Trainer's gradient clipping
    covers the model's parameters only, not the loss's, in one process as in several)."""

    def __init__(self, losses: Sequence[EmbeddingDistillation]) -> None:
        self.losses = list(losses)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (TrainerCallback signature)
        broadcast_projections(self.losses)
        for loss in self.losses:
            loss.gradients_synced = True
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        all_reduce_projection_grads(self.losses)
        return control


__all__ = [
    "STATE_FILE",
    "ProjectionStateCallback",
    "ProjectionSyncCallback",
    "all_reduce_projection_grads",
    "broadcast_projections",
    "distillation_losses",
    "load_projection_state",
    "save_projection_state",
]
