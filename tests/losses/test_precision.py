"""Every logit and mixing path computes in at least float32, with bf16 embeddings (issue 16, item 4).

The references are computed from scratch in float64 from the very same bf16 values (upcast exactly), so the only
difference left is the arithmetic of the code under test. At tau = 0.01 and d = 896 bf16 arithmetic is off by
~0.05-0.2 per logit (the spacing of bf16 at 32-64 is 0.25); float32 arithmetic is off by ~1e-5 at most.

Tolerances: logits are ~10-100 (cosine / 0.01); float32 accumulation over d = 896 terms then scaling by 100
leaves |error| < 1e-4 (measured max 2e-5), so ``rtol=1e-5, atol=1e-4``. Losses are O(1-10) and inherit that:
``rtol=1e-5, atol=1e-5``. Both are >= 100x tighter than the bf16 errors these tests exist to catch.
"""

from __future__ import annotations

import math

import pytest
import torch
from sentence_transformers import util

from kalm_st.losses import ContrastiveDistillation, FocalInfoNCE, HardNegativeMixing
from kalm_st.losses import functional as KF

TAU = 0.01
DIM = 896
LOGIT_TOL = dict(rtol=1e-5, atol=1e-4)
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)


def _bf16_columns(num_rows: int, num_columns: int, seed: int = 0) -> list[torch.Tensor]:
    """(anchor, positive, negative_1, ...) in bf16, with cosines to the anchor around 0.3-0.5 (logits 30-50)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_rows, DIM, generator=g)
    columns = [q]
    for k in range(num_columns - 1):
        weight = 0.9 - 0.1 * k  # positive most similar
        columns.append(weight * q + 1.3 * torch.randn(num_rows, DIM, generator=g))
    return [torch.nn.functional.normalize(c, dim=-1).to(torch.bfloat16) for c in columns]


def _cos64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of every row of ``a`` (..., d) with ``b`` (..., d) in float64, from scratch."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _focal64(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    p = torch.softmax(logits.double(), dim=-1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - p) ** gamma) * p.log()).mean()


def _bf16_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A user's similarity function that computes in its inputs' dtype (not in float32 as ST's do)."""
    return a @ b.T


@pytest.mark.parametrize("name", ["cos_sim", "dot_score", "custom"])
def test_rowwise_logits_of_bf16_embeddings_match_float64(name: str) -> None:
    q, *docs = _bf16_columns(8, 5)
    candidates = torch.stack(docs, dim=1)  # (8, 4, 896)
    fct = {"cos_sim": util.cos_sim, "dot_score": util.dot_score, "custom": _bf16_dot}[name]
    got = KF.rowwise_logits(q, candidates, 1 / TAU, fct)
    # the inputs are unit vectors up to bf16 rounding: dot = cos * |q| |c| exactly in float64
    expected = _cos64(q[:, None], candidates) / TAU
    if name != "cos_sim":
        expected = expected * q.double().norm(dim=-1)[:, None] * candidates.double().norm(dim=-1)
    print(f"{name}: got {got[0].tolist()}, float64 {expected[0].tolist()}")
    torch.testing.assert_close(got.double(), expected, **LOGIT_TOL)
    assert got.dtype in (torch.float32, torch.float64)


def test_similarity_logits_of_a_bf16_similarity_function_are_float32() -> None:
    q, *docs = _bf16_columns(8, 3)
    got = KF.similarity_logits(q, torch.cat(docs), 1 / TAU, _bf16_dot)
    expected = q.double() @ torch.cat(docs).double().T / TAU
    torch.testing.assert_close(got.double(), expected, **LOGIT_TOL)
    assert got.dtype == torch.float32


def test_classification_mode_loss_of_bf16_embeddings_matches_float64(tiny_model) -> None:
    """in_batch_negatives=False (classification mode): each row's own positive and hard negatives only."""
    q, *docs = _bf16_columns(8, 5)
    loss = FocalInfoNCE(tiny_model, temperature=TAU, gamma=0.5, in_batch_negatives=False)
    got = loss.compute_loss_from_embeddings([q, *docs])
    logits = _cos64(q[:, None], torch.stack(docs, dim=1)) / TAU
    expected = _focal64(logits, torch.zeros(8, dtype=torch.long), 0.5)
    print(f"classification loss: got {got.item()}, float64 {expected.item()}")
    torch.testing.assert_close(got.double(), expected, **LOSS_TOL)


def test_mixed_negatives_of_bf16_embeddings_match_float64() -> None:
    _, *docs = _bf16_columns(8, 5)
    negatives = torch.stack(docs[1:], dim=1)  # (8, 3, 896)
    g = torch.Generator().manual_seed(0)
    w = KF.sample_mixing_weights(8, 3, 2, alpha=2.0, mode="pairwise", pair_selection="random", generator=g)
    got = KF.mix_hard_negatives(negatives, w)
    blend = torch.einsum("nkm,nmd->nkd", w.double(), negatives.double())
    expected = blend / blend.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)  # unit vectors: entries ~0.03
    assert got.dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize("in_batch", [True, False])
def test_focal_loss_with_mixing_of_bf16_embeddings_matches_float64(tiny_model, in_batch: bool) -> None:
    q, *docs = _bf16_columns(8, 5)
    mixing = HardNegativeMixing(num_mixed_negatives=2, seed=5)
    loss = FocalInfoNCE(
        tiny_model, temperature=TAU, gamma=0.5, in_batch_negatives=in_batch, hard_negative_mixing=mixing
    )
    got = loss.compute_loss_from_embeddings([q, *docs])
    w = HardNegativeMixing(num_mixed_negatives=2, seed=5).draw(q, torch.stack(docs[1:], 1))  # the same draw
    blend = torch.einsum("nkm,nmd->nkd", w.double(), torch.stack(docs[1:], 1).double())
    synthetic = _cos64(q[:, None], blend) / TAU
    if in_batch:
        own = _cos64(q[:, None], torch.cat(docs)[None]) / TAU  # (8, 32) in the loss's column layout
        target = torch.arange(8)
    else:
        own = _cos64(q[:, None], torch.stack(docs, dim=1)) / TAU
        target = torch.zeros(8, dtype=torch.long)
    expected = _focal64(torch.cat([own, synthetic], dim=1), target, 0.5)
    print(f"mixing loss (in_batch={in_batch}): got {got.item()}, float64 {expected.item()}")
    torch.testing.assert_close(got.double(), expected, **LOSS_TOL)


def test_distillation_student_scores_of_bf16_embeddings_match_float64(tiny_model) -> None:
    q, *docs = _bf16_columns(8, 4)
    teacher = torch.tensor([[0.62, 0.41, 0.35]] * 8)
    loss = ContrastiveDistillation(tiny_model, FocalInfoNCE(tiny_model, temperature=TAU))  # tau_S = tau_T = 0.01
    got = loss.distillation_loss([q, *docs], teacher)
    student = _cos64(q[:, None], torch.stack(docs, dim=1))
    log_u = torch.log_softmax(student / TAU, dim=-1)
    log_t = torch.log_softmax(teacher.double() / TAU, dim=-1)
    expected = (log_t.exp() * (log_t - log_u)).sum(-1).mean()
    print(f"KD term: got {got.item()}, float64 {expected.item()}")
    torch.testing.assert_close(got.double(), expected, **LOSS_TOL)


def test_hardest_pair_selection_of_bf16_embeddings_uses_float64_order() -> None:
    """Hard negatives whose cosines differ by ~1e-3 (under bf16's spacing near 0.5, 2^-9): the top two by the
    float64 cosine must be the ones mixed."""
    g = torch.Generator().manual_seed(1)
    num_rows, num_negatives = 64, 4
    q = torch.nn.functional.normalize(torch.randn(num_rows, DIM, generator=g), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(num_rows, num_negatives, DIM, generator=g), dim=-1)
    negatives = 0.5 * q[:, None] + 0.866 * noise + 0.02 * torch.randn(num_rows, num_negatives, DIM, generator=g)
    q, negatives = q.to(torch.bfloat16), negatives.to(torch.bfloat16)
    exact = _cos64(q[:, None], negatives)
    expected = exact.topk(2, dim=-1).indices.sort(dim=-1).values
    assert (exact.sort(dim=-1).values.diff(dim=-1).min(dim=-1).values > 1e-6).all()  # no float64 ties
    w = HardNegativeMixing(num_mixed_negatives=1, pair_selection="hardest").draw(q, negatives)
    chosen = (w[:, 0] > 0).nonzero()[:, 1].view(num_rows, 2)
    wrong = int((chosen != expected).any(dim=-1).sum())
    assert wrong == 0, f"{wrong} of {num_rows} rows mix another pair than the float64 top two"


@pytest.mark.parametrize("in_batch", [True, False])
def test_focal_loss_under_cpu_bf16_autocast_stays_float32(tiny_model, in_batch: bool) -> None:
    """float32 embeddings inside a bf16 autocast region (as a user's training loop may have): the similarity products
    must not be autocast to bf16."""
    columns = [c.float() for c in _bf16_columns(8, 4)]
    loss = FocalInfoNCE(tiny_model, temperature=TAU, gamma=0.5, in_batch_negatives=in_batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss.compute_loss_from_embeddings(columns)
    q, docs = columns[0], columns[1:]
    if in_batch:
        logits, target = _cos64(q[:, None], torch.cat(docs)[None]) / TAU, torch.arange(8)
    else:
        logits, target = _cos64(q[:, None], torch.stack(docs, 1)) / TAU, torch.zeros(8, dtype=torch.long)
    torch.testing.assert_close(got.double(), _focal64(logits, target, 0.5), **LOSS_TOL)


def test_reference_helpers_are_exact_on_a_hand_example() -> None:
    """The float64 helpers themselves, on vectors with known cosines (0.8 and 0.6)."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[[0.8, 0.6], [0.6, 0.8]]], dtype=torch.float64)
    torch.testing.assert_close(_cos64(q[:, None], c), torch.tensor([[0.8, 0.6]], dtype=torch.float64))
    p = math.exp(80) / (math.exp(80) + math.exp(60))
    assert _focal64(torch.tensor([[80.0, 60.0]]), torch.tensor([0]), 0.5).item() == pytest.approx(
        -((1 - p) ** 0.5) * math.log(p), rel=1e-12
    )
