"""Checkpointing of online hard-negative mixing's random state, so that a resumed run draws the same mixes.

The Trainer checkpoints the model, optimizer, scheduler and the global RNGs, but not the losses: each
:class:`~kalm_st.losses.HardNegativeMixing` owns a ``torch.Generator`` (its draws must not depend on the global RNG),
whose state would restart from the seed on resume. :class:`MixingStateCallback` writes the generators' states into
each ``checkpoint-N`` folder (``hard_negative_mixing.pt``, atomically); :func:`load_mixing_state` restores them before
``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kalm_st.io import save_torch_atomic
from kalm_st.losses import HardNegativeMixing

logger = logging.getLogger(__name__)

STATE_FILE = "hard_negative_mixing.pt"


def mixing_objects(losses: Mapping[str, nn.Module]) -> list[HardNegativeMixing]:
    """Every distinct ``HardNegativeMixing`` reachable from ``losses`` (wrappers included), in a fixed order."""
    found: list[HardNegativeMixing] = []
    for loss in losses.values():
        for module in loss.modules():
            mixing = getattr(module, "hard_negative_mixing", None)
            if isinstance(mixing, HardNegativeMixing) and all(mixing is not other for other in found):
                found.append(mixing)
    return found


def save_mixing_state(mixings: Sequence[HardNegativeMixing], folder: str | os.PathLike[str]) -> Path:
    """Write the mixing states to ``folder/hard_negative_mixing.pt`` (temporary file, then rename)."""
    path = Path(folder) / STATE_FILE
    save_torch_atomic(path, [mixing.state_dict() for mixing in mixings])
    return path


def load_mixing_state(mixings: Sequence[HardNegativeMixing], folder: str | os.PathLike[str]) -> bool:
    """Restore the mixing states saved in ``folder``; False (and a warning) if the checkpoint holds none."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        logger.warning(
            "%s has no %s: hard-negative mixing restarts from its seed, so the resumed run will not replay the "
            "uninterrupted run's mixes exactly.",
            folder,
            STATE_FILE,
        )
        return False
    states = torch.load(path, weights_only=True)
    if len(states) != len(mixings):
        raise ValueError(
            f"{path} holds {len(states)} hard-negative mixing states but the losses of this run have {len(mixings)}: "
            "resume with the config the checkpoint was trained with."
        )
    for mixing, state in zip(mixings, states, strict=True):
        mixing.load_state_dict(state)
    return True


class MixingStateCallback(TrainerCallback):
    """Saves the mixing states into every checkpoint the Trainer writes (main process; every rank draws alike)."""

    def __init__(self, mixings: Sequence[HardNegativeMixing]) -> None:
        self.mixings = list(mixings)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (TrainerCallback signature)
        if state.is_world_process_zero and self.mixings:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                save_mixing_state(self.mixings, folder)
        return control


__all__ = ["STATE_FILE", "MixingStateCallback", "load_mixing_state", "mixing_objects", "save_mixing_state"]
