"""ContrastiveDistillation: zero loss on self-distillation, a hand KL, DistillKLDivLoss parity, bad labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
from sentence_transformers.util import pairwise_cos_sim

from kalm_st.losses import ContrastiveDistillation, FocalInfoNCE
from tests.losses._helpers import featurize


def _student_scores(embeddings):
    q = F.normalize(embeddings[0], dim=-1)
    return torch.stack([(q * F.normalize(d, dim=-1)).sum(-1) for d in embeddings[1:]], dim=1)


def test_self_distillation_gives_zero_loss_and_zero_gradient(tiny_model, columns) -> None:
    tiny_model.double()  # float64, so "zero" means zero rather than float32 rounding of 1/tau-scaled gradients
    features = featurize(tiny_model, columns)
    loss = ContrastiveDistillation(tiny_model, student_temperature=0.05, teacher_temperature=0.05)
    embeddings = [tiny_model(f)["sentence_embedding"] for f in features]
    teacher = _student_scores(embeddings).detach()  # the student's own scores, at equal temperatures
    kd = loss.distillation_loss(embeddings, teacher)
    assert abs(kd.item()) < 1e-12
    kd.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) < 1e-10


def test_in_batch_self_distillation_with_teacher_embeddings_is_zero(tiny_model) -> None:
    torch.manual_seed(0)
    embeddings = [torch.randn(4, 8) for _ in range(4)]
    teacher_embeddings = torch.stack(embeddings, dim=1)  # (batch, 2 + n, d): the student is its own teacher
    loss = ContrastiveDistillation(tiny_model, include_in_batch=True)
    # both sides are the same float32 operations on the same values: the KL is 0 up to the last few bits
    assert abs(loss.distillation_loss(embeddings, teacher_embeddings).item()) < 1e-6
    with pytest.raises(ValueError, match=r"teacher's embeddings"):
        loss.distillation_loss(embeddings, torch.zeros(4, 3))


def test_hand_computed_kl_and_total(tiny_model) -> None:
    # Unit vectors with known cosines to the query: positive 0.8, negative 0.6.
    q = torch.tensor([[1.0, 0.0]])
    pos, neg = torch.tensor([[0.8, 0.6]]), torch.tensor([[0.6, 0.8]])
    teacher = torch.tensor([[0.5, 0.3]])
    ts, tt = 0.1, 0.2
    u = [math.exp(0.8 / ts), math.exp(0.6 / ts)]
    t = [math.exp(0.5 / tt), math.exp(0.3 / tt)]
    u = [x / sum(u) for x in u]
    t = [x / sum(t) for x in t]
    kl = sum(ti * math.log(ti / ui) for ti, ui in zip(t, u, strict=True))
    loss = ContrastiveDistillation(
        tiny_model,
        FocalInfoNCE(tiny_model, temperature=0.1, gamma=0.0),
        alpha=2.0,
        student_temperature=ts,
        teacher_temperature=tt,
    )
    # float32 embeddings and scores at 1/tau = 10: relative tolerance 1e-5 (the KD term is ~0.08)
    assert loss.distillation_loss([q, pos, neg], teacher).item() == pytest.approx(kl, rel=1e-5, abs=1e-6)
    # batch of one: the InfoNCE term is -log softmax([0.8, 0.6] / 0.1)[0]
    infonce = -math.log(math.exp(8) / (math.exp(8) + math.exp(6)))
    assert loss.compute_loss_from_embeddings([q, pos, neg], teacher).item() == pytest.approx(
        infonce + 2 * kl, rel=1e-5, abs=1e-6
    )


def test_kd_term_equals_sentence_transformers_distill_kl_div_loss(tiny_model) -> None:
    torch.manual_seed(0)
    embeddings = [torch.randn(5, 8) for _ in range(4)]
    teacher = torch.rand(5, 3)
    ts, tt = 0.05, 0.1
    ours = ContrastiveDistillation(tiny_model, student_temperature=ts, teacher_temperature=tt)
    st = DistillKLDivLoss(tiny_model, similarity_fct=pairwise_cos_sim, student_temperature=ts, teacher_temperature=tt)
    expected = st.compute_loss_from_embeddings(embeddings, teacher) / ts**2
    # float32, other operations than ours (pairwise cosines, KLDivLoss, the tau^2 factor): rtol 1e-5
    torch.testing.assert_close(ours.distillation_loss(embeddings, teacher), expected, rtol=1e-5, atol=1e-6)


def test_default_temperatures_follow_the_base_loss(tiny_model) -> None:
    loss = ContrastiveDistillation(tiny_model, FocalInfoNCE(tiny_model, temperature=0.02))
    assert loss.student_temperature == 0.02 and loss.teacher_temperature == 0.02
    config = loss.get_config_dict()
    assert config["alpha"] == 1.0 and config["gamma"] == 0.5 and config["base_loss"] == "FocalInfoNCE"
    assert "zhao2026iclr-kalmembeddingv2" in loss.citation


def test_bad_teacher_scores_raise_naming_the_row(tiny_model) -> None:
    embeddings = [torch.randn(3, 8) for _ in range(4)]  # anchor, positive, 2 negatives -> 3 scores per row
    loss = ContrastiveDistillation(tiny_model)
    with pytest.raises(ValueError, match="row 2 have 2 values"):
        loss.compute_loss_from_embeddings(embeddings, [[1, 0, 0], [1, 0, 0], [1, 0]])
    with pytest.raises(ValueError, match=r"row 1, candidate 0 \(positive\) is nan"):
        loss.compute_loss_from_embeddings(embeddings, torch.tensor([[1, 0, 0], [float("nan"), 0, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match="have 2 values; expected 3 scores"):
        loss.compute_loss_from_embeddings(embeddings, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'label' column"):
        loss.compute_loss_from_embeddings(embeddings, None)
    with pytest.raises(ValueError, match="teacher_temperature"):
        ContrastiveDistillation(tiny_model, teacher_temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveDistillation(tiny_model, alpha=-1.0)
    with pytest.raises(ValueError, match="got 1 column"):
        loss.compute_loss_from_embeddings(embeddings[:1], torch.zeros(3, 0))
