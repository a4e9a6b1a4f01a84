"""A resumable, memory-mapped cache of teacher embeddings for every text of a training set.

Layout of a cache folder:

- ``manifest.json``: the teacher's fingerprint, the embedding dimension, the number of texts;
- ``keys.npy``: ``(U, 2)`` uint64, the 128-bit key of each distinct text (the text as it is encoded;
  :func:`kalm_st.data.embedding_store.text_keys`);
- ``embeddings.npy``: ``(U, d)`` float32, memory-mapped (``numpy.lib.format.open_memmap``), row ``u`` for text ``u``;
- ``filled.npy``: ``(U,)`` bool, which rows hold an embedding (written after each chunk: a killed run resumes there).

Keying: a rerun with the same teacher fingerprint keeps every row whose text key it already has and embeds only
the new texts; a changed text has a new key and is re-embedded; a different teacher (name, dimension or weights
checksum) starts the cache afresh. :func:`attach_teacher_embeddings` writes the ``label`` column that
:class:`~kalm_st.losses.EmbeddingDistillation` and :class:`~kalm_st.losses.ContrastiveDistillation` read:
``(2 + n, d)`` floats per row, the teacher embeddings of (anchor, positive, negative_1..n) in column order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kalm_st.data.embedding_store import as_arrow_strings, lookup, model_fingerprint, text_keys
from kalm_st.io import atomic_file, save_numpy_atomic, write_text_atomic

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def teacher_fingerprint(model: Any, name: str) -> str:
    """``name`` + the embedding dimension + a checksum of the weights (:func:`kalm_st.data.embedding_store.
    model_fingerprint`, the key of every embedding cache)."""
    return model_fingerprint(model, name)


def embed_texts(
    texts: Sequence[str] | Any,
    teacher: Any,
    folder: str | os.PathLike[str],
    *,
    teacher_name: str,
    chunk_size: int = 1024,
    batch_size: int = 32,
    max_chunks: int | None = None,
) -> np.ndarray:
    """Embed every distinct text into the cache at ``folder``; return the cache row of each input text ``(N,)``.

    ``texts``: a list or an Arrow string array (no Python object per text then, but for the chunk being encoded).

    Resumable: rows are written chunk by chunk (``chunk_size`` texts, memory-mapped) and marked filled after each
    chunk, so a rerun embeds only what is missing. ``max_chunks`` stops after that many chunks (for tests and for
    splitting a long job); the returned rows are then only valid for filled texts.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = teacher_fingerprint(teacher, teacher_name)
    dim = int(teacher.get_embedding_dimension())
    texts = as_arrow_strings(texts)
    keys = text_keys(texts)
    unique_keys, first, rows = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    unique_keys, first, rows = unique_keys, np.asarray(first), np.asarray(rows).reshape(-1)
    manifest_path = folder / MANIFEST
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    same_layout = (
        old is not None
        and old.get("teacher") == fingerprint
        and (folder / "keys.npy").is_file()
        and np.array_equal(np.load(folder / "keys.npy"), unique_keys)
    )
    if same_layout:
        embeddings = np.load(folder / "embeddings.npy", mmap_mode="r+")
        filled = np.load(folder / "filled.npy")
    else:
        previous = None
        if old is not None and old.get("teacher") == fingerprint and (folder / "keys.npy").is_file():
            previous = (
                np.load(folder / "keys.npy"),
                np.load(folder / "embeddings.npy"),
                np.load(folder / "filled.npy"),
            )
        elif old is not None:
            logger.info(
                "%s: the teacher changed (%s -> %s): re-embedding every text", folder, old.get("teacher"), fingerprint
            )
        filled = np.zeros(len(unique_keys), dtype=bool)
        with atomic_file(folder / "embeddings.npy", suffix=".npy") as tmp:
            embeddings = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(unique_keys), dim))
            if previous is not None:  # keep the rows of texts the cache already has
                old_rows = lookup(unique_keys, previous[0])
                keep = (old_rows >= 0) & previous[2][old_rows.clip(min=0)]
                embeddings[keep] = previous[1][old_rows[keep]]
                filled[keep] = True
            embeddings.flush()
            del embeddings
        save_numpy_atomic(folder / "keys.npy", unique_keys)
        save_numpy_atomic(folder / "filled.npy", filled)
        manifest = {"teacher": fingerprint, "dim": dim, "num_texts": len(unique_keys)}
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
        embeddings = np.load(folder / "embeddings.npy", mmap_mode="r+")
    missing = np.flatnonzero(~filled)
    logger.info(
        "%s: %d distinct texts, %d cached, %d to embed", folder, len(filled), len(filled) - len(missing), len(missing)
    )
    for number, begin in enumerate(range(0, len(missing), chunk_size)):
        if max_chunks is not None and number >= max_chunks:
            break
        chunk = missing[begin : begin + chunk_size]
        chunk_texts = texts.take(pa.array(first[chunk])).to_pylist()
        vectors = teacher.encode(chunk_texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        embeddings[chunk] = np.asarray(vectors, dtype=np.float32)
        embeddings.flush()
        filled[chunk] = True
        save_numpy_atomic(folder / "filled.npy", filled)
    return rows


def load_cache(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, embeddings (memory-mapped), filled)`` of a cache folder."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{folder} is not a teacher-embedding cache (no {MANIFEST}); run kalm-st teacher-embed"
        )
    return (
        np.load(folder / "keys.npy"),
        np.load(folder / "embeddings.npy", mmap_mode="r"),
        np.load(folder / "filled.npy"),
    )


def attach_teacher_embeddings(dataset: Any, folder: str | os.PathLike[str], columns: Sequence[str]) -> Any:
    """``dataset`` with a ``label`` column ``(len(columns), d)`` float32 per row: the cached teacher embeddings of
    the row's texts in ``columns`` (e.g. anchor, positive, negative_1, ...). ``ValueError`` naming the column and
    row of a text the cache lacks."""
    from datasets import Dataset

    from kalm_st.data.candidates import arrow_column

    keys, embeddings, filled = load_cache(folder)
    dim = embeddings.shape[1]
    parts = []
    for column in columns:
        if column not in dataset.column_names:
            raise ValueError(
                f"attach_teacher_embeddings: the dataset has no column {column!r} ({dataset.column_names})"
            )
        rows = lookup(text_keys(arrow_column(dataset, column)), keys)
        ok = rows >= 0
        ok[ok] = filled[rows[ok]]
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"teacher-embedding cache {folder} has no embedding for column {column!r}, row {bad} "
                f"({dataset[bad][column]!r:.80}); run kalm-st teacher-embed on this data first."
            )
        parts.append(np.asarray(embeddings[rows], dtype=np.float32))
    stacked = np.stack(parts, axis=1)  # (N, C, d)
    flat = pa.array(stacked.reshape(-1), type=pa.float32())
    inner = pa.FixedSizeListArray.from_arrays(flat, dim)
    label = pa.FixedSizeListArray.from_arrays(inner, len(columns))
    from datasets.table import InMemoryTable

    table = dataset.flatten_indices().data.table  # the rows in the dataset's order
    if "label" in dataset.column_names:
        table = table.drop(["label"])
    return Dataset(InMemoryTable(table.append_column("label", label)))


def embed_training_data(
    data: Any,
    teacher: Any,
    folder: str | os.PathLike[str],
    *,
    teacher_name: str,
    chunk_size: int = 1024,
    batch_size: int = 32,
) -> Any:
    """Every text of every task (anchor, positive, negatives) embedded into one cache, then each task with its
    ``label`` of teacher embeddings ``(2 + n, d)`` (:func:`attach_teacher_embeddings`; a ``label`` of teacher
    scores is replaced). One cache for all tasks, so a rerun or a killed run embeds only what is missing. The
    teacher embeds the texts as they are, without the student's prompts: its own space is the target."""
    from datasets import DatasetDict

    from kalm_st.data.candidates import arrow_column
    from kalm_st.data.columns import negative_columns_of

    columns = {task: ["anchor", "positive", *negative_columns_of(dataset)] for task, dataset in data.items()}
    texts = pa.chunked_array(
        [as_arrow_strings(arrow_column(dataset, c)) for task, dataset in data.items() for c in columns[task]],
        type=pa.large_string(),
    )
    embed_texts(texts, teacher, folder, teacher_name=teacher_name, chunk_size=chunk_size, batch_size=batch_size)
    return DatasetDict(
        {task: attach_teacher_embeddings(dataset, folder, columns[task]) for task, dataset in data.items()}
    )


__all__ = [
    "attach_teacher_embeddings",
    "embed_texts",
    "embed_training_data",
    "load_cache",
    "teacher_fingerprint",
    "text_keys",
]
