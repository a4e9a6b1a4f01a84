"""FocalInfoNCE and HardNegativeMixing on the tiny model, against sentence-transformers and explicit formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from kalm_st.losses import FocalInfoNCE, HardNegativeMixing
from tests.losses._helpers import featurize, params_grads


def _loss_and_grads(loss, model, features):
    model.zero_grad()
    value = loss(copy.deepcopy(features), None)
    value.backward()
    return value.detach(), params_grads(model)


@pytest.mark.parametrize("gather", [False, True])
def test_gamma_zero_equals_mnrl_loss_and_every_gradient(tiny_model, columns, gather: bool) -> None:
    features = featurize(tiny_model, columns)  # anchor, positive, 2 hard-negative columns
    ours, ours_grads = _loss_and_grads(
        FocalInfoNCE(tiny_model, temperature=0.05, gamma=0.0, gather_across_devices=gather), tiny_model, features
    )
    ref, ref_grads = _loss_and_grads(MultipleNegativesRankingLoss(tiny_model, scale=20.0), tiny_model, features)
    # The same float32 operations as MNRL (equal on every CPU tried): torch.testing's float32 tolerances.
    torch.testing.assert_close(ours, ref)
    assert ours_grads.keys() == ref_grads.keys() and len(ref_grads) > 0
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, msg=name)


def test_focal_gamma_matches_explicit_formula_on_embeddings(tiny_model, columns) -> None:
    torch.manual_seed(0)
    emb = [F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1) for _ in range(4)]
    q, docs = emb[0], torch.cat(emb[1:])
    p = torch.softmax(q @ docs.T / 0.02, dim=-1).diagonal()  # positive of row i is docs[i]
    expected = (-((1 - p) ** 2.0) * p.log()).mean()
    got = FocalInfoNCE(tiny_model, temperature=0.02, gamma=2.0).compute_loss_from_embeddings(emb, None)
    torch.testing.assert_close(got, expected)  # float64 on both sides: float64 tolerances


def test_without_in_batch_negatives_uses_own_candidates_only(tiny_model) -> None:
    torch.manual_seed(0)
    emb = [F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1) for _ in range(4)]
    q = emb[0]
    own = torch.stack([(q * e).sum(-1) for e in emb[1:]], dim=1) / 0.05  # (5, 3): positive, n1, n2
    expected = F.cross_entropy(own, torch.zeros(5, dtype=torch.long))
    loss = FocalInfoNCE(tiny_model, temperature=0.05, gamma=0.0, in_batch_negatives=False)
    torch.testing.assert_close(loss.compute_loss_from_embeddings(emb, None), expected)  # float64


def test_zero_synthetic_negatives_equals_no_mixing(tiny_model) -> None:
    torch.manual_seed(0)
    emb = [torch.randn(6, 8) for _ in range(4)]
    plain = FocalInfoNCE(tiny_model).compute_loss_from_embeddings(emb)
    mixed = FocalInfoNCE(tiny_model, hard_negative_mixing=HardNegativeMixing(num_mixed_negatives=0))
    assert torch.equal(mixed.compute_loss_from_embeddings(emb), plain)  # the same code path: bitwise


def test_mixing_adds_own_synthetic_logits(tiny_model) -> None:
    """Explicit reference: the synthetic negatives (rebuilt from the drawn weights) join each row's denominator."""
    torch.manual_seed(0)
    emb = [F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1) for _ in range(5)]  # 3 hard negatives
    mixing = HardNegativeMixing(num_mixed_negatives=2, seed=5)
    loss = FocalInfoNCE(tiny_model, temperature=0.05, gamma=0.5, hard_negative_mixing=mixing)
    got = loss.compute_loss_from_embeddings(emb)
    w = HardNegativeMixing(num_mixed_negatives=2, seed=5).draw(emb[0], torch.stack(emb[2:], 1))  # same draw
    q, docs, negs = emb[0], torch.cat(emb[1:]), torch.stack(emb[2:], 1)
    synth = torch.einsum("nkm,nmd->nkd", w.double(), negs)
    synth = synth / synth.norm(dim=-1, keepdim=True)
    logits = torch.cat([q @ docs.T, torch.einsum("nd,nkd->nk", q, synth)], dim=1) / 0.05
    p = torch.softmax(logits, dim=-1).diagonal()
    torch.testing.assert_close(got, (-((1 - p) ** 0.5) * p.log()).mean())  # float64
    assert got.item() > FocalInfoNCE(tiny_model, temperature=0.05).compute_loss_from_embeddings(emb).item()


@pytest.mark.parametrize("detach", [True, False])
def test_detached_mixing_passes_no_gradient_through_synthetic_negatives(detach: bool) -> None:
    negatives = torch.randn(3, 4, 8, requires_grad=True)
    mixing = HardNegativeMixing(detach=detach)
    weights = mixing.draw(torch.randn(3, 8), negatives.detach())
    synthetic = mixing.apply(negatives, weights)
    assert synthetic.requires_grad is (not detach)
    if not detach:
        (grad,) = torch.autograd.grad(synthetic.sum(), negatives)
        assert grad.abs().sum() > 0


def test_fixed_seed_gives_identical_losses(tiny_model) -> None:
    torch.manual_seed(0)
    emb = [torch.randn(6, 8) for _ in range(4)]

    def run(seed: int) -> list[float]:
        loss = FocalInfoNCE(tiny_model, hard_negative_mixing=HardNegativeMixing(seed=seed))
        return [loss.compute_loss_from_embeddings(emb).item() for _ in range(3)]

    assert run(1) == run(1)  # the seed promises identical draws, hence identical operations: bitwise
    assert run(1) != run(2)
    first = run(1)
    assert len(set(first)) == 3  # the generator advances between steps


@pytest.mark.parametrize("mode,selection", [("listwise", "random"), ("pairwise", "hardest")])
def test_mixing_variants_run_and_backpropagate(tiny_model, columns, mode: str, selection: str) -> None:
    mixing = HardNegativeMixing(mode=mode, pair_selection=selection, detach=False)
    loss = FocalInfoNCE(tiny_model, hard_negative_mixing=mixing)
    value = loss(featurize(tiny_model, columns), None)
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in params_grads(tiny_model).values())


def test_bad_inputs_raise_clear_value_errors(tiny_model) -> None:
    with pytest.raises(ValueError, match="gamma"):
        FocalInfoNCE(tiny_model, gamma=-0.1)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            FocalInfoNCE(tiny_model, temperature=bad)
    with pytest.raises(ValueError, match="alpha"):
        HardNegativeMixing(alpha=0)
    with pytest.raises(ValueError, match="num_mixed_negatives"):
        HardNegativeMixing(num_mixed_negatives=-1)
    with pytest.raises(ValueError, match="mode"):
        HardNegativeMixing(mode="triplet")  # type: ignore[arg-type]
    emb = [torch.randn(3, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="got 1 column"):
        FocalInfoNCE(tiny_model).compute_loss_from_embeddings(emb[:1])
    with pytest.raises(ValueError, match="at least 2 hard-negative columns"):
        FocalInfoNCE(tiny_model, hard_negative_mixing=HardNegativeMixing()).compute_loss_from_embeddings(emb)
    with pytest.raises(ValueError, match="at least one negative column"):
        FocalInfoNCE(tiny_model, in_batch_negatives=False).compute_loss_from_embeddings(emb[:2])
    with pytest.raises(ValueError, match="same number of rows"):
        FocalInfoNCE(tiny_model).compute_loss_from_embeddings([torch.randn(3, 8), torch.randn(2, 8)])


def test_config_scale_and_citation(tiny_model) -> None:
    loss = FocalInfoNCE(tiny_model, temperature=0.02, hard_negative_mixing=HardNegativeMixing(alpha=3.0))
    assert loss.scale == pytest.approx(50.0)
    config = loss.get_config_dict()
    assert config["temperature"] == 0.02 and config["gamma"] == 0.5 and config["similarity_fct"] == "cos_sim"
    assert config["hard_negative_mixing"]["alpha"] == 3.0
    assert "zhao2026iclr-kalmembeddingv2" in loss.citation
    assert "Focal Loss for Dense Object Detection" in loss.citation
    assert "Hard Negative Mixing for Contrastive Learning" in loss.citation
    assert "Hard Negative Mixing" not in FocalInfoNCE(tiny_model).citation
