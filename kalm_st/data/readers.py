"""One batched reader per input layout (:mod:`kalm_st.data.columns`): a record batch -> the same :class:`Rows`
(query, positives, negatives, teacher scores or embeddings, row instructions, groups), checked on the way with
``pyarrow.compute`` and numpy: no Python object per row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_st.data.checks import Problems, bad_numbers, bad_texts, is_json, is_list, is_text, parse_json_lists, storage
from kalm_st.data.checks import value as value_at


@dataclass(frozen=True)
class Layout:
    """Which columns of a shard play which part (decided once per shard from its schema)."""

    query: str
    pos: str
    pos_is_list: bool
    neg_list: str | None = None
    neg_columns: tuple[str, ...] = ()
    label: str | None = None
    """kalm-st's one ``label`` list: ``[positive, negatives...]`` scores, or ``(2 + k, d)`` embeddings."""
    embeddings: bool = False
    pos_scores: str | None = None
    neg_scores: str | None = None
    prompt: str | None = None
    group: str | None = None
    csv: bool = False


@dataclass
class ListPart:
    """A list per row, flattened: row ``i`` holds ``flat[starts[i] : starts[i] + lengths[i]]``."""

    flat: pa.Array
    lengths: np.ndarray
    starts: np.ndarray


@dataclass
class Rows:
    query: pa.Array
    pos: ListPart
    neg: ListPart | None
    pos_scores: ListPart | None
    neg_scores: ListPart | None
    embeddings: ListPart | None
    prompt: pa.Array | None
    group: pa.Array | None


def _parts(column: pa.Array) -> ListPart:
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return ListPart(pc.list_flatten(column), lengths, np.cumsum(lengths) - lengths)


def _as_list(column: pa.Array, name: str, layout: Layout, problems: Problems, label: str) -> pa.Array | None:
    """A list column as Arrow lists (CSV: parsed from JSON text); None after reporting the rows that are not lists."""
    if is_list(column.type):
        return column
    if layout.csv and is_text(column.type):
        return parse_json_lists(column, name, label)
    if is_json(column.type):
        bad = pc.invert(pc.fill_null(pc.starts_with(storage(column), "["), True)).to_numpy(zero_copy_only=False)
    else:
        bad = pc.is_valid(column).to_numpy(zero_copy_only=False)
    problems.add(bad, name, lambda i: f"must be a list, got {value_at(column, i)!r}")
    problems.check()
    return None


def _scalar_part(column: pa.Array) -> ListPart:
    n = len(column)
    return ListPart(column, np.ones(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def _numbered_part(batch: pa.Table, columns: tuple[str, ...]) -> ListPart:
    """``negative_1..k`` as lists, row-major; a row's list ends at its last non-empty value (tasks of one file may
    have different counts: the others are null)."""
    n, k = batch.num_rows, len(columns)
    arrays = [batch.column(c).combine_chunks() for c in columns]
    texts = [a.cast(pa.large_string()) if is_text(a.type) else a for a in arrays]
    filled = np.stack(
        [pc.fill_null(pc.not_equal(a, ""), False).to_numpy(zero_copy_only=False) if is_text(a.type)
         else pc.is_valid(a).to_numpy(zero_copy_only=False) for a in texts], axis=1,
    ) if k else np.zeros((n, 0), bool)  # fmt: skip
    lengths = np.where(filled.any(axis=1), k - np.argmax(filled[:, ::-1], axis=1), 0).astype(np.int64)
    # a column that is not text (numbers in CSV): its values count as missing, so the text check names them
    texts = [a if is_text(a.type) else pa.nulls(n, pa.large_string()) for a in texts]
    order = (np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel()  # row i's k values side by side
    flat = pa.concat_arrays(texts).take(pa.array(order)) if k else pa.array([], pa.large_string())
    return ListPart(flat, lengths, np.arange(n, dtype=np.int64) * k)


def read_rows(batch: pa.Table, layout: Layout, problems: Problems, label: str) -> Rows:
    """The batch's rows in the common form, every rule checked (raises :class:`DataValidationError` with the
    batch's problems)."""
    n = batch.num_rows
    col = {name: batch.column(name).combine_chunks() for name in batch.column_names}
    query = col[layout.query]
    problems.add(bad_texts(query), layout.query, lambda i: f"empty or not a string ({value_at(query, i)!r})")
    # positives
    if layout.pos_is_list:
        pos = _parts(_as_list(col[layout.pos], layout.pos, layout, problems, label))
        problems.add(pos.lengths == 0, layout.pos, "empty list: every row needs a positive")
    else:
        pos = _scalar_part(col[layout.pos])
    _check_items(pos, layout.pos, "positive", not layout.pos_is_list, problems)
    # negatives
    neg = None
    if layout.neg_list is not None:
        neg = _parts(_as_list(col[layout.neg_list], layout.neg_list, layout, problems, label))
        _check_items(neg, layout.neg_list, "negative", False, problems)
    elif layout.neg_columns:
        neg = _numbered_part(batch, layout.neg_columns)
        name = layout.neg_columns[0] if len(layout.neg_columns) == 1 else "negative_1..n"
        _check_items(neg, name, "negative", False, problems)
    neg_len = neg.lengths if neg is not None else np.zeros(n, dtype=np.int64)
    # teacher scores / embeddings
    pos_scores = neg_scores = embeddings = None
    if layout.label is not None:
        pos_scores, neg_scores, embeddings = _read_label(col[layout.label], layout, neg_len, problems, label)
    if layout.pos_scores is not None:
        pos_scores = _read_scores(col[layout.pos_scores], layout.pos_scores, pos.lengths, layout.pos, layout,
                                  problems, label)  # fmt: skip
    if layout.neg_scores is not None and neg is not None:
        neg_scores = _read_scores(col[layout.neg_scores], layout.neg_scores, neg_len, layout.neg_list or "neg",
                                  layout, problems, label)  # fmt: skip
    group = None
    if layout.group is not None:
        group = col[layout.group]
        if pa.types.is_floating(group.type):
            bad = pc.fill_null(pc.not_equal(group, pc.floor(group)), True).to_numpy(zero_copy_only=False)
        elif pa.types.is_integer(group.type):
            bad = pc.is_null(group).to_numpy(zero_copy_only=False)
        else:
            bad = np.ones(n, dtype=bool)
        problems.add(bad, layout.group, lambda i: f"must be an integer (the row's query), got {value_at(group, i)!r}")
    problems.check()
    if group is not None:
        group = group.cast(pa.int64())
    prompt = col[layout.prompt] if layout.prompt is not None else None
    return Rows(query, pos, neg, pos_scores, neg_scores, embeddings, prompt, group)


def _items(part: ListPart) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(index into flat, row, position in the row)`` of every item a row holds."""
    counts = part.lengths
    position = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(part.starts, counts) + position, np.repeat(np.arange(len(counts)), counts), position


def _first_bad(part: ListPart, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows with a bad item, position of each row's first bad item)``."""
    index, row, position = _items(part)
    hit = np.flatnonzero(bad[index]) if len(index) else np.zeros(0, np.int64)
    rows_bad = np.zeros(len(part.lengths), dtype=bool)
    rows_bad[row[hit]] = True
    first = np.full(len(part.lengths), -1, dtype=np.int64)
    first[row[hit][::-1]] = position[hit][::-1]
    return rows_bad, first


def _check_items(part: ListPart, column: str, noun: str, scalar: bool, problems: Problems) -> None:
    bad = bad_texts(part.flat)
    if scalar:
        problems.add(bad, column, lambda i: f"empty or not a string ({value_at(part.flat, i)!r})")
    elif bad.any():
        rows_bad, first = _first_bad(part, bad)
        problems.add(rows_bad, column, lambda i: f"{noun} {first[i] + 1} is empty or not a string")


def numbers(part: ListPart) -> np.ndarray:
    return pc.cast(part.flat, pa.float64()).to_numpy(zero_copy_only=False)


def _read_scores(
    column: pa.Array, name: str, expected: np.ndarray, owner: str, layout: Layout, problems: Problems, label: str
) -> ListPart:
    """KaLM / FlagEmbedding ``pos_scores`` / ``neg_scores``: one number per text of ``owner``."""
    part = _parts(_as_list(column, name, layout, problems, label))
    problems.add(
        part.lengths != expected, name, lambda i: f"{part.lengths[i]} scores for {expected[i]} texts in {owner!r}"
    )
    _check_numbers(part, column, name, problems)
    return part


def _check_numbers(part: ListPart, column: pa.Array, name: str, problems: Problems) -> None:
    bad = bad_numbers(part.flat)
    if bad.any():
        rows, _ = _first_bad(part, bad)
        problems.add(rows, name, lambda i: f"NaN, infinite or non-numeric score in {_shown(column, i)}")


def _shown(column: pa.Array, i: int) -> object:
    values = value_at(column, i)
    return [float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in values]


def _read_label(
    column: pa.Array, layout: Layout, neg_len: np.ndarray, problems: Problems, label: str
) -> tuple[ListPart | None, ListPart | None, ListPart | None]:
    """kalm-st's ``label``: ``1 + k`` teacher scores (positive, the row's ``k`` negatives) or ``2 + k`` teacher
    embeddings (anchor, positive, negatives) of one dimension."""
    name = layout.label
    assert name is not None
    expected = 1 + neg_len
    if not is_list(column.type) and not (layout.csv and is_text(column.type)):
        problems.add(
            np.ones(len(column), dtype=bool), name,
            lambda i: f"teacher scores must be a list of {expected[i]} numbers (positive + {neg_len[i]} negatives), "
            f"got {value_at(column, i)!r}",
        )  # fmt: skip
        problems.check()
    column = _as_list(column, name, layout, problems, label)
    part = _parts(column)
    if layout.embeddings:
        want = 2 + neg_len
        problems.add(
            part.lengths != want, name,
            lambda i: f"teacher embeddings must be {want[i]} vectors (anchor, positive + {neg_len[i]} negatives), "
            f"got {part.lengths[i]}",
        )  # fmt: skip
        vectors = _parts(part.flat)
        dims = vectors.lengths
        parent = np.repeat(np.arange(len(part.lengths)), part.lengths)
        low = np.full(len(part.lengths), np.iinfo(np.int64).max)
        high = np.zeros(len(part.lengths), dtype=np.int64)
        np.minimum.at(low, parent, dims)
        np.maximum.at(high, parent, dims)
        ragged = (part.lengths > 0) & ((low != high) | (high == 0))
        problems.add(ragged, name, lambda i: f"ragged teacher embeddings: vector lengths "
                     f"{sorted({len(v) for v in value_at(column, i)})} (every vector needs the same)")  # fmt: skip
        bad = bad_numbers(vectors.flat)
        if bad.any():  # vectors with a bad value, then each row's first such vector
            rows_bad, first = _first_bad(part, _first_bad(vectors, bad)[0])
            problems.add(rows_bad & ~ragged, name,
                         lambda i: f"NaN, infinite or non-numeric value in teacher embedding {first[i]}")  # fmt: skip
        return None, None, part
    problems.add(
        part.lengths < expected, name,
        lambda i: f"teacher scores must be a list of {expected[i]} numbers (positive + {neg_len[i]} negatives), "
        f"got {_shown(column, i)}",
    )  # fmt: skip
    problems.add(part.lengths > expected, name,
                 lambda i: f"ragged teacher scores: {part.lengths[i]} values for {expected[i]} texts")  # fmt: skip
    _check_numbers(part, column, name, problems)
    pos_scores = ListPart(part.flat, np.ones(len(expected), dtype=np.int64), part.starts)
    return pos_scores, ListPart(part.flat, neg_len, part.starts + 1), None


__all__ = ["Layout", "ListPart", "Rows", "numbers", "read_rows"]
