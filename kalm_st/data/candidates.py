"""The retrieval problem behind mining and filtering, in compact arrays: distinct queries and documents of a pair
dataset, which (query, document) pairs are not candidates, and the embeddings of both sides.

Everything is vectorised over Arrow: ``pyarrow.compute.unique`` / ``index_in`` give integer ids, the excluded pairs
are one sorted ``int64`` array of codes ``query * n_documents + document``; no Python object per row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_st.data.embedding_store import as_arrow_strings, encode_cached
from kalm_st.data.retrieval import Searcher

logger = logging.getLogger(__name__)


def arrow_column(dataset: Any, name: str) -> pa.Array:
    """One column of a ``datasets.Dataset`` as one Arrow array in the dataset's row order (no Python objects)."""
    if name not in dataset.column_names:
        raise ValueError(f"missing column {name!r} (have {dataset.column_names})")
    column = dataset.select_columns([name]).with_format("arrow")[:].column(name)
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def column_array(dataset: Any, name: str) -> pa.Array:
    """A text column of a ``datasets.Dataset`` as one Arrow ``large_string`` array in the dataset's row order."""
    return as_arrow_strings(arrow_column(dataset, name))


def _ids(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each value in ``value_set`` (``-1`` where absent), int64."""
    found = pc.index_in(values, value_set=value_set)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass(frozen=True)
class PairIndex:
    """Integer view of ``(anchor, positive)`` rows against a corpus."""

    queries: pa.Array
    """Distinct anchors, in order of first occurrence."""
    documents: pa.Array
    """Distinct candidate texts: the corpus, then every positive (and whatever else was added), deduplicated."""
    query_of_row: np.ndarray
    positive_of_row: np.ndarray
    excluded: np.ndarray
    """Sorted codes ``q * len(documents) + d`` of pairs that are never candidates: every positive of the query (any
    row with the same anchor) and, with ``exclude_query``, the query's own text."""
    max_excluded: int
    """The most excluded documents of one query (how far past ``k`` a search must look)."""

    def is_excluded(self, query_ids: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
        """``(Q, k)`` bool: whether each ``doc_ids[i, j]`` is excluded for ``query_ids[i]``."""
        codes = query_ids[:, None] * len(self.documents) + doc_ids
        if len(self.excluded) == 0:
            return np.zeros(codes.shape, dtype=bool)
        position = np.searchsorted(self.excluded, codes).clip(max=len(self.excluded) - 1)
        return self.excluded[position] == codes


def build_pair_index(
    anchors: pa.Array,
    positives: pa.Array,
    *,
    corpus: Sequence[pa.Array] = (),
    exclude_query: bool = True,
) -> PairIndex:
    """:class:`PairIndex` of the rows: documents are ``corpus`` arrays plus the positives, deduplicated."""
    documents = pc.unique(pa.chunked_array([*corpus, positives], type=pa.large_string()))
    queries = pc.unique(anchors)
    query_of_row, positive_of_row = _ids(anchors, queries), _ids(positives, documents)
    n_docs = len(documents)
    codes = [query_of_row * n_docs + positive_of_row]
    if exclude_query:
        own = _ids(queries, documents)
        present = np.flatnonzero(own >= 0)
        codes.append(present * n_docs + own[present])
    excluded = np.unique(np.concatenate(codes))
    max_excluded = int(np.bincount(excluded // n_docs).max()) if len(excluded) else 0
    return PairIndex(queries, documents, query_of_row, positive_of_row, excluded, max_excluded)


def similarity_normalizes(model: Any) -> bool:
    """Whether the model's similarity is cosine (normalise, then inner product) or dot (inner product as is)."""
    name = str(getattr(model, "similarity_fn_name", None) or "cosine")
    if name not in ("cosine", "dot"):
        raise ValueError(
            f"curation searches by inner product: a model with similarity {name!r} is not supported (use a model "
            "whose similarity_fn_name is 'cosine' or 'dot')"
        )
    return name == "cosine"


@dataclass(frozen=True)
class Candidates:
    """A :class:`PairIndex` with both sides encoded and a searcher over the documents."""

    index: PairIndex
    query_embeddings: np.ndarray
    document_embeddings: np.ndarray
    searcher: Searcher


def encode_candidates(
    anchors: pa.Array,
    positives: pa.Array,
    model: Any,
    *,
    corpus: Sequence[pa.Array] = (),
    exclude_query: bool = True,
    query_prompt: str | None,
    corpus_prompt: str | None,
    cache_folder: str | os.PathLike[str] | None,
    batch_size: int,
    chunk_size: int = 8192,
    devices: Sequence[str] | None = None,
    use_faiss: bool | None = None,
    show_progress_bar: bool = True,
) -> Candidates:
    """Index the rows, encode queries and documents through the on-disk embedding store, and build the search."""
    index = build_pair_index(anchors, positives, corpus=corpus, exclude_query=exclude_query)
    common = {
        "normalize": similarity_normalizes(model),
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "devices": devices,
        "show_progress_bar": show_progress_bar,
    }
    documents = encode_cached(model, index.documents, cache_folder, role="document", prompt=corpus_prompt, **common)
    queries = encode_cached(model, index.queries, cache_folder, role="query", prompt=query_prompt, **common)
    return Candidates(index, queries, documents, Searcher(documents, use_faiss=use_faiss))


def rows_by_query(query_of_row: np.ndarray, n_queries: int, chunk: int) -> list[tuple[int, int, np.ndarray]]:
    """``(first query, end query, rows)`` per chunk of ``chunk`` queries: the rows of those queries, in row order."""
    order = np.argsort(query_of_row, kind="stable")
    bounds = np.searchsorted(query_of_row[order], np.arange(0, n_queries + chunk, chunk).clip(max=n_queries))
    return [
        (q, min(q + chunk, n_queries), order[bounds[i] : bounds[i + 1]])
        for i, q in enumerate(range(0, n_queries, chunk))
    ]


__all__ = [
    "Candidates",
    "PairIndex",
    "arrow_column",
    "build_pair_index",
    "column_array",
    "encode_candidates",
    "rows_by_query",
    "similarity_normalizes",
]
