"""Several positives per query, one per row per epoch: the rows of a group and the seeded draw of each epoch.

A KaLM / FlagEmbedding row with ``k`` positives (``pos`` list) is read as ``k`` consecutive rows that share the query,
the negatives and the row's teacher scores, each with one positive (:mod:`kalm_st.data.load`),
and a :data:`POSITIVE_GROUP` column: the source row they came from. Before training, :func:`split_positive_groups`
takes that column out of the datasets (sentence-transformers' collator would tokenize it; its prompts and model
card would show it) and keeps, per task, the first row of each group as one int64 array (on disk next to the Arrow
cache, memory-mapped, when the dataset has one). :class:`kalm_st.sampling.TaskHomogeneousBatchSampler` then samples
groups rather than rows: at epoch ``e`` group ``g`` contributes the row :func:`draw_members` picks, a counter-based
hash of ``(seed, e, g)``, so each epoch trains one positive per query, a different draw each epoch, the same draw
for the same seed and epoch on every rank and every restart.

Why rows and not a hidden list column: sentence-transformers' collator, prompts and model card see every column of
a training dataset, and a list of positives is not a text. Rows keep the datasets plain and the pool on disk.
The curation steps (``mine``, ``filter``, ``teacher-score``) keep the column, so a curated file read back trains
the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from kalm_st.data.columns import POSITIVE_GROUP
from kalm_st.io import save_numpy_atomic

_EPOCH_SALT = 1 << 20  # draw streams of the epochs, apart from the load-time streams (0: positive, 1..n: negatives)

GroupStarts = np.ndarray | str
"""First row of each group: an int64 array, or the path of a ``.npy`` file holding it (memory-mapped on load)."""


def group_starts(dataset: Any, batch_size: int = 1 << 22) -> np.ndarray:
    """The first row of each run of equal :data:`POSITIVE_GROUP` values (int64, ascending, starts with 0).

    Groups are runs, not values: the rows of a group are consecutive (as written by the reader, :mod:`kalm_st.data.load`, kept by the
    curation steps). Read in Arrow batches of ``batch_size`` rows; memory is one int64 per group.
    """
    if POSITIVE_GROUP not in dataset.column_names:
        raise ValueError(f"no {POSITIVE_GROUP!r} column (have {dataset.column_names})")
    starts, previous, offset = [], None, 0
    for table in dataset.select_columns([POSITIVE_GROUP]).with_format("arrow").iter(batch_size=batch_size):
        values = pc.fill_null(table.column(POSITIVE_GROUP), -1).to_numpy()
        if not len(values):
            continue
        change = np.empty(len(values), dtype=bool)
        change[0] = previous is None or values[0] != previous
        np.not_equal(values[1:], values[:-1], out=change[1:])
        starts.append(np.flatnonzero(change).astype(np.int64) + offset)
        previous, offset = values[-1], offset + len(values)
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def _starts_file(dataset: Any) -> Path | None:
    """Where a dataset's group starts are kept: beside its first Arrow cache file, named by its fingerprint."""
    files = getattr(dataset, "cache_files", None) or []
    if not files:
        return None
    digest = hashlib.sha256(f"{dataset._fingerprint}:{len(dataset)}".encode()).hexdigest()[:16]
    return Path(files[0]["filename"]).parent / f"positive_groups-{digest}.npy"


def _save_starts(starts: np.ndarray, path: Path) -> bool:
    """Write atomically; False when the cache folder is read-only (the array is then kept in memory)."""
    try:
        save_numpy_atomic(path, starts)
    except OSError:
        return False
    return True


def split_positive_groups(datasets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, GroupStarts]]:
    """``({task: dataset without POSITIVE_GROUP}, {task: group starts})`` for the tasks that have the column.

    A task whose groups all have one row (one positive per query) is returned without the column and without
    starts: the sampler treats it as rows. Starts of a cached dataset are written once beside its Arrow cache
    (``positive_groups-{fingerprint}.npy``) and passed as that path, so the training arguments that carry them
    (pickled into every checkpoint) stay small.
    """
    plain, groups = {}, {}
    for task, dataset in datasets.items():
        if POSITIVE_GROUP not in dataset.column_names:
            plain[task] = dataset
            continue
        path = _starts_file(dataset)
        if path is not None and path.exists():
            groups[task] = str(path)
        else:
            starts = group_starts(dataset)
            if len(starts) < len(dataset):
                groups[task] = str(path) if path is not None and _save_starts(starts, path) else starts
        plain[task] = dataset.remove_columns([POSITIVE_GROUP])
    return plain, groups


def load_starts(starts: GroupStarts, n_rows: int, what: str = "task") -> np.ndarray:
    """The starts as an int64 array (a ``.npy`` path memory-mapped), checked against the task's ``n_rows``."""
    array = np.load(starts, mmap_mode="r") if isinstance(starts, str | Path) else np.asarray(starts)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{what}: positive groups must be a 1-D integer array, got {array.dtype} {array.shape}")
    if len(array) and (array[0] != 0 or array[-1] >= n_rows or np.any(np.diff(array) <= 0)):
        raise ValueError(
            f"{what}: positive groups must start at row 0 and increase strictly below {n_rows} rows "
            f"(first {int(array[0])}, last {int(array[-1])})"
        )
    return array


def mix(seed: int, rows: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``(seed, row, salt)``: a counter-based uint64 per row, independent of batching; the draws of
    the reader (a row's positive, its resampled negatives) and of the sampler (each epoch's member of a group)."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 0x632BE59BD9B4E019 + salt * 0x85EBCA77C2B2AE63) & 0xFFFFFFFFFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def draw_members(starts: np.ndarray, n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """One row per group for ``epoch``: ``starts[g] + h(seed, epoch, g) mod size[g]`` (int64, one per group).

    ``h`` is splitmix64 (:func:`mix`), counter-based: independent of batching, ranks and the
    order groups are visited in.
    """
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.diff(np.append(starts, n_rows)).astype(np.uint64)
    offsets = mix(seed, np.arange(len(starts), dtype=np.int64), _EPOCH_SALT + int(epoch)) % np.maximum(sizes, 1)
    return starts + offsets.astype(np.int64)


__all__ = ["POSITIVE_GROUP", "draw_members", "group_starts", "load_starts", "mix", "split_positive_groups"]
