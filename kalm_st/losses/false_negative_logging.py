"""``FalseNegativeLoggingCallback``: the false-negative mask's count of masked candidates, in the Trainer's logs.

Why a callback: a loss cannot add a value to the Trainer's logs without changing the loss. sentence-transformers logs
the parts of a loss that returns a dict, but it trains on their sum, so a count there would be added to the loss. So
:class:`~kalm_st.losses.FocalInfoNCE` only keeps the count of each call (a device tensor: no synchronisation per
step) and sums it while the model trains; this callback reads and resets those sums whenever the Trainer logs
training values, and adds their mean per loss call as ``false_negatives_masked`` to that log entry (the
``logs`` the later callbacks see, the console and progress-bar output, and ``state.log_history``, hence
``trainer_state.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import TrainerCallback

from kalm_st.losses.focal_info_nce import FocalInfoNCE

LOG_KEY = "false_negatives_masked"


def masked_losses(losses: nn.Module | Mapping[str, nn.Module]) -> list[FocalInfoNCE]:
    """Every distinct :class:`FocalInfoNCE` with ``false_negative_mask=True`` inside ``losses`` (wrappers included:
    cached, distillation, Matryoshka), in a fixed order."""
    roots = list(losses.values()) if isinstance(losses, Mapping) else [losses]
    found: list[FocalInfoNCE] = []
    for root in roots:
        for module in root.modules():
            if isinstance(module, FocalInfoNCE) and module.false_negative_mask and all(module is not f for f in found):
                found.append(module)
    return found


class FalseNegativeLoggingCallback(TrainerCallback):
    """Adds ``false_negatives_masked`` to each training log: the mean number of candidates the false-negative mask
    removed per loss call since the previous log (a Matryoshka loss calls its inner loss once per dimension; a
    per-task dict of losses is pooled), counted on this process's rows.

    Pass it to the trainer (``SentenceTransformerTrainer(..., callbacks=[FalseNegativeLoggingCallback(loss)])``).
    Reporting integrations (TensorBoard, W&B) that the Trainer put before it in its callback list do not see the
    value; ``state.log_history`` and the callbacks after it (the progress bar / printer) do.

    Args:
        losses: The trainer's loss, or its dict of per-task losses.
    """

    def __init__(self, losses: nn.Module | Mapping[str, nn.Module]) -> None:
        self.losses = masked_losses(losses)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> Any:
        if logs is None or "loss" not in logs:  # training logs only (eval logs carry eval_loss)
            return control
        total, calls = 0.0, 0
        for loss in self.losses:
            loss_total, loss_calls = loss.pop_false_negative_stats()
            total, calls = total + loss_total, calls + loss_calls
        if calls:
            value = round(total / calls, 4)
            logs[LOG_KEY] = value
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and "loss" in last:
                last[LOG_KEY] = value  # the Trainer appended a copy of `logs` before calling on_log
        return control


__all__ = ["LOG_KEY", "FalseNegativeLoggingCallback", "masked_losses"]
