"""CachedFocalInfoNCE equals FocalInfoNCE; MatryoshkaLoss wraps every kalm-st loss without extra forward passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kalm_st.losses import (
    MATRYOSHKA_DIMS,
    MATRYOSHKA_WEIGHTS,
    CachedFocalInfoNCE,
    ContrastiveDistillation,
    FocalInfoNCE,
    HardNegativeMixing,
    kalm_matryoshka,
    matryoshka_dims_for,
)
from tests.losses._helpers import LOSS_ATOL, LOSS_RTOL, assert_same_loss_and_grads, featurize, params_grads


def _run(loss, model, features, labels=None):
    model.zero_grad()
    value = loss(copy.deepcopy(features), labels)
    value.backward()
    return value.detach(), params_grads(model)


@pytest.mark.parametrize("in_batch", [True, False])
def test_cached_equals_uncached_with_mixing(tiny_model, columns, in_batch: bool) -> None:
    features = featurize(tiny_model, columns)  # dropout is off: tiny_model is in eval mode
    kwargs = dict(temperature=0.05, gamma=0.5, in_batch_negatives=in_batch)
    plain = FocalInfoNCE(tiny_model, hard_negative_mixing=HardNegativeMixing(seed=3), **kwargs)
    cached = CachedFocalInfoNCE(
        tiny_model, mini_batch_size=4, hard_negative_mixing=HardNegativeMixing(seed=3), **kwargs
    )
    assert_same_loss_and_grads(_run(cached, tiny_model, features), _run(plain, tiny_model, features))


def test_cached_hyperparameters_live_on_wrapped_loss(tiny_model) -> None:
    cached = CachedFocalInfoNCE(tiny_model, temperature=0.02, gamma=1.0)
    assert cached.temperature == 0.02 and cached.scale == pytest.approx(50.0) and cached.gamma == 1.0
    cached.gamma = 2.0
    assert cached.loss.gamma == 2.0
    assert cached.get_config_dict()["mini_batch_size"] == 32 and cached.get_config_dict()["gamma"] == 2.0
    assert "Scaling Deep Contrastive Learning" in cached.citation and "zhao2026" in cached.citation
    with pytest.raises(ValueError, match="gamma"):
        CachedFocalInfoNCE(tiny_model, gamma=-1)
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedFocalInfoNCE(tiny_model, mini_batch_size=0)


def _count_forwards(model) -> list[int]:
    calls = [0]
    model[0].register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _matryoshka_reference(loss_fn, embeddings, dims, weights):
    """Independent reference: weighted sum of the loss on truncated, re-normalised embeddings."""
    return sum(
        w * loss_fn([F.normalize(e[:, :d], dim=-1) for e in embeddings]) for d, w in zip(dims, weights, strict=True)
    )


@pytest.mark.parametrize("kind", ["focal", "mixing", "distill", "cached"])
def test_matryoshka_works_without_extra_forward_passes(tiny_model, columns, kind: str) -> None:
    features = featurize(tiny_model, columns)
    dims, weights = (64, 32, 16), (1.0, 0.3, 0.2)
    labels = None

    def make():
        if kind == "focal":
            return FocalInfoNCE(tiny_model)
        if kind == "mixing":
            return FocalInfoNCE(tiny_model, hard_negative_mixing=HardNegativeMixing(seed=1))
        if kind == "distill":
            return ContrastiveDistillation(tiny_model, alpha=0.5)
        return CachedFocalInfoNCE(tiny_model, mini_batch_size=3)

    if kind == "distill":
        labels = torch.tensor([[0.9, 0.4, 0.2]] * len(columns[0]))
    calls = _count_forwards(tiny_model)
    plain = make()
    plain(copy.deepcopy(features), labels).backward()
    single = calls[0]
    calls[0] = 0
    wrapped = kalm_matryoshka(tiny_model, make(), dims=dims, weights=weights)
    value = wrapped(copy.deepcopy(features), labels)
    value.backward()
    assert calls[0] == single  # the same forward passes as the unwrapped loss, whatever the number of dims

    with torch.no_grad():
        embeddings = [tiny_model(copy.deepcopy(f))["sentence_embedding"] for f in features]
    reference_loss = make()
    if kind == "cached":
        reference_loss = FocalInfoNCE(tiny_model)
    fn = lambda e: reference_loss.compute_loss_from_embeddings(e, labels)
    expected = _matryoshka_reference(fn, embeddings, dims, weights)
    # float32 loss of ~108, summed in another order (per dim, per chunk): relative tolerance, see _helpers
    torch.testing.assert_close(value.detach(), expected, rtol=LOSS_RTOL, atol=LOSS_ATOL)


def test_cached_matryoshka_equals_uncached_matryoshka(tiny_model, columns) -> None:
    features = featurize(tiny_model, columns)
    plain = kalm_matryoshka(tiny_model, FocalInfoNCE(tiny_model), dims=(64, 32, 16))
    cached = kalm_matryoshka(tiny_model, CachedFocalInfoNCE(tiny_model, mini_batch_size=4), dims=(64, 32, 16))
    assert_same_loss_and_grads(_run(cached, tiny_model, features), _run(plain, tiny_model, features))


def test_kalm_matryoshka_defaults(tiny_model) -> None:
    assert MATRYOSHKA_DIMS == (896, 512, 256, 128, 64) and MATRYOSHKA_WEIGHTS == (1.0, 0.3, 0.2, 0.1, 0.1)
    assert matryoshka_dims_for(896) == MATRYOSHKA_DIMS
    assert matryoshka_dims_for(1024) == (1024, 512, 256, 128, 64)
    assert matryoshka_dims_for(64) == (64,)
    wrapped = kalm_matryoshka(tiny_model, FocalInfoNCE(tiny_model))  # the tiny model is 64-d
    assert wrapped.matryoshka_dims == (64,) and wrapped.matryoshka_weights == (1.0,)
    wrapped = kalm_matryoshka(tiny_model, FocalInfoNCE(tiny_model), dims=[64, 32, 16, 8, 4, 2])
    assert wrapped.matryoshka_weights == (1.0, 0.3, 0.2, 0.1, 0.1, 0.1)
