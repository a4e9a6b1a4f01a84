"""Vectorised rules over record batches: each problem names the file, the row (as a user counts it: 1-based lines
of jsonl / csv, 1-based rows otherwise) and the column; the first few of each rule are reported, all at once."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

MAX_REPORTED = 20
PER_RULE = 5


class DataValidationError(ValueError):
    """Bad training data; ``problems`` lists every problem found as ``"file: line|row i: column 'c': what"``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{len(self.problems)} problem(s) in the training data:\n  {lines}")


class Problems:
    """The problems of one batch: ``rows[i]`` is the 0-based row in the shard of batch position ``i``."""

    def __init__(self, label: str, unit: str, first: int, rows: np.ndarray) -> None:
        self.label, self.unit, self.first, self.rows = label, unit, first, rows
        self.found: list[tuple[int, str]] = []

    def add(self, mask: Any, column: str, what: str | Callable[[int], str], limit: int = PER_RULE) -> None:
        """One problem per position where ``mask`` is true (the first ``limit``); ``what(i)`` words position ``i``."""
        positions = np.flatnonzero(np.asarray(mask))[:limit]
        for i in positions:
            text = what(int(i)) if callable(what) else what
            text = text if len(text) <= 300 else text[:300] + " ..."  # a row of embeddings is long
            row = int(self.rows[i])
            self.found.append((row, f"{self.label}: {self.unit} {self.first + row}: column {column!r}: {text}"))

    def check(self) -> None:
        if self.found:
            raise DataValidationError([text for _, text in sorted(self.found, key=lambda item: item[0])])


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def is_json(kind: pa.DataType) -> bool:
    """``datasets`` reads a JSON column of mixed types as JSON text (an ``arrow.json`` extension type)."""
    return isinstance(kind, pa.BaseExtensionType) and is_text(kind.storage_type)


def storage(array: pa.Array) -> pa.Array:
    return array.storage if isinstance(array, pa.ExtensionArray) or hasattr(array, "storage") else array


def value(array: pa.Array, i: int) -> Any:
    """The Python value at ``i`` (error messages only); JSON text decoded."""
    item = storage(array)[i].as_py()
    if is_json(array.type) and isinstance(item, str):
        return json.loads(item)
    if isinstance(item, list) and array.type is not None and is_list(array.type) and is_json(array.type.value_type):
        return [json.loads(v) if isinstance(v, str) else v for v in item]
    return item


def bad_texts(texts: pa.Array) -> np.ndarray:
    """True where a value is missing, blank or not a string."""
    if is_text(texts.type):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)
        return pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
    if is_json(texts.type):  # JSON strings start with a quote; everything else is a number, list, ...
        return pc.invert(pc.fill_null(pc.starts_with(storage(texts), '"'), False)).to_numpy(zero_copy_only=False)
    return np.ones(len(texts), dtype=bool)


def bad_numbers(values: pa.Array) -> np.ndarray:
    """True where a value is missing, NaN, infinite or not a number."""
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
        finite = pc.is_finite(pc.cast(values, pa.float64()))
        return pc.invert(pc.fill_null(finite, False)).to_numpy(zero_copy_only=False)
    return np.ones(len(values), dtype=bool)


def parse_json_lists(texts: pa.Array, column: str, label: str) -> pa.Array:
    """A CSV column of JSON lists (``"[1.0, 0.5]"``) as an Arrow list column, parsed in C++ (pyarrow's JSON reader)."""
    import pyarrow.json as pj

    texts = pc.fill_null(texts.cast(pa.large_string()), "null")
    wrap = [pa.scalar(text, pa.large_string()) for text in ('{"v": ', "}\n", "")]
    lines = pc.binary_join_element_wise(wrap[0], texts, wrap[1], wrap[2])  # one JSON object per line
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    body = lines.buffers()[2].slice(start, end - start)  # the lines back to back, as they are in memory
    try:
        table = pj.read_json(pa.BufferReader(body))
    except pa.ArrowInvalid as error:
        what = f"{label}: column {column!r}: not JSON lists (CSV cells hold lists as JSON): {error}"
        raise DataValidationError([what]) from error
    return table.column("v").combine_chunks()


def check_column_names(columns: Sequence[str], known: Sequence[str], label: str) -> list[str]:
    """A problem for a column that looks like a misspelled known one (its data would be dropped); a warning for
    other unknown columns, which are ignored."""
    from kalm_st.data.columns import is_numbered_negative

    problems, ignored = [], []
    absent = [c for c in known if c not in columns]
    for column in columns:
        if column in known or is_numbered_negative(column):
            continue
        close = difflib.get_close_matches(column, absent, n=1, cutoff=0.8)
        if close:
            problems.append(
                f"{label}: column {column!r} is not a column kalm-st reads; did you mean {close[0]!r}? "
                "(rename it, or drop it)"
            )
        else:
            ignored.append(column)
    if ignored:
        logger.warning("%s: ignoring column(s) %s (kalm-st reads %s and negative_1..n)", label, ignored, list(known))
    return problems


_HASH_BYTES = 1 << 19  # text bytes hashed at once: ~20 MB of numpy scratch (several 8-byte arrays per byte)
_PRIMES = (np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15))


def text_hashes(texts: pa.Array, prime: int = 0) -> np.ndarray:
    """A 64-bit polynomial hash of each text's UTF-8 bytes (``sum b_j * P^j``, wrapping), straight from the Arrow
    buffers with numpy: no Python string per row. Missing texts hash like empty ones."""
    texts = pc.fill_null(texts.cast(pa.large_string()), "")
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = (
        np.frombuffer(texts.buffers()[2], dtype=np.uint8) if texts.buffers()[2] is not None else np.zeros(0, np.uint8)
    )
    lengths = np.diff(offsets)
    out = lengths.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)  # the length, mixed in
    powers = np.cumprod(np.full(max(int(lengths.max(initial=0)), 1), _PRIMES[prime], dtype=np.uint64))
    row = 0
    while row < len(texts):  # rows whose bytes fit the scratch budget (at least one)
        end = max(int(np.searchsorted(offsets, offsets[row] + _HASH_BYTES, side="right")) - 1, row + 1)
        end = min(end, len(texts))
        counts = lengths[row:end]
        first = offsets[row:end] - offsets[row]
        position = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
        values = data[offsets[row] : offsets[end]].astype(np.uint64) * powers[position]
        filled = np.flatnonzero(counts > 0)
        if len(filled):
            out[row + filled] += np.add.reduceat(values, first[filled])
        row = end
    return out


def _first_of(keys: np.ndarray, wanted: np.ndarray, chunk: int = 1 << 20) -> int:
    """The first index of ``keys`` whose value is in the sorted ``wanted``, chunk by chunk (bounded memory)."""
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        found = np.flatnonzero(wanted[np.minimum(np.searchsorted(wanted, part), len(wanted) - 1)] == part)
        if len(found):
            return start + int(found[0])
    raise ValueError("no key of wanted in keys")


def repeated_pairs(dataset: Any, batch_size: int = 1 << 16) -> tuple[int, str | None]:
    """``(rows repeating an earlier (anchor, positive) pair, an example anchor)``: a 64-bit hash of each pair
    (:func:`text_hashes`), counted with numpy; kept beside a cached dataset's Arrow file, so once per fingerprint."""
    files = getattr(dataset, "cache_files", None) or []
    marker = None
    if files:
        digest = hashlib.sha256(f"{dataset._fingerprint}:{len(dataset)}".encode()).hexdigest()[:16]
        marker = Path(files[0]["filename"]).parent / f"duplicates-{digest}.json"
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf8"))
            return found["repeated"], found["example"]
    joined, done = np.empty(len(dataset), np.uint64), 0
    for table in dataset.select_columns(["anchor", "positive"]).with_format("arrow").iter(batch_size=batch_size):
        with np.errstate(over="ignore"):
            keys = text_hashes(table.column("anchor"), 0) * _PRIMES[1] ^ text_hashes(table.column("positive"), 1)
        joined[done : done + len(keys)], done = keys, done + len(keys)
    ordered = np.sort(joined)  # 16 bytes a row in all (np.unique would keep several more arrays of the rows)
    again = ordered[1:] == ordered[:-1]
    repeated = int(np.count_nonzero(again))
    example = None
    if repeated:
        row = _first_of(joined, np.unique(ordered[1:][again]))  # the earliest pair that repeats
        example = dataset.select_columns(["anchor"]).with_format("arrow")[row : row + 1].column(0)[0].as_py()
    if marker is not None:
        try:
            marker.write_text(json.dumps({"repeated": repeated, "example": example}), encoding="utf8")
        except OSError:  # a read-only cache: counted again next time
            pass
    return repeated, example


__all__ = ["DataValidationError", "Problems", "check_column_names", "repeated_pairs"]
