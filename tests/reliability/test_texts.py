"""Bad texts given to ``encode``: each gives a clear ``TypeError`` naming what is wrong, or a documented result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

WORDS = "the quick brown fox jumps over a lazy dog " * 2500  # 105,000 characters


def test_empty_text_alone_is_the_zero_vector(tiny_model) -> None:
    """A batch of only empty texts has no tokens; it embeds as the zero vector, as an empty text in a mixed batch."""
    alone = tiny_model.encode([""])
    assert alone.shape == (1, 64)
    np.testing.assert_array_equal(alone, np.zeros((1, 64), dtype=np.float32))  # the mean of no token states
    many = tiny_model.encode([""] * 3 + ["A man is playing a guitar."], batch_size=2)  # one batch holds only ""
    np.testing.assert_array_equal(many[:3], np.zeros((3, 64), dtype=np.float32))
    np.testing.assert_allclose(many[3], tiny_model.encode("A man is playing a guitar."), rtol=1e-5, atol=1e-6)


def test_whitespace_only_text_is_embedded(tiny_model) -> None:
    embedding = tiny_model.encode(["   \n\t "])
    assert np.isfinite(embedding).all()
    assert np.linalg.norm(embedding[0]) == pytest.approx(1.0, abs=1e-5)  # its whitespace tokens are real tokens


def test_100k_character_text_is_truncated_to_max_seq_length(tiny_model) -> None:
    assert len(WORDS) > 100_000 and tiny_model.max_seq_length == 512
    assert tiny_model.tokenize([WORDS])["input_ids"].shape == (1, 512)
    # Truncation keeps the first 512 tokens: any prefix holding at least 512 tokens embeds the same.
    prefix = WORDS[:4000]
    assert len(tiny_model.tokenizer(prefix)["input_ids"]) > 512
    torch.testing.assert_close(
        torch.from_numpy(tiny_model.encode([WORDS])), torch.from_numpy(tiny_model.encode([prefix]))
    )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["fine", 3], "encode() expects strings, but item 1 is int: 3"),
        (["fine", None], "encode() expects strings, but item 1 is NoneType: None"),
        ([b"bytes"], "encode() expects strings, but item 0 is bytes: b'bytes'"),
        ([["nested"]], "encode() expects strings, but item 0 is list: ['nested']"),
        (["fine", float("nan")], "encode() expects strings, but item 1 is float: nan"),  # a missing pandas cell
        (None, "encode() expects a string or a list of strings, got NoneType"),
        (b"raw", "encode() expects a string or a list of strings, got bytes: decode it first"),
    ],
    ids=["int-item", "None-item", "bytes-item", "nested-list", "nan-item", "None", "bytes"],
)
def test_non_string_input_is_a_type_error(tiny_model, inputs, message: str) -> None:
    with pytest.raises(TypeError) as info:
        tiny_model.encode(inputs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("method", ["encode_query", "encode_document"])
def test_query_and_document_encoders_check_too(tiny_model, method: str) -> None:
    with pytest.raises(TypeError, match=r"got NoneType"):
        getattr(tiny_model, method)(None)
    with pytest.raises(TypeError, match=r"item 0 is int"):
        getattr(tiny_model, method)([7])


def test_empty_list_gives_an_empty_result(tiny_model) -> None:
    assert len(tiny_model.encode([])) == 0
