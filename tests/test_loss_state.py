"""kalm_st.loss_state: any loss that implements the LossState protocol is found, checkpointed and restored."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from kalm_st.loss_state import LossStateCallback, load_loss_state, loss_state_holders, save_loss_state


class CountingLoss(nn.Module):
    """A loss outside kalm-st with a running count and a trainable scale: loss state of a kind kalm-st never saw."""

    loss_state_file: ClassVar[str] = "counting_loss.pt"
    loss_state_noun: ClassVar[str] = "counts"
    loss_state_missing: ClassVar[str] = "the count restarts from 0."

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.scale = nn.Parameter(torch.ones(1))

    def loss_state(self) -> dict:
        return {"count": self.count}

    def load_loss_state(self, state: dict) -> None:
        self.count = int(state["count"])

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.scale]


def test_a_foreign_loss_state_round_trips(tmp_path: Path) -> None:
    wrapper = nn.Sequential(CountingLoss(), CountingLoss())  # found inside wrapping modules, in order
    holders = loss_state_holders({"task": wrapper})
    assert holders == [wrapper[0], wrapper[1]]
    wrapper[0].count, wrapper[1].count = 3, 5
    assert [p.name for p in save_loss_state(holders, tmp_path)] == ["counting_loss.pt"]
    fresh = [CountingLoss(), CountingLoss()]
    assert load_loss_state(fresh, tmp_path)
    assert [loss.count for loss in fresh] == [3, 5]
    with pytest.raises(ValueError, match="holds 2 counts but the losses of this run have 1"):
        load_loss_state([CountingLoss()], tmp_path)


def test_missing_file_warns_and_one_process_sync_is_a_no_op(tmp_path: Path, caplog) -> None:
    loss = CountingLoss()
    assert not load_loss_state([loss], tmp_path)
    assert "counting_loss.pt: the count restarts from 0." in caplog.text
    callback = LossStateCallback([loss])
    loss.scale.grad = torch.full((1,), 2.0)
    callback.on_pre_optimizer_step(None, None, None)  # one process: the gradient is left as it is
    assert torch.equal(loss.scale.grad, torch.full((1,), 2.0))
