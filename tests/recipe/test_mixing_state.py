"""Hard-negative mixing's random state survives a checkpoint: restored draws continue the uninterrupted sequence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from kalm_st.loss_state import load_loss_state, loss_state_holders, save_loss_state
from kalm_st.losses import ContrastiveDistillation, FocalInfoNCE, HardNegativeMixing

STATE_FILE = "hard_negative_mixing.pt"  # the file name earlier checkpoints hold


def _draw(mixing: HardNegativeMixing) -> torch.Tensor:
    # 4 queries with 3 hard negatives each; the weights depend only on the generator (random pair selection)
    return mixing.draw(torch.randn(4, 8), torch.randn(4, 3, 8))


def test_restored_state_continues_the_uninterrupted_draws(tmp_path: Path) -> None:
    uninterrupted = HardNegativeMixing(alpha=2.0, seed=7)
    interrupted = HardNegativeMixing(alpha=2.0, seed=7)
    for _ in range(3):
        _draw(uninterrupted), _draw(interrupted)
    save_loss_state([interrupted], tmp_path)
    expected = [_draw(uninterrupted) for _ in range(2)]

    resumed = HardNegativeMixing(alpha=2.0, seed=7)  # a fresh process: the generator starts from the seed again
    fresh = _draw(HardNegativeMixing(alpha=2.0, seed=7))
    assert not torch.equal(fresh, expected[0])  # without the state the resumed run would draw other mixes
    assert load_loss_state([resumed], tmp_path)
    for want in expected:
        torch.testing.assert_close(_draw(resumed), want, rtol=0, atol=0)


def test_state_of_another_seed_or_count_is_refused(tmp_path: Path) -> None:
    save_loss_state([HardNegativeMixing(seed=1)], tmp_path)
    with pytest.raises(ValueError, match="seed 1"):
        load_loss_state([HardNegativeMixing(seed=2)], tmp_path)
    with pytest.raises(ValueError, match="holds 1 hard-negative mixing states"):
        load_loss_state([HardNegativeMixing(seed=1), HardNegativeMixing(seed=1)], tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write: no temporary file left behind


def test_missing_state_warns_and_keeps_the_seed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mixing = HardNegativeMixing(seed=3)
    with caplog.at_level(logging.WARNING):
        assert not load_loss_state([mixing], tmp_path)
    assert STATE_FILE in caplog.text
    torch.testing.assert_close(_draw(mixing), _draw(HardNegativeMixing(seed=3)), rtol=0, atol=0)


def test_mixing_objects_are_found_inside_wrapping_losses(tiny_model: SentenceTransformer) -> None:
    first, second = HardNegativeMixing(seed=0), HardNegativeMixing(seed=0)
    losses = {
        "a": MatryoshkaLoss(tiny_model, FocalInfoNCE(tiny_model, hard_negative_mixing=first), [32, 16]),
        "b": ContrastiveDistillation(tiny_model, FocalInfoNCE(tiny_model, hard_negative_mixing=second)),
        "c": FocalInfoNCE(tiny_model),
    }
    found = loss_state_holders(losses)
    assert len(found) == 2 and found[0] is first and found[1] is second
