"""Oracle tests of kalm_st.losses.functional against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from kalm_st.losses import functional as KF

# Two queries, four candidates each; query 0's positive is column 0, query 1's is column 2.
LOGITS = [[2.0, 1.0, 0.5, -1.0], [0.3, 0.0, 1.2, 0.9]]
TARGET = [0, 2]


def hand_focal(gamma: float) -> float:
    total = 0.0
    for row, t in zip(LOGITS, TARGET, strict=True):
        z = sum(math.exp(v) for v in row)
        p = math.exp(row[t]) / z
        total += -((1 - p) ** gamma) * math.log(p)
    return total / len(LOGITS)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_hand_computed_two_query_example(gamma: float) -> None:
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    loss = KF.focal_info_nce(logits, torch.tensor(TARGET), gamma)
    assert loss.item() == pytest.approx(hand_focal(gamma), rel=1e-7, abs=1e-7)  # float64 (torch.testing's tolerances)


def test_focal_hand_values_written_out() -> None:
    # p_0 = e^2 / (e^2 + e + e^0.5 + e^-1) = 0.60946, p_1 = e^1.2 / (e^0.3 + 1 + e^1.2 + e^0.9) = 0.40840;
    # gamma 0.5: (0.39054^0.5 * 0.49517 + 0.59160^0.5 * 0.89551) / 2; gamma 2: (0.39054^2 * 0.49517 + 0.59160^2 * 0.89551) / 2
    logits, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET)
    # float64, against 16-digit hand values: torch.testing's float64 tolerances
    assert KF.focal_info_nce(logits, target, 0.5).item() == pytest.approx(0.4991204375881923, rel=1e-7, abs=1e-7)
    assert KF.focal_info_nce(logits, target, 2.0).item() == pytest.approx(0.1944730031032268, rel=1e-7, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_finite_when_positive_dominates(dtype: torch.dtype, gamma: float) -> None:
    # p = 1 - 1e-7: one negative with logit log(1e-7 / (1 - 1e-7)) relative to the positive.
    neg = math.log(1e-7 / (1 - 1e-7))
    logits = torch.tensor([[0.0, neg]], dtype=dtype, requires_grad=True)
    loss = KF.focal_info_nce(logits, torch.tensor([0]), gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    x = float(logits[0, 1].detach())  # the (possibly bf16-rounded) negative logit
    one_minus_p = math.exp(x) / (1 + math.exp(x))
    expected = one_minus_p**gamma * -math.log1p(-one_minus_p)
    # float32 arithmetic (bf16 logits are upcast); exp/log1p kernels differ by ~1 ulp between CPUs: rtol 1e-5
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_naive_focal_is_not_finite_in_bf16() -> None:
    """Control: the textbook (1 - softmax)^gamma breaks where the stable form does not."""
    neg = math.log(1e-7)
    logits = torch.tensor([[0.0, neg]], dtype=torch.bfloat16, requires_grad=True)
    p = logits.softmax(-1)[0, 0]
    naive = -((1 - p) ** 0.5) * torch.log(p)
    naive.backward()
    assert not torch.isfinite(logits.grad).all()


def test_focal_row_without_negatives_is_zero_with_finite_grad() -> None:
    logits = torch.tensor([[3.0]], requires_grad=True)
    loss = KF.focal_info_nce(logits, torch.tensor([0]), 0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()  # exactly: softplus(-inf-like) is 0


def test_kl_matches_hand_computed_example() -> None:
    student = [[0.9, 0.5, 0.1], [0.2, 0.8, 0.4]]
    teacher = [[0.7, 0.6, 0.2], [0.1, 0.3, 0.9]]
    ts, tt = 0.1, 0.2
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        zs = sum(math.exp(v / ts) for v in s_row)
        zt = sum(math.exp(v / tt) for v in t_row)
        u = [math.exp(v / ts) / zs for v in s_row]
        t = [math.exp(v / tt) / zt for v in t_row]
        total += sum(ti * math.log(ti / ui) for ti, ui in zip(t, u, strict=True))
    loss = KF.kl_distill(
        torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64), ts, tt
    )
    assert loss.item() == pytest.approx(total / 2, rel=1e-7, abs=1e-7)  # float64


def test_pairwise_weights_structure_and_beta_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    w = KF.sample_mixing_weights(
        4000, 5, 3, alpha=2.0, mode="pairwise", pair_selection="random", generator=g
    )  # (rows, K, M)
    assert w.shape == (4000, 3, 5)
    assert ((w > 0).sum(-1) == 2).all()  # exactly two distinct sources (a != b)
    torch.testing.assert_close(w.sum(-1), torch.ones(4000, 3))
    lam = w.max(-1).values  # max(lambda, 1 - lambda): folded Beta(2, 2)
    folded = stats.kstest(lam.flatten().numpy()[:3000], lambda x: 2 * stats.beta(2, 2).cdf(x) - 1)
    assert folded.pvalue > 1e-3
    pairs = (w > 0).float().mean((0, 1))
    torch.testing.assert_close(pairs, torch.full((5,), 0.4), atol=0.02, rtol=0)  # uniform pairs: 2/5 each


def test_listwise_weights_are_dirichlet() -> None:
    g = torch.Generator().manual_seed(1)
    w = KF.sample_mixing_weights(3000, 4, 1, alpha=2.0, mode="listwise", pair_selection="random", generator=g)
    torch.testing.assert_close(w.sum(-1), torch.ones(3000, 1))
    # Dirichlet(2,2,2,2) marginal is Beta(2, 6).
    assert stats.kstest(w[:, 0, 0].numpy(), stats.beta(2, 6).cdf).pvalue > 1e-3


def test_hardest_pair_uses_top_two_scores() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.1]])
    w = KF.sample_mixing_weights(
        2, 4, 3, alpha=2.0, mode="pairwise", pair_selection="hardest", generator=g, scores=scores
    )
    assert set((w[0, 0] > 0).nonzero().flatten().tolist()) == {1, 3}
    assert set((w[1, 2] > 0).nonzero().flatten().tolist()) == {0, 2}


def test_mixing_draws_leave_global_rng_alone_and_repeat_with_seed() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = KF.sample_mixing_weights(
        8, 3, 2, alpha=2.0, mode="pairwise", pair_selection="random", generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(torch.get_rng_state(), before)
    b = KF.sample_mixing_weights(
        8, 3, 2, alpha=2.0, mode="pairwise", pair_selection="random", generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a, b)


def test_world_slice_equals_full_draw() -> None:
    full = KF.sample_mixing_weights(
        8, 3, 2, alpha=2.0, mode="pairwise", pair_selection="random", generator=torch.Generator().manual_seed(3)
    )
    half = KF.sample_mixing_weights(
        8,
        3,
        2,
        alpha=2.0,
        mode="pairwise",
        pair_selection="random",
        generator=torch.Generator().manual_seed(3),
        rows=slice(4, 8),
    )
    assert torch.equal(full[4:], half)


def test_synthetic_negatives_unit_norm_in_span_of_sources() -> None:
    torch.manual_seed(0)
    negatives = torch.randn(5, 4, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    w = KF.sample_mixing_weights(5, 4, 3, alpha=2.0, mode="pairwise", pair_selection="random", generator=g)
    mixed = KF.mix_hard_negatives(negatives, w)
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(5, 3, dtype=torch.float64))
    for i in range(5):
        for k in range(3):
            a, b = (w[i, k] > 0).nonzero().flatten().tolist()
            basis = torch.stack([negatives[i, a], negatives[i, b]], dim=1)  # (d, 2)
            coef = torch.linalg.lstsq(basis, mixed[i, k, :, None]).solution
            torch.testing.assert_close(basis @ coef, mixed[i, k, :, None], atol=1e-10, rtol=0)
            # the coefficients are proportional to (lambda_a, lambda_b)
            ratio = (coef[0] / coef[1]).item()
            assert ratio == pytest.approx((w[i, k, a] / w[i, k, b]).item(), rel=1e-6)


def test_check_teacher_scores_errors_name_the_row() -> None:
    with pytest.raises(ValueError, match="row 1 have 2 values"):
        KF.check_teacher_scores([[1.0, 0.5, 0.2], [1.0, 0.5]], 2, 3, "X")  # ragged
    with pytest.raises(ValueError, match=r"row 1, candidate 2 \(negative_2\) is nan"):
        KF.check_teacher_scores(torch.tensor([[1.0, 0.5, 0.2], [1.0, 0.5, float("nan")]]), 2, 3, "X")
    with pytest.raises(ValueError, match="have 4 values; expected 3 scores"):
        KF.check_teacher_scores(torch.zeros(2, 4), 2, 3, "X")
    with pytest.raises(ValueError, match="'label' column"):
        KF.check_teacher_scores(None, 2, 3, "X")
    with pytest.raises(ValueError, match="3 rows, but the batch has 2"):
        KF.check_teacher_scores(torch.zeros(3, 3), 2, 3, "X")
