"""Curation tools against references known by construction or computed independently."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule
from sentence_transformers.util import cos_sim

from kalm_st.data import filter_by_rank, label_examples, mine_hard_negatives, score_with_teacher

# Scores here are float32 cosines or sigmoid outputs (|x| <= 1), computed in other batches than their references:
# torch.testing.assert_close's float32 tolerances (rtol 1.3e-6, atol 1e-5; atol is ~80 ulps at 1.0). pytest.approx
# with only abs= ignores rel, so both are given.
F32_REL, F32_ABS = 1.3e-6, 1e-5


class LookupEmbedding(InputModule):
    """Maps each known text to a fixed embedding: similarities, hence ranks, are known by construction."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__()
        self.index = {text: i for i, text in enumerate(table)}
        self.register_buffer("weight", torch.tensor(list(table.values()), dtype=torch.float32))

    def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor([self.index[text] for text in inputs])}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        features["sentence_embedding"] = self.weight[features["ids"]]
        return features

    def get_embedding_dimension(self) -> int:
        return self.weight.shape[1]

    def save(self, output_path: str, *args, **kwargs) -> None:  # pragma: no cover - never saved
        raise NotImplementedError


def lookup_model(table: dict[str, list[float]]) -> SentenceTransformer:
    return SentenceTransformer(modules=[LookupEmbedding(table)], device="cpu")


def _angle(a: float) -> list[float]:
    return [math.cos(a), math.sin(a)]


N_DOCS = 200
DOCS = [f"d{j}" for j in range(N_DOCS)]
# Every query sits at angle 0 and doc j at angle 0.005 * j: doc j is the j-th best candidate of every query.
RANKED_TABLE = {**{d: _angle(0.005 * j) for j, d in enumerate(DOCS)}, **{f"q{i}": _angle(0.0) for i in range(12)}}


def _rank_among_non_positives(doc: str, positive: str) -> int:
    j, p = int(doc[1:]), int(positive[1:])
    return j - 1 if j > p else j


def test_mining_samples_only_the_rank_range_and_never_a_positive() -> None:
    model = lookup_model(RANKED_TABLE)
    positives = [f"d{j}" for j in (0, 20, 60, 75, 99, 150, 3, 80, 55, 120, 10, 199)]
    pairs = Dataset.from_dict({"anchor": [f"q{i}" for i in range(12)], "positive": positives})
    mined = mine_hard_negatives(pairs, model, corpus=DOCS, seed=1)
    assert mined.column_names == ["anchor", "positive", *[f"negative_{k}" for k in range(1, 8)]]
    assert len(mined) == 12
    seen_ranks = set()
    for row in mined:
        negatives = [row[f"negative_{k}"] for k in range(1, 8)]
        assert len(set(negatives)) == 7
        assert row["positive"] not in negatives and row["anchor"] not in negatives
        ranks = [_rank_among_non_positives(n, row["positive"]) for n in negatives]
        assert all(50 <= r < 100 for r in ranks), ranks
        seen_ranks.update(ranks)
    assert len(seen_ranks) > 30  # random sampling over the range, not the top of it
    # seeded: same seed, same negatives; another seed, others
    assert mine_hard_negatives(pairs, model, corpus=DOCS, seed=1).to_list() == mined.to_list()
    assert mine_hard_negatives(pairs, model, corpus=DOCS, seed=2).to_list() != mined.to_list()


def test_mining_never_returns_the_query_itself() -> None:
    # symmetric data: "s0" is an anchor and also another row's positive, so its own text is in the corpus with
    # similarity 1 to itself; without exclude_query (ST's behaviour) it is mined as its own hardest negative.
    # Angles 0.01 j + 0.0001 j^2: no two neighbours are equally far (s5: s4 0.0109, s6 0.0111, s3 0.0216, s7 0.0224).
    table = {f"s{j}": _angle(0.01 * j + 0.0001 * j * j) for j in range(40)}
    pairs = Dataset.from_dict({"anchor": ["s0", "s5"], "positive": ["s30", "s0"]})
    corpus = list(table)
    raw = mine_hard_negatives(
        pairs, lookup_model(table), corpus=corpus, range_min=0, range_max=10, num_negatives=3,
        sampling_strategy="top", exclude_query=False,
    )  # fmt: skip
    assert "s0" in [raw[0][f"negative_{k}"] for k in range(1, 4)]  # the control: without it, the query is mined
    mined = mine_hard_negatives(
        pairs, lookup_model(table), corpus=corpus, range_min=0, range_max=10, num_negatives=3,
        sampling_strategy="top",
    )  # fmt: skip
    assert mined["anchor"] == ["s0", "s5"]  # the helper (s0, s0) row is gone
    rows = {row["anchor"]: [row[f"negative_{k}"] for k in range(1, 4)] for row in mined}
    assert rows["s0"] == ["s1", "s2", "s3"]  # next best after the query itself
    assert rows["s5"] == ["s4", "s6", "s3"]  # s5 is its own text too; s0 is its positive: both excluded


def test_mining_scores_become_label() -> None:
    model = lookup_model(RANKED_TABLE)
    pairs = Dataset.from_dict({"anchor": ["q0"], "positive": ["d0"]})
    mined = mine_hard_negatives(pairs, model, corpus=DOCS, output_scores=True, seed=0)
    row = mined[0]
    expected = [math.cos(0.0)] + [math.cos(0.005 * int(row[f"negative_{k}"][1:])) for k in range(1, 8)]
    assert row["label"] == pytest.approx(expected, rel=F32_REL, abs=F32_ABS)


def test_filter_drops_exactly_the_rows_below_rank_k() -> None:
    positive_index = [0, 10, 49, 50, 51, 199, 30, 120]
    pairs = Dataset.from_dict(
        {
            "anchor": [f"q{i}" for i in range(len(positive_index))],
            "positive": [f"d{j}" for j in positive_index],
            "extra": list(range(len(positive_index))),  # other columns are kept
        }
    )
    kept, report = filter_by_rank(pairs, lookup_model(RANKED_TABLE), corpus=DOCS, top_k=50)
    # doc j has exactly j better candidates; ranks past the top 50 are not computed, reported as 50
    assert report.ranks.tolist() == [min(j, 50) for j in positive_index]
    assert kept["extra"] == [0, 1, 2, 6]
    assert (report.total, report.kept, report.dropped) == (8, 4, 4)
    _, report10 = filter_by_rank(pairs, lookup_model(RANKED_TABLE), corpus=DOCS, top_k=11)
    assert report10.kept == 2
    with pytest.raises(ValueError, match="top_k"):
        filter_by_rank(pairs, lookup_model(RANKED_TABLE), top_k=0)


def test_filter_ignores_own_positives_and_query_text() -> None:
    # q0 has two positives d5 and d7; d5 is better than d7 but must not push d7 down; "q0"'s own text is not a doc.
    table = {**RANKED_TABLE}
    pairs = Dataset.from_dict({"anchor": ["q0", "q0"], "positive": ["d5", "d7"]})
    _, report = filter_by_rank(pairs, lookup_model(table), corpus=[*DOCS, "q0"], top_k=50)
    assert report.ranks.tolist() == [5, 6]


@pytest.fixture(scope="module")
def banking(shared_data_dir: Path) -> Dataset:
    frame = pd.read_csv(shared_data_dir / "banking77" / "train.csv")
    frame = frame[frame["category"].isin(sorted(frame["category"].unique())[:12])].groupby("category").head(30)
    return Dataset.from_pandas(frame.rename(columns={"category": "label"}), preserve_index=False)


def test_labelling_invariants(banking: Dataset) -> None:
    labelled = label_examples(banking, num_negatives=5, seed=3)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in zip(banking["text"], banking["label"], strict=True):
        labels_of[text].add(label)
    class_texts: dict[str, set[str]] = defaultdict(set)
    for text, label in zip(banking["text"], banking["label"], strict=True):
        class_texts[label].add(text)
    assert len(labelled) > 0.9 * len(banking)
    assert labelled.column_names == ["anchor", "positive", *[f"negative_{k}" for k in range(1, 6)]]
    for row in labelled:
        anchor, positive = row["anchor"], row["positive"]
        negatives = [row[f"negative_{k}"] for k in range(1, 6)]
        assert positive != anchor
        assert labels_of[anchor] & labels_of[positive]  # same class
        assert len(set(negatives)) == 5
        for negative in negatives:
            assert negative != anchor
            for label in labels_of[anchor]:
                assert negative not in class_texts[label]  # never a same-class negative
        neg_classes = {next(iter(labels_of[n])) for n in negatives}
        assert len(neg_classes) == 5  # distinct other classes while there are enough
    assert label_examples(banking, num_negatives=5, seed=3).to_list() == labelled.to_list()
    assert label_examples(banking, num_negatives=5, seed=4).to_list() != labelled.to_list()


def test_labelling_skips_singletons_and_rejects_one_class() -> None:
    ds = Dataset.from_dict({"text": ["a", "b", "c", "a"], "label": [0, 0, 1, 0]})  # duplicate "a"
    out = label_examples(ds, num_negatives=1, show_progress_bar=False)
    assert out["anchor"] == ["a", "b", "a"]  # "c" is alone in class 1
    assert out["positive"] == ["b", "a", "b"] and out["negative_1"] == ["c", "c", "c"]
    with pytest.raises(ValueError, match="2 classes"):
        label_examples(Dataset.from_dict({"text": ["a", "b"], "label": [0, 0]}))
    with pytest.raises(ValueError, match="missing column 'label'"):
        label_examples(Dataset.from_dict({"text": ["a"]}))


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_dir), device="cpu")


def test_teacher_scores_equal_teacher_similarities(
    minilm: SentenceTransformer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = Dataset.from_dict(
        {
            "anchor": ["How do I reset my PIN?", "Where is my card?", "How do I reset my PIN?"],
            "positive": ["Resetting your PIN", "Card delivery times", "Change PIN at an ATM"],
            "negative_1": ["Exchange rates", "Resetting your PIN", "Top up by bank transfer"],
            "negative_2": ["Card delivery times", "Lost or stolen card", "Exchange rates"],
        }
    )
    scored = score_with_teacher(ds, minilm, cache_dir=tmp_path, show_progress_bar=False)
    assert scored.column_names == [*ds.column_names, "label"]
    for row, labels in zip(ds, scored["label"], strict=True):  # reference: one encode per row, cos_sim
        q = minilm.encode([row["anchor"]], convert_to_tensor=True)
        docs = minilm.encode([row["positive"], row["negative_1"], row["negative_2"]], convert_to_tensor=True)
        assert labels == pytest.approx(cos_sim(q, docs)[0].tolist(), rel=F32_REL, abs=F32_ABS)
    # a rerun reads the cache: the teacher is not called again
    monkeypatch.setattr(minilm, "encode", lambda *a, **k: pytest.fail("recomputed"))
    again = score_with_teacher(ds, minilm, cache_dir=tmp_path, show_progress_bar=False)
    assert again["label"] == scored["label"]
    assert len(list(tmp_path.glob("teacher_scores_*.npy"))) == 1


def test_teacher_scores_cross_encoder(minilm_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    teacher = CrossEncoder(str(minilm_dir), num_labels=1, device="cpu")  # random head: any cross-encoder works
    ds = Dataset.from_dict({"anchor": ["a question", "another"], "positive": ["p1", "p2"], "negative_1": ["n", "m"]})
    scored = score_with_teacher(ds, teacher, show_progress_bar=False)
    reference = teacher.predict([("a question", "p1"), ("a question", "n"), ("another", "p2"), ("another", "m")])
    flat = [v for row in scored["label"] for v in row]
    assert flat == pytest.approx(list(map(float, reference)), rel=F32_REL, abs=F32_ABS)
