"""The on-disk embedding store and the exact search, against direct encoding and a numpy brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset
from sentence_transformers import SentenceTransformer

import kalm_st.data.embedding_store as store_module
from kalm_st.data import filter_by_rank, mine_hard_negatives
from kalm_st.data.embedding_store import encode_cached, text_keys
from kalm_st.data.retrieval import top_k

TEXTS = [
    "How do I reset my PIN?",
    "Resetting your PIN",
    "Where is my card?",
    "Card delivery times",
    "Exchange rates",
    "Lost or stolen card",
    "Top up by bank transfer",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture
def counted(minilm: SentenceTransformer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many texts each encode call of the model received (the real encode runs)."""
    calls: list[int] = []
    for name in ("encode_query", "encode_document"):
        original = getattr(minilm, name)

        def counting(texts, *args, _original=original, **kwargs):  # noqa: ANN001, ANN202
            calls.append(len(texts))
            return _original(texts, *args, **kwargs)

        monkeypatch.setattr(minilm, name, counting)
    return calls


def test_text_keys_are_equal_for_equal_texts_only() -> None:
    texts = [f"text number {i}" for i in range(200_000)]
    keys = text_keys(texts)
    assert keys.shape == (200_000, 2) and keys.dtype == np.uint64
    assert len(np.unique(keys, axis=0)) == 200_000  # no collision among 200k distinct texts
    # the same texts as Arrow string, large_string and chunked arrays: the same keys
    assert np.array_equal(text_keys(pa.array(texts[:10])), keys[:10])
    chunked = pa.chunked_array([pa.array(texts[:4], pa.large_string()), pa.array(texts[4:10], pa.large_string())])
    assert np.array_equal(text_keys(chunked), keys[:10])
    assert not np.array_equal(text_keys(["text number 0 "]), keys[:1])  # one trailing space is another text
    assert np.array_equal(text_keys(["é", "é"])[0], text_keys(["é"])[0])


def test_cached_embeddings_equal_direct_encoding_and_only_new_texts_are_encoded(
    minilm: SentenceTransformer, counted: list[int], tmp_path: Path
) -> None:
    texts = [*TEXTS, TEXTS[0], TEXTS[3]]  # duplicates are encoded once
    got = encode_cached(minilm, texts, tmp_path, prompt="", chunk_size=3, show_progress_bar=False)
    reference = minilm.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    assert sum(counted) == len(TEXTS)
    counted.clear()
    more = [*TEXTS, "A new question about fees"]
    again = encode_cached(minilm, more, tmp_path, prompt="", chunk_size=3, show_progress_bar=False)
    assert counted == [1]  # only the new text
    np.testing.assert_allclose(again[: len(TEXTS)], reference[: len(TEXTS)], rtol=1e-5, atol=1e-6)
    # another prompt is another store: everything is encoded again, with the prompt
    counted.clear()
    prompted = encode_cached(minilm, TEXTS, tmp_path, prompt="query: ", show_progress_bar=False)
    assert sum(counted) == len(TEXTS)
    direct = minilm.encode(TEXTS, prompt="query: ", normalize_embeddings=True)
    np.testing.assert_allclose(prompted, direct, rtol=1e-5, atol=1e-6)


def test_an_interrupted_encoding_resumes_after_its_last_chunk(
    minilm: SentenceTransformer, counted: list[int], tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="max_chunks"):
        encode_cached(minilm, TEXTS, tmp_path, prompt="", chunk_size=2, max_chunks=2, show_progress_bar=False)
    assert counted == [2, 2]
    counted.clear()
    got = encode_cached(minilm, TEXTS, tmp_path, prompt="", chunk_size=2, show_progress_bar=False)
    assert counted == [2, 1]  # the 4 finished texts are read back, the other 3 encoded
    np.testing.assert_allclose(got, minilm.encode(TEXTS, normalize_embeddings=True), rtol=1e-5, atol=1e-6)


def test_results_larger_than_memory_are_memory_mapped(
    minilm: SentenceTransformer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "IN_MEMORY_BYTES", 0)
    texts = [*TEXTS, TEXTS[1]]
    got = encode_cached(minilm, texts, tmp_path, prompt="", show_progress_bar=False)
    assert isinstance(got, np.memmap)
    np.testing.assert_allclose(got, minilm.encode(texts, normalize_embeddings=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_faiss", [False, True])
def test_top_k_equals_a_brute_force_ranking(use_faiss: bool) -> None:
    if use_faiss:
        pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(1000, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    scores, ids = top_k(queries, docs, 17, use_faiss=use_faiss, query_chunk=10, doc_block=128, show_progress_bar=False)
    full = queries.astype(np.float64) @ docs.astype(np.float64).T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :17]
    assert np.array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-5, atol=1e-5)
    few, few_ids = top_k(queries, docs[:5], 17, use_faiss=use_faiss, show_progress_bar=False)
    assert few.shape == (37, 5) and np.array_equal(few_ids, np.argsort(-full[:, :5], axis=1, kind="stable"))


def test_mining_with_and_without_faiss_is_the_same(minilm: SentenceTransformer) -> None:
    pytest.importorskip("faiss")
    corpus = [f"{t} ({i})" for i in range(8) for t in TEXTS]
    pairs = Dataset.from_dict({"anchor": TEXTS[::2], "positive": TEXTS[1::2] + [TEXTS[0]]})
    common = {"corpus": corpus, "range_min": 2, "range_max": 20, "num_negatives": 3, "seed": 4}
    with_faiss = mine_hard_negatives(pairs, minilm, use_faiss=True, show_progress_bar=False, **common)
    without = mine_hard_negatives(pairs, minilm, use_faiss=False, show_progress_bar=False, **common)
    assert with_faiss.to_list() == without.to_list()
    assert len(without) == 4


def test_mining_after_filtering_reuses_the_filter_embeddings(
    minilm: SentenceTransformer, counted: list[int], tmp_path: Path
) -> None:
    corpus = [f"{t} ({i})" for i in range(8) for t in TEXTS]
    pairs = Dataset.from_dict({"anchor": TEXTS[::2], "positive": TEXTS[1::2] + [TEXTS[0]]})
    kept, _ = filter_by_rank(pairs, minilm, top_k=30, corpus=corpus, cache_folder=tmp_path, show_progress_bar=False)
    encoded = sum(counted)
    # MiniLM has no prompts: queries and documents share one store, so a text that is both is encoded once
    assert encoded == len(set(corpus) | set(pairs["positive"]) | set(pairs["anchor"])) == 63
    counted.clear()
    mined = mine_hard_negatives(
        kept, minilm, corpus=corpus, range_min=2, range_max=20, num_negatives=3, cache_folder=tmp_path,
        show_progress_bar=False,
    )  # fmt: skip
    assert sum(counted) == 0  # every text was encoded by the filter, with the same model and prompts
    assert len(mined) == len(kept)
    assert Path(mined.cache_files[0]["filename"]).parent == tmp_path  # a memory-mapped Arrow file in the cache
