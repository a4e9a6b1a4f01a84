"""teacher-embed: the cache equals a direct encode, resumes by chunks, re-embeds changed texts and a new teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer

from kalm_st.cli import main
from kalm_st.data.teacher_embeddings import attach_teacher_embeddings, embed_texts, load_cache

ROWS = {
    "anchor": ["a dog runs", "a cat sleeps", "a dog runs"],
    "positive": ["the dog is running", "the cat naps", "a hound sprints"],
    "negative_1": ["a cat sleeps", "stocks fell", "bread is baked"],
}


class CountingModel:
    """A SentenceTransformer whose encode calls are counted (the real model, not a mock of its maths)."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, texts, **kwargs):
        self.encoded += len(texts)
        return self.model.encode(texts, **kwargs)


@pytest.fixture(scope="module")
def teacher(minilm_dir) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_dir), device="cpu")


def test_cache_matches_direct_encoding_resumes_and_rekeys(teacher, tmp_path) -> None:
    texts = [t for column in ROWS.values() for t in column]
    distinct = sorted(set(texts))
    counting = CountingModel(teacher)
    embed_texts(texts, counting, tmp_path, teacher_name="minilm", chunk_size=3, max_chunks=2)  # "killed" after 2
    assert counting.encoded == 6
    rows = embed_texts(texts, counting, tmp_path, teacher_name="minilm", chunk_size=3)  # resumes: the rest only
    assert counting.encoded == len(distinct)
    _, embeddings, filled = load_cache(tmp_path)
    assert filled.all() and embeddings.shape == (len(distinct), 384)
    direct = teacher.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(embeddings[rows], direct, rtol=1e-4, atol=1e-5)  # batch composition changes padding
    # A changed text is embedded anew, the others are reused.
    changed = [t if t != "stocks fell" else "stocks rose" for t in texts]
    embed_texts(changed, counting, tmp_path, teacher_name="minilm", chunk_size=3)
    assert counting.encoded == len(distinct) + 1
    # Another teacher (same architecture, other weights) re-embeds everything.
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    try:
        embed_texts(changed, counting, tmp_path, teacher_name="minilm", chunk_size=3)
    finally:
        with torch.no_grad():
            next(teacher.parameters()).sub_(0.01)
    assert counting.encoded == 2 * len(distinct) + 1


def test_attach_and_cli_write_the_label_column(teacher, minilm_dir, tmp_path) -> None:
    dataset = Dataset.from_dict(ROWS)
    columns = list(ROWS)
    embed_texts([t for c in columns for t in dataset[c]], teacher, tmp_path / "cache", teacher_name="m")
    with_labels = attach_teacher_embeddings(dataset, tmp_path / "cache", columns)
    label = np.asarray(with_labels["label"], dtype=np.float32)
    assert label.shape == (3, 3, 384)
    np.testing.assert_allclose(label[1, 2], teacher.encode("stocks fell"), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"column 'positive', row 0"):
        attach_teacher_embeddings(
            Dataset.from_dict({**ROWS, "positive": ["new", "x", "y"]}), tmp_path / "cache", columns
        )
    # The command, on a file.
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "".join(json.dumps(dict(zip(ROWS, values, strict=True))) + "\n" for values in zip(*ROWS.values(), strict=True))
    )
    out = tmp_path / "out.parquet"
    argv = [
        "teacher-embed",
        str(source),
        "-o",
        str(out),
        "--model",
        str(minilm_dir),
        "--cache-dir",
        str(tmp_path / "c2"),
        "--no-instructions",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    written = Dataset.from_parquet(str(out))
    np.testing.assert_allclose(np.asarray(written["label"][0], dtype=np.float32), label[0], rtol=1e-4, atol=1e-5)
