"""The optional false-negative mask of FocalInfoNCE (issue 16, beyond the paper), against hand-built masked softmaxes.

The oracle drops candidate c from row i's denominator when it is the same text as row i's positive (decided here by
comparing the strings, or hand-given ids) or when ``s(q_i, c) > s(q_i, p_i) + margin``, then computes the focal
InfoNCE with Python loops in float64.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
from sentence_transformers.util import pairwise_cos_sim

from kalm_st.losses import (
    CachedFocalInfoNCE,
    ContrastiveDistillation,
    FalseNegativeLoggingCallback,
    FocalInfoNCE,
    HardNegativeMixing,
    kalm_matryoshka,
)
from kalm_st.losses import functional as KF
from tests.losses._helpers import (
    ANCHORS,
    NEGATIVES_1,
    NEGATIVES_2,
    POSITIVES,
    assert_same_loss_and_grads,
    duplicate_columns,
    featurize,
    params_grads,
    trecqa_rows,
)

TAU = 0.05


def oracle_loss(
    q: torch.Tensor,
    candidates: list[list[torch.Tensor]],
    candidate_texts: list[list[object]],
    target: list[int],
    positive_texts: list[object],
    gamma: float,
    margin: float | None,
) -> tuple[float, int]:
    """Masked focal InfoNCE by loops: row i scores ``candidates[i]`` (cosine / TAU); returns (loss, masked count)."""
    total, masked = 0.0, 0
    for i, row in enumerate(candidates):
        sims = [float(F.cosine_similarity(q[i].double(), c.double(), dim=0)) for c in row]
        s_pos = sims[target[i]]
        kept = []
        for c, s in enumerate(sims):
            duplicate = candidate_texts[i][c] is not None and candidate_texts[i][c] == positive_texts[i]
            too_similar = margin is not None and s > s_pos + margin
            if c != target[i] and (duplicate or too_similar):
                masked += 1
            else:
                kept.append(s / TAU)
        z = sum(math.exp(v - s_pos / TAU) for v in kept)  # relative to the positive: no overflow at 1/TAU
        p = 1.0 / z
        total += -((1 - p) ** gamma) * math.log(p)
    return total / len(candidates), masked


def in_batch_layout(q, docs, texts):
    """Every row sees [positives, negative_1s, ...] of the whole batch (FocalInfoNCE's in-batch layout)."""
    flat = [d[j] for d in docs for j in range(q.size(0))]
    flat_texts = [t[j] for t in texts for j in range(q.size(0))]
    n = q.size(0)
    return [flat] * n, [flat_texts] * n, list(range(n))


def own_layout(q, docs, texts):
    """Each row sees its own [positive, negative_1, ...]."""
    n = q.size(0)
    return [[d[i] for d in docs] for i in range(n)], [[t[i] for t in texts] for i in range(n)], [0] * n


def _synthetic_embeddings():
    """4 rows of (anchor, positive, negative_1, negative_2), float64, with one duplicate and one near-positive:
    negative_1 of row 1 is row 0's positive (same text id 0); negative_2 of row 2 is almost row 2's anchor."""
    g = torch.Generator().manual_seed(0)
    emb = [F.normalize(torch.randn(4, 16, generator=g, dtype=torch.float64), dim=-1) for _ in range(4)]
    emb[1] = F.normalize(emb[1] + 0.8 * emb[0], dim=-1)  # positives resemble their anchors
    emb[2][1] = emb[1][0]
    emb[3][2] = F.normalize(emb[0][2] + 0.05 * emb[3][2], dim=-1)
    text_ids = [[0, 1, 2, 3], [4, 0, 5, 6], [7, 8, 9, 10]]  # positive, negative_1, negative_2
    return emb, text_ids


def test_mask_function_on_a_hand_example() -> None:
    logits = torch.tensor([[5.0, 4.0, 5.5, 7.0], [1.0, 3.0, 2.0, 2.9]])
    target = torch.tensor([0, 1])
    # margin 0.1 at scale 10: masked above positive + 1 -> row 0: column 3 (7 > 6); row 1: none (4.0 needed)
    only_margin = KF.false_negative_mask(logits, target, margin=0.1, scale=10.0)
    assert only_margin.tolist() == [[False, False, False, True], [False, False, False, False]]
    # same text as the positive: row 0's positive is text 10 (also column 3), row 1's is text 20 (also column 2)
    keys = torch.tensor([10, 11, 20, 10])
    both = KF.false_negative_mask(
        logits, target, margin=0.1, scale=10.0, positive_keys=torch.tensor([10, 20]), candidate_keys=keys
    )
    assert both.tolist() == [[False, False, False, True], [False, False, True, False]]
    # per-row keys; -1 (no text) never matches; the positive itself is never masked, even at margin 0
    per_row = torch.tensor([[7, 7, -1, 3], [5, 5, 5, -1]])
    mask = KF.false_negative_mask(
        logits, target, margin=0.0, scale=10.0, positive_keys=torch.tensor([7, 5]), candidate_keys=per_row
    )
    assert mask.tolist() == [[False, True, True, True], [True, False, True, False]]


def test_fingerprints_equal_exactly_for_equal_texts(tiny_model) -> None:
    texts = ANCHORS + POSITIVES + NEGATIVES_1 + NEGATIVES_2  # some sentences recur across the lists
    features = tiny_model.preprocess(texts)
    keys = KF.text_fingerprints(features["input_ids"], features["attention_mask"]).tolist()
    for a in range(len(texts)):
        for b in range(len(texts)):
            assert (keys[a] == keys[b]) == (texts[a] == texts[b]), (texts[a], texts[b])
    assert min(keys) >= 0
    # the same text in another batch (other padded length) and left-padded gets the same fingerprint
    alone = tiny_model.preprocess([texts[0]])
    assert KF.text_fingerprints(alone["input_ids"], alone["attention_mask"]).item() == keys[0]
    ids, attention = features["input_ids"], features["attention_mask"]
    length = int(attention[0].sum())
    left_ids = torch.cat([ids[0, length:], ids[0, :length]])[None]  # padding moved to the front
    left_mask = torch.cat([attention[0, length:], attention[0, :length]])[None]
    assert KF.text_fingerprints(left_ids, left_mask).item() == keys[0]
    # a text and the same text with one more token differ
    longer = torch.cat([ids[0, :length], ids[0, :1]])[None]
    assert KF.text_fingerprints(longer).item() != keys[0]


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_masked_loss_equals_hand_built_masked_softmax(tiny_model, in_batch: bool, gamma: float) -> None:
    emb, text_ids = _synthetic_embeddings()
    q, docs = emb[0], emb[1:]
    loss = FocalInfoNCE(
        tiny_model, temperature=TAU, gamma=gamma, in_batch_negatives=in_batch, false_negative_mask=True
    )
    keys = [torch.tensor(t) for t in text_ids]
    got = loss.compute_loss_from_embeddings(emb, text_keys=keys)
    layout = in_batch_layout if in_batch else own_layout
    rows, row_texts, target = layout(q, docs, text_ids)
    expected, masked = oracle_loss(q, rows, row_texts, target, text_ids[0], gamma, margin=0.1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert int(loss.last_false_negative_count) == masked
    # both rules fired: row 0 loses its duplicate (in-batch only: it is row 1's negative), row 2 its near-positive
    _, duplicates_only = oracle_loss(q, rows, row_texts, target, text_ids[0], gamma, margin=None)
    assert duplicates_only == (1 if in_batch else 0) and masked > duplicates_only
    unmasked = FocalInfoNCE(tiny_model, temperature=TAU, gamma=gamma, in_batch_negatives=in_batch)
    assert unmasked.compute_loss_from_embeddings(emb).item() > got.item()  # the mask removes denominator terms


def test_masked_loss_with_mixing_equals_hand_built_masked_softmax(tiny_model) -> None:
    """Synthetic negatives have no text: the margin rule alone may mask them."""
    emb, text_ids = _synthetic_embeddings()
    q, docs = emb[0], emb[1:]
    mixing = HardNegativeMixing(num_mixed_negatives=2, seed=5)
    loss = FocalInfoNCE(tiny_model, temperature=TAU, gamma=0.5, hard_negative_mixing=mixing, false_negative_mask=True)
    got = loss.compute_loss_from_embeddings(emb, text_keys=[torch.tensor(t) for t in text_ids])
    w = HardNegativeMixing(num_mixed_negatives=2, seed=5).draw(q, torch.stack(docs[1:], 1))
    synthetic = F.normalize(torch.einsum("nkm,nmd->nkd", w.double(), torch.stack(docs[1:], 1)), dim=-1)
    rows, row_texts, target = in_batch_layout(q, docs, text_ids)
    rows = [row + list(synthetic[i]) for i, row in enumerate(rows)]
    row_texts = [texts + [None, None] for texts in row_texts]
    expected, masked = oracle_loss(q, rows, row_texts, target, text_ids[0], 0.5, margin=0.1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert int(loss.last_false_negative_count) == masked


@pytest.mark.parametrize("in_batch", [True, False])
def test_forward_masks_duplicate_texts_of_the_positive(tiny_model, in_batch: bool) -> None:
    """Through forward: the fingerprints come from the tokenised columns; the oracle compares the strings."""
    columns = duplicate_columns()
    features = featurize(tiny_model, columns)
    margin = 0.002  # the tiny random model's cosines are all close: a small margin makes rule (b) fire sometimes
    loss = FocalInfoNCE(
        tiny_model,
        temperature=TAU,
        in_batch_negatives=in_batch,
        false_negative_mask=True,
        false_negative_margin=margin,
    )
    got = loss(copy.deepcopy(features), None)
    with torch.no_grad():
        emb = [tiny_model(copy.deepcopy(f))["sentence_embedding"] for f in features]
    layout = in_batch_layout if in_batch else own_layout
    rows, row_texts, target = layout(emb[0], emb[1:], columns[1:])
    expected, masked = oracle_loss(emb[0], rows, row_texts, target, columns[1], 0.5, margin=margin)
    torch.testing.assert_close(
        got.detach().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    _, duplicates = oracle_loss(emb[0], rows, row_texts, target, columns[1], 0.5, margin=None)
    assert duplicates == (3 if in_batch else 1)
    assert int(loss.last_false_negative_count) == masked > duplicates


def _loss_and_grads(loss, model, features, labels=None):
    model.zero_grad()
    value = loss(copy.deepcopy(features), labels)
    value.backward()
    return value.detach(), params_grads(model)


@pytest.mark.parametrize("in_batch", [True, False])
def test_cached_masked_loss_equals_uncached(tiny_model, in_batch: bool) -> None:
    features = featurize(tiny_model, duplicate_columns())
    kwargs = dict(temperature=TAU, in_batch_negatives=in_batch, false_negative_mask=True, false_negative_margin=0.002)
    plain = FocalInfoNCE(tiny_model, hard_negative_mixing=HardNegativeMixing(seed=2), **kwargs)
    cached = CachedFocalInfoNCE(
        tiny_model, mini_batch_size=4, hard_negative_mixing=HardNegativeMixing(seed=2), **kwargs
    )
    assert_same_loss_and_grads(
        _loss_and_grads(cached, tiny_model, features), _loss_and_grads(plain, tiny_model, features)
    )
    assert int(cached.loss.last_false_negative_count) == int(plain.last_false_negative_count) > 0


def test_cached_matryoshka_masked_equals_uncached_matryoshka(tiny_model) -> None:
    features = featurize(tiny_model, duplicate_columns())
    kwargs = dict(temperature=TAU, false_negative_mask=True)
    plain = kalm_matryoshka(tiny_model, FocalInfoNCE(tiny_model, **kwargs), dims=(64, 32))
    cached = kalm_matryoshka(tiny_model, CachedFocalInfoNCE(tiny_model, mini_batch_size=4, **kwargs), dims=(64, 32))
    assert_same_loss_and_grads(
        _loss_and_grads(cached, tiny_model, features), _loss_and_grads(plain, tiny_model, features)
    )
    # the last call is the 32-d one; duplicates (3 in-batch) are masked at every dimension
    assert int(cached.loss.loss.last_false_negative_count) == int(plain.loss.last_false_negative_count) >= 3


def test_distillation_masks_only_the_contrastive_term(tiny_model) -> None:
    columns = duplicate_columns()
    features = featurize(tiny_model, columns)
    labels = torch.tensor([[0.9, 0.4, 0.2]] * len(columns[0]))
    base = FocalInfoNCE(tiny_model, temperature=TAU, false_negative_mask=True, false_negative_margin=0.002)
    loss = ContrastiveDistillation(tiny_model, base, alpha=0.5, student_temperature=0.05, teacher_temperature=0.05)
    got = loss(copy.deepcopy(features), labels)
    with torch.no_grad():
        emb = [tiny_model(copy.deepcopy(f))["sentence_embedding"] for f in features]
    rows, row_texts, target = in_batch_layout(emb[0], emb[1:], columns[1:])
    focal, _ = oracle_loss(emb[0], rows, row_texts, target, columns[1], 0.5, margin=0.002)
    st_kd = DistillKLDivLoss(
        tiny_model, similarity_fct=pairwise_cos_sim, student_temperature=0.05, teacher_temperature=0.05
    )
    kd = st_kd.compute_loss_from_embeddings(emb, labels) / 0.05**2  # unmasked KD, sentence-transformers' own
    expected = torch.tensor(focal + 0.5 * kd.item(), dtype=torch.float64)
    torch.testing.assert_close(got.detach().double(), expected, rtol=1e-5, atol=1e-6)  # a float32 loss of ~1.5


def test_mask_is_off_by_default_and_configurable(tiny_model) -> None:
    emb, _ = _synthetic_embeddings()
    default = FocalInfoNCE(tiny_model, temperature=TAU)
    assert default.false_negative_mask is False and default.false_negative_margin == 0.1
    assert default.get_config_dict()["false_negative_mask"] is False
    # the paper's loss: the near-positive of row 2 stays in its denominator
    q, docs = emb[0], emb[1:]
    rows, row_texts, target = in_batch_layout(q, docs, [[None] * 4] * 3)
    expected, _ = oracle_loss(q, rows, row_texts, target, [None] * 4, 0.5, margin=None)
    torch.testing.assert_close(default.compute_loss_from_embeddings(emb), torch.tensor(expected, dtype=torch.float64))
    assert default.last_false_negative_count is None
    cached = CachedFocalInfoNCE(tiny_model, false_negative_mask=True, false_negative_margin=0.2)
    assert cached.loss.false_negative_mask and cached.false_negative_margin == 0.2
    config = cached.get_config_dict()
    assert config["false_negative_mask"] is True and config["false_negative_margin"] == 0.2
    distill = ContrastiveDistillation(tiny_model, FocalInfoNCE(tiny_model, false_negative_mask=True))
    assert distill.get_config_dict()["false_negative_mask"] is True


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_margin_raises_naming_it(tiny_model, bad) -> None:
    with pytest.raises(ValueError, match="false_negative_margin"):
        FocalInfoNCE(tiny_model, false_negative_mask=True, false_negative_margin=bad)
    with pytest.raises(ValueError, match="false_negative_margin"):
        CachedFocalInfoNCE(tiny_model, false_negative_margin=bad)


def test_without_text_keys_only_the_margin_rule_applies_and_it_warns_once(tiny_model, caplog) -> None:
    emb, text_ids = _synthetic_embeddings()
    loss = FocalInfoNCE(tiny_model, temperature=TAU, false_negative_mask=True)
    with caplog.at_level(logging.WARNING, logger="kalm_st.losses.focal_info_nce"):
        got = loss.compute_loss_from_embeddings(emb)
        loss.compute_loss_from_embeddings(emb)
    assert sum("only the margin rule applies" in r.getMessage() for r in caplog.records) == 1
    q, docs = emb[0], emb[1:]
    rows, row_texts, target = in_batch_layout(q, docs, [[None] * 4] * 3)
    expected, _ = oracle_loss(q, rows, row_texts, target, [None] * 4, 0.5, margin=0.1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_bad_text_inputs_raise_naming_the_column(tiny_model) -> None:
    features = featurize(tiny_model, duplicate_columns())
    del features[2]["input_ids"]
    loss = FocalInfoNCE(tiny_model, false_negative_mask=True)
    with pytest.raises(ValueError, match=r"column 2 \(negative_1\)"):
        loss(features, None)
    emb, _ = _synthetic_embeddings()
    with pytest.raises(ValueError, match="one \\(batch,\\) tensor per candidate column"):
        loss.compute_loss_from_embeddings(emb, text_keys=[torch.zeros(4, dtype=torch.long)])


@pytest.mark.parametrize("cached", [False, True])
def test_trainer_logs_the_masked_count(tiny_model, shared_data_dir, tmp_path, cached: bool) -> None:
    """Every row's negative_1 is its own positive: with a margin of 2 (cosines differ by at most 2, so rule (b) never
    fires) exactly one candidate per row is masked, 8 per step of 8 rows."""
    rows = trecqa_rows(shared_data_dir, 32, num_negatives=1)
    positives = [row["positive"] for row in rows]
    assert len(set(positives)) == 32 and not {row["negative_1"] for row in rows} & set(positives)
    data = {"anchor": [r["anchor"] for r in rows], "positive": positives, "negative_1": positives}
    data["negative_2"] = [r["negative_1"] for r in rows]
    tiny_model.max_seq_length = 32
    kwargs = dict(temperature=TAU, false_negative_mask=True, false_negative_margin=2.0)
    loss = (
        CachedFocalInfoNCE(tiny_model, mini_batch_size=4, **kwargs) if cached else FocalInfoNCE(tiny_model, **kwargs)
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(
        model=tiny_model,
        args=args,
        train_dataset=Dataset.from_dict(data),
        loss=loss,
        callbacks=[FalseNegativeLoggingCallback(loss)],
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert [entry["false_negatives_masked"] for entry in logged] == [8.0, 8.0, 8.0]
