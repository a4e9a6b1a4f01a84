"""Ranking-consistency filtering (METHOD.md §5): drop an example whose positive is not in the top k.

Built on the same pieces as mining (:mod:`kalm_st.data.candidates`): embeddings from the on-disk store (chunked,
resumable, shared with a mining step over the same texts), an exact top-k search, numpy over integer ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from datasets import Dataset
from tqdm.auto import tqdm

from kalm_st.data.candidates import column_array, encode_candidates, rows_by_query
from kalm_st.data.columns import negative_columns_of
from kalm_st.data.embedding_store import as_arrow_strings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

QUERY_CHUNK = 1024


@dataclass(frozen=True)
class FilterReport:
    """What :func:`filter_by_rank` kept and dropped."""

    total: int
    kept: int
    dropped: int
    top_k: int
    ranks: np.ndarray
    """0-based rank of each input row's positive (0 = the best candidate), capped at ``top_k`` (``top_k``: not in
    the top ``top_k``; ranks further down are not computed)."""

    def __str__(self) -> str:
        share = self.dropped / self.total if self.total else 0.0
        return (
            f"kept {self.kept} of {self.total} rows, dropped {self.dropped} ({share:.1%}) not in the top {self.top_k}"
        )


def positive_ranks(
    dataset: Dataset,
    model: SentenceTransformer,
    *,
    limit: int,
    corpus: Sequence[str] | pa.Array | None = None,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    batch_size: int = 32,
    cache_folder: str | os.PathLike[str] | None = None,
    chunk_size: int = 8192,
    use_faiss: bool | None = None,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """0-based rank of each row's positive among the corpus for the row's anchor, capped at ``limit``.

    The corpus is ``corpus`` (if given) plus every positive and negative text of ``dataset``, deduplicated. The rank
    counts the candidates scoring strictly higher than the positive, not counting the anchor's own text and the
    anchor's other positives (rows with the same anchor). Only the top ``limit`` (plus the excluded texts) of each
    anchor are retrieved, so a rank of ``limit`` or more is reported as ``limit``.
    """
    anchors, positives = column_array(dataset, "anchor"), column_array(dataset, "positive")
    extra = [as_arrow_strings(corpus)] if corpus is not None else []
    extra += [column_array(dataset, column) for column in negative_columns_of(dataset)]
    found = encode_candidates(
        anchors,
        positives,
        model,
        corpus=extra,
        query_prompt=query_prompt,
        corpus_prompt=corpus_prompt,
        cache_folder=cache_folder,
        batch_size=batch_size,
        chunk_size=chunk_size,
        use_faiss=use_faiss,
        show_progress_bar=show_progress_bar,
    )
    index, query_emb, doc_emb = found.index, found.query_embeddings, found.document_embeddings
    ranks = np.full(len(anchors), limit, dtype=np.int64)
    chunks = rows_by_query(index.query_of_row, len(index.queries), QUERY_CHUNK)
    for first, end, rows in tqdm(chunks, desc="Ranking positives", disable=not show_progress_bar):
        if len(rows) == 0:
            continue
        scores, ids = found.searcher.search(query_emb[first:end], limit + index.max_excluded)
        valid = ~index.is_excluded(np.arange(first, end), ids)
        local = index.query_of_row[rows] - first
        positive_scores = np.einsum(
            "nd,nd->n", query_emb[index.query_of_row[rows]], doc_emb[index.positive_of_row[rows]]
        )
        better = (scores[local] > positive_scores[:, None]) & valid[local]
        ranks[rows] = np.minimum(better.sum(axis=1), limit)
    return ranks


def filter_by_rank(
    dataset: Dataset,
    model: SentenceTransformer,
    *,
    top_k: int = 50,
    corpus: Sequence[str] | None = None,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    batch_size: int = 32,
    cache_folder: str | os.PathLike[str] | None = None,
    chunk_size: int = 8192,
    use_faiss: bool | None = None,
    show_progress_bar: bool = True,
) -> tuple[Dataset, FilterReport]:
    """Ranking-consistency filtering [read]: drop each row whose positive is not in its anchor's top ``top_k``.

    A row is kept iff its positive's 0-based rank (see :func:`positive_ranks`) is ``< top_k``. Returns the kept rows
    (all columns, original order) and a :class:`FilterReport`, also logged at INFO.

    ``query_prompt`` encodes the anchors, ``corpus_prompt`` every candidate. As in sentence-transformers, ``None``
    lets the model use its own ``"query"`` / ``"document"`` prompt and ``""`` adds nothing; training's prompts come
    from :func:`kalm_st.instructions.column_prompts`, as in ``kalm-st filter``. ``cache_folder``, ``chunk_size``
    and ``use_faiss`` as in :func:`kalm_st.data.mine_hard_negatives` (a mining step over the same texts with the same
    model and prompts reuses the embeddings).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ranks = positive_ranks(
        dataset,
        model,
        limit=top_k,
        corpus=corpus,
        query_prompt=query_prompt,
        corpus_prompt=corpus_prompt,
        batch_size=batch_size,
        cache_folder=cache_folder,
        chunk_size=chunk_size,
        use_faiss=use_faiss,
        show_progress_bar=show_progress_bar,
    )
    keep = np.flatnonzero(ranks < top_k)
    report = FilterReport(total=len(ranks), kept=len(keep), dropped=len(ranks) - len(keep), top_k=top_k, ranks=ranks)
    logger.info("filter_by_rank: %s", report)
    return dataset.select(keep), report
