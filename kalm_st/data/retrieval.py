"""Exact top-k inner-product search over embedding matrices of any size (curation's retrieval step).

The query matrix is processed ``query_chunk`` rows at a time and the documents ``doc_block`` rows at a time (both
may be memory-mapped), keeping a running top-k per query, so memory is bounded by one block of scores whatever the
corpus size; on the GPU when there is one. With faiss installed (``pip install kalm-st[faiss]``), ``use_faiss=True`` (or ``None``: when installed)
searches a flat inner-product index instead: the same exact results, faster on large corpora; the corpus must then
fit in memory. Embeddings are expected L2-normalised for cosine similarity.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


class Searcher:
    """Exact inner-product top-k over ``documents`` (``(U, d)``, may be memory-mapped); see the module docstring."""

    def __init__(self, documents: np.ndarray, *, use_faiss: bool | None = None, doc_block: int = 65536) -> None:
        if documents.ndim != 2:
            raise ValueError(f"Searcher: documents must be a (U, d) matrix, got shape {documents.shape}")
        self.documents, self.doc_block = documents, doc_block
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self.index = None
        if self.use_faiss:
            import faiss

            self.index = faiss.IndexFlatIP(documents.shape[1])
            for start in range(0, len(documents), doc_block):
                self.index.add(np.ascontiguousarray(documents[start : start + doc_block], dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(Q, min(k, U))``: the best documents of each query, best first."""
        if queries.ndim != 2 or queries.shape[1] != self.documents.shape[1]:
            raise ValueError(f"Searcher: queries of shape {queries.shape} for documents {self.documents.shape}")
        k = min(int(k), len(self.documents))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if k == 0 or len(q) == 0:
            return np.empty((len(q), k), dtype=np.float32), np.empty((len(q), k), dtype=np.int64)
        if self.index is not None:
            scores, ids = self.index.search(q, k)
            return scores, ids.astype(np.int64)
        return _torch_top_k(torch.from_numpy(q), self.documents, k, self.doc_block)


def top_k(
    queries: np.ndarray,
    documents: np.ndarray,
    k: int,
    *,
    use_faiss: bool | None = None,
    query_chunk: int = 1024,
    doc_block: int = 65536,
    show_progress_bar: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(Q, min(k, U))``: the best documents of each query by inner product, best first;
    float32 scores, int64 ids. Queries go ``query_chunk`` at a time."""
    searcher = Searcher(documents, use_faiss=use_faiss, doc_block=doc_block)
    k = min(int(k), len(documents))
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in tqdm(range(0, len(queries), query_chunk), desc="Searching", disable=not show_progress_bar):
        end = min(start + query_chunk, len(queries))
        scores[start:end], ids[start:end] = searcher.search(queries[start:end], k)
    return scores, ids


def _torch_top_k(q: torch.Tensor, documents: np.ndarray, k: int, doc_block: int) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU searches millions of texts in s
    q = q.to(device)
    best_scores = torch.full((len(q), 0), -float("inf"), device=device)
    best_ids = torch.empty((len(q), 0), dtype=torch.int64, device=device)
    for start in range(0, len(documents), doc_block):
        block = torch.from_numpy(np.ascontiguousarray(documents[start : start + doc_block], dtype=np.float32))
        block_scores, block_ids = torch.topk(q @ block.to(device).T, min(k, len(block)), dim=1)
        merged_scores = torch.cat([best_scores, block_scores], dim=1)
        merged_ids = torch.cat([best_ids, block_ids + start], dim=1)
        order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_ids = merged_scores.gather(1, order), merged_ids.gather(1, order)
    return best_scores.cpu().numpy(), best_ids.cpu().numpy()


__all__ = ["Searcher", "faiss_available", "top_k"]
