"""EmbeddingDistillation and in-batch score distillation: hand computations, from-scratch softmax targets,
cached == uncached (Matryoshka included), and a saved student without the projection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from kalm_st.losses import (
    CachedFocalInfoNCE,
    ContrastiveDistillation,
    EmbeddingDistillation,
    FocalInfoNCE,
    functional,
)
from tests.losses._helpers import featurize

TEACHER_DIM = 12  # != the tiny model's 64, so MatryoshkaLoss leaves the labels alone


def test_projection_loss_against_hand_computation(tiny_model) -> None:
    loss = EmbeddingDistillation(tiny_model, FocalInfoNCE(tiny_model), teacher_dim=2, bias=True)
    with torch.no_grad():
        loss.projection.weight.zero_()
        loss.projection.weight[0, 0], loss.projection.weight[1, 1] = 2.0, 1.0
        loss.projection.bias.copy_(torch.tensor([0.0, 1.0]))
    # Two columns, one row; student dims beyond 2 are zero. Projections: (2, 1) and (0, 2).
    s = torch.zeros(2, 1, 64)
    s[0, 0, 0], s[1, 0, 1] = 1.0, 1.0
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # (batch 1, 2 columns, 2)
    cos_a = 2.0 / math.sqrt(5.0)  # cos((2, 1), (1, 0))
    cos_b = 1.0  # cos((0, 2), (0, 3))
    expected_cos = ((1 - cos_a) + (1 - cos_b)) / 2
    got = loss.distillation_loss([s[0], s[1]], teacher)
    assert got.item() == pytest.approx(expected_cos, rel=1e-6)
    loss.metric = "mse"
    expected_mse = (((2 - 1) ** 2 + (1 - 0) ** 2) / 2 + ((0 - 0) ** 2 + (2 - 3) ** 2) / 2) / 2
    assert loss.distillation_loss([s[0], s[1]], teacher).item() == pytest.approx(expected_mse, rel=1e-6)
    # Truncated input (a Matryoshka dim): the first d input columns of the same projection.
    loss.metric = "cosine"
    truncated = [s[0][:, :1], s[1][:, :1]]  # (1,) and (0,) -> projections (2, 1) and (0, 1)
    expected = ((1 - cos_a) + (1 - 1.0)) / 2
    assert loss.distillation_loss(truncated, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_total_is_base_plus_weighted_distillation(tiny_model, columns) -> None:
    features = featurize(tiny_model, columns)
    teacher = torch.randn(len(columns[0]), len(columns), TEACHER_DIM)
    base = FocalInfoNCE(tiny_model)
    loss = EmbeddingDistillation(tiny_model, base, teacher_dim=TEACHER_DIM, weight=0.3, metric="mse")
    with torch.no_grad():
        embeddings = [tiny_model(f)["sentence_embedding"] for f in features]
        w, b = loss.projection.weight, loss.projection.bias
        by_hand = torch.stack([F.mse_loss(e @ w.T + b, teacher[:, c]) for c, e in enumerate(embeddings)]).mean()
        expected = base(features) + 0.3 * by_hand
        torch.testing.assert_close(loss(features, teacher), expected)


def test_bad_teacher_embeddings_are_named(tiny_model, columns) -> None:
    features = featurize(tiny_model, columns)
    loss = EmbeddingDistillation(tiny_model, FocalInfoNCE(tiny_model), teacher_dim=TEACHER_DIM)
    with pytest.raises(ValueError, match=r"teacher's embeddings in the 'label' column"):
        loss(features, torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"have 5 dims, but teacher_dim is 12"):
        loss(features, torch.zeros(6, 4, 5))
    bad = torch.zeros(6, 4, TEACHER_DIM)
    bad[3, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"row 3, column 2 is not finite"):
        loss(features, bad)


def test_in_batch_targets_are_the_softmax_of_the_teacher_similarity_matrix(tiny_model) -> None:
    torch.manual_seed(1)
    batch, num_columns = 3, 3
    student = [torch.randn(batch, 8, dtype=torch.float64) for _ in range(num_columns)]
    teacher = torch.randn(batch, num_columns, 5, dtype=torch.float64)
    ts, tt = 0.05, 0.1
    loss = ContrastiveDistillation(
        tiny_model, FocalInfoNCE(tiny_model), include_in_batch=True, student_temperature=ts, teacher_temperature=tt
    )
    got = loss.distillation_loss(student, teacher)

    # From scratch: candidates are every positive then every negative of the batch.
    def cos_matrix(q, docs):
        return torch.tensor([[F.cosine_similarity(a, d, dim=0).item() for d in docs] for a in q], dtype=q.dtype)

    t_docs = [teacher[i, c] for c in range(1, num_columns) for i in range(batch)]
    s_docs = [student[c][i] for c in range(1, num_columns) for i in range(batch)]
    t = torch.softmax(cos_matrix(teacher[:, 0], t_docs) / tt, dim=1)
    log_u = torch.log_softmax(cos_matrix(student[0], s_docs) / ts, dim=1)
    expected = (t * (t.log() - log_u)).sum(1).mean()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert t.shape == (batch, batch * (num_columns - 1))  # the whole in-batch candidate matrix
    # The per-row mode with teacher embeddings scores each row's own candidates only (the paper's targets).
    paper = ContrastiveDistillation(
        tiny_model, FocalInfoNCE(tiny_model), student_temperature=ts, teacher_temperature=tt
    )
    t_row = torch.stack(
        [cos_matrix(teacher[i, :1], [teacher[i, c] for c in range(1, num_columns)])[0] for i in range(batch)]
    )
    u_row = torch.stack(
        [cos_matrix(student[0][i : i + 1], [student[c][i] for c in range(1, num_columns)])[0] for i in range(batch)]
    )
    t_row, log_u_row = torch.softmax(t_row / tt, 1), torch.log_softmax(u_row / ts, 1)
    expected_row = (t_row * (t_row.log() - log_u_row)).sum(1).mean()
    torch.testing.assert_close(paper.distillation_loss(student, teacher), expected_row, rtol=1e-10, atol=1e-12)


def _loss_and_grads(model, loss, features, labels):
    model.zero_grad()
    loss.zero_grad()
    value = loss(features, labels)
    (0.5 * value).backward()  # an outer factor, as gradient accumulation applies: it must reach the projection too
    grads = {
        n: p.grad.detach().clone()
        for n, p in [*model.named_parameters(), *loss.named_parameters()]
        if p.grad is not None
    }
    return value.detach(), grads


@pytest.mark.parametrize("matryoshka", [False, True])
def test_cached_equals_uncached(tiny_model, columns, matryoshka: bool) -> None:
    tiny_model.train()  # dropout on: GradCache replays it
    features = featurize(tiny_model, columns)
    teacher = torch.randn(len(columns[0]), len(columns), TEACHER_DIM)

    def build(cached: bool):
        base = CachedFocalInfoNCE(tiny_model, mini_batch_size=2) if cached else FocalInfoNCE(tiny_model)
        torch.manual_seed(3)
        loss = EmbeddingDistillation(tiny_model, base, teacher_dim=TEACHER_DIM, weight=0.7)
        return MatryoshkaLoss(tiny_model, loss, [64, 16], [1.0, 0.3]) if matryoshka else loss

    plain, cached = build(False), build(True)
    torch.manual_seed(5)
    value_a, grads_a = _loss_and_grads(tiny_model, plain, features, teacher)
    torch.manual_seed(5)
    value_b, grads_b = _loss_and_grads(tiny_model, cached, features, teacher)
    torch.testing.assert_close(value_a, value_b, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    names = {n.removeprefix("loss.") for n in grads_a if "projection" in n}
    assert names and {n.removeprefix("loss.") for n in grads_b if "projection" in n} == names
    proj_a = {n.removeprefix("loss."): g for n, g in grads_a.items() if "projection" in n}
    proj_b = {n.removeprefix("loss."): g for n, g in grads_b.items() if "projection" in n}
    for name in proj_a:
        torch.testing.assert_close(proj_b[name], proj_a[name], rtol=1e-4, atol=1e-6, msg=name)
    model_a = {n: g for n, g in grads_a.items() if "projection" not in n and not n.startswith("loss.")}
    model_b = {n: g for n, g in grads_b.items() if "projection" not in n and not n.startswith("loss.")}
    for name, grad in model_a.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(model_b[name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


def test_saved_student_has_no_projection_and_loads_in_plain_sentence_transformers(minilm_dir, tmp_path) -> None:
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    loss = EmbeddingDistillation(model, FocalInfoNCE(model), teacher_dim=TEACHER_DIM)
    assert any("projection" in n for n, _ in loss.named_parameters())
    model.save(str(tmp_path / "student"))
    from safetensors.torch import load_file

    names = [k for f in (tmp_path / "student").rglob("*.safetensors") for k in load_file(f)]
    assert names and not any("projection" in n for n in names)
    assert not any(
        p.shape == (TEACHER_DIM, 384)
        for f in (tmp_path / "student").rglob("*.safetensors")
        for p in load_file(f).values()
    )
    modules = (tmp_path / "student" / "modules.json").read_text()
    assert "kalm_st" not in modules
    reloaded = SentenceTransformer(str(tmp_path / "student"), device="cpu")
    torch.testing.assert_close(
        reloaded.encode(["a test"], convert_to_tensor=True), model.encode(["a test"], convert_to_tensor=True)
    )


def test_functional_embedding_distill_rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="metric must be"):
        functional.embedding_distill(torch.zeros(1, 2), torch.zeros(1, 2), "l1")  # type: ignore[arg-type]
