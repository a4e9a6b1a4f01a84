"""Hard-negative mining with the previous-stage model (METHOD.md §5), at any corpus size.

The same selection as sentence-transformers' ``util.mine_hard_negatives`` (top ``range_max`` candidates after removing
the query's positives, ``num_negatives`` sampled from ranks ``range_min .. range_max - 1``), built for corpora that
do not fit in Python lists: embeddings go through the on-disk store of :mod:`kalm_st.data.embedding_store` (chunked,
resumable, shared between steps that encode the same texts with the same model), the search through
:mod:`kalm_st.data.retrieval` (exact; faiss when installed), and the selection is numpy over integer ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from tqdm.auto import tqdm

from kalm_st.data.candidates import arrow_column, column_array, encode_candidates, rows_by_query
from kalm_st.data.columns import negative_columns
from kalm_st.data.embedding_store import as_arrow_strings, model_fingerprint, text_keys
from kalm_st.data.positive_groups import POSITIVE_GROUP
from kalm_st.io import atomic_file

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

QUERY_CHUNK = 1024
"""Queries searched and sampled together; the random draws are seeded per chunk of this many distinct queries."""


def mine_hard_negatives(
    dataset: Dataset,
    model: SentenceTransformer,
    *,
    corpus: Sequence[str] | pa.Array | None = None,
    range_min: int = 50,
    range_max: int = 100,
    num_negatives: int = 7,
    sampling_strategy: Literal["random", "top"] = "random",
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    output_scores: bool = False,
    exclude_query: bool = True,
    batch_size: int = 32,
    use_faiss: bool | None = None,
    cache_folder: str | os.PathLike[str] | None = None,
    chunk_size: int = 8192,
    devices: Sequence[str] | None = None,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> Dataset:
    """Mine ``num_negatives`` hard negatives per row, KaLM's defaults [read]: ranks 50-100, 7 negatives, random.

    Candidates of a row are the corpus texts (``corpus`` plus every positive of ``dataset``, deduplicated) ranked by
    the model's similarity to the row's anchor, after removing every positive of that anchor (any row with the same
    anchor text) and, with ``exclude_query`` (default), the anchor's own text (symmetric data: a sentence that is an
    anchor in one row and a positive in another would otherwise be its own hardest negative). Ranks are 0-based and
    counted after that removal; ``sampling_strategy="random"`` draws ``num_negatives`` distinct candidates of ranks
    ``range_min .. range_max - 1`` uniformly (seeded), ``"top"`` takes the best of them.

    Prompts as in sentence-transformers: ``query_prompt`` / ``corpus_prompt`` ``None`` lets the model use its own
    ``"query"`` / ``"document"`` prompt, ``""`` adds nothing; take them from :func:`kalm_st.instructions.column_prompts`
    to encode as training does (``kalm-st mine`` does).

    Scale: embeddings are cached under ``cache_folder`` (memory-mapped parts of ``chunk_size`` texts: a killed run
    resumes after its last finished chunk, and another step encoding the same texts with the same model reuses
    them); the search is exact, blockwise in torch or with faiss (``use_faiss``: None = when installed); encoding
    spreads over several GPUs when present (``devices``, sentence-transformers' multi-process pool).

    Returns:
        ``Dataset(anchor, positive, negative_1..negative_n[, label])`` in the input's row order; rows whose positive
        equals the anchor, and rows with fewer than ``num_negatives`` candidates in the range, are dropped (logged);
        ``label`` holds the model's ``[s(q, p), s(q, n_1), ...]`` if ``output_scores``. With ``cache_folder`` the
        result is an Arrow file there (memory-mapped), else in memory.
    """
    if not 0 <= range_min < range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got range_min={range_min}, range_max={range_max}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if sampling_strategy not in ("random", "top"):
        raise ValueError(f"sampling_strategy must be 'random' or 'top', got {sampling_strategy!r}")
    anchors, positives = column_array(dataset, "anchor"), column_array(dataset, "positive")
    self_pairs = pc.equal(anchors, positives).to_numpy(zero_copy_only=False)
    if self_pairs.any():
        logger.warning("mine_hard_negatives: dropping %d row(s) whose positive equals the anchor", self_pairs.sum())
    kept_rows = np.flatnonzero(~self_pairs)
    anchors, positives = anchors.take(pa.array(kept_rows)), positives.take(pa.array(kept_rows))
    # one query's positives (kalm_st.data.positive_groups) stay grouped in the output
    groups = (
        arrow_column(dataset, POSITIVE_GROUP).take(pa.array(kept_rows))
        if POSITIVE_GROUP in dataset.column_names
        else None
    )
    found = encode_candidates(
        anchors,
        positives,
        model,
        corpus=[as_arrow_strings(corpus)] if corpus is not None else [],
        exclude_query=exclude_query,
        query_prompt=query_prompt,
        corpus_prompt=corpus_prompt,
        cache_folder=cache_folder,
        batch_size=batch_size,
        chunk_size=chunk_size,
        devices=devices,
        use_faiss=use_faiss,
        show_progress_bar=show_progress_bar,
    )
    index, query_emb, doc_emb = found.index, found.query_embeddings, found.document_embeddings
    k = range_max + index.max_excluded
    n_rows = len(anchors)
    negatives = np.full((n_rows, num_negatives), -1, dtype=np.int64)
    negative_scores = np.zeros((n_rows, num_negatives), dtype=np.float32)
    chunks = rows_by_query(index.query_of_row, len(index.queries), QUERY_CHUNK)
    for number, (first, end, rows) in enumerate(tqdm(chunks, desc="Mining", disable=not show_progress_bar)):
        if len(rows) == 0:
            continue
        scores, ids = found.searcher.search(query_emb[first:end], k)
        query_ids = np.arange(first, end)
        valid = ~index.is_excluded(query_ids, ids)
        rank = np.cumsum(valid, axis=1) - 1
        in_range = valid & (rank >= range_min) & (rank < range_max)
        local = index.query_of_row[rows] - first  # each row's query within the chunk
        candidates = in_range[local]  # (R, k)
        if sampling_strategy == "random":
            keys = np.random.default_rng([seed, number]).random(candidates.shape)
        else:
            keys = np.broadcast_to(np.arange(candidates.shape[1], dtype=np.float64), candidates.shape).copy()
        keys[~candidates] = np.inf
        chosen = np.argsort(keys, axis=1, kind="stable")[:, :num_negatives]  # (R, n) positions in the ranking
        enough = candidates.sum(axis=1) >= num_negatives
        if sampling_strategy == "top":
            chosen = np.sort(chosen, axis=1)
        negatives[rows[enough]] = np.take_along_axis(ids[local], chosen, axis=1)[enough]
        negative_scores[rows[enough]] = np.take_along_axis(scores[local], chosen, axis=1)[enough]
    ok = np.flatnonzero(negatives[:, 0] >= 0)
    dropped = n_rows - len(ok)
    if dropped:
        logger.info(
            "mine_hard_negatives: %d of %d row(s) dropped: fewer than %d candidates in ranks %d-%d",
            dropped,
            n_rows,
            num_negatives,
            range_min,
            range_max,
        )
    label = None
    if output_scores:
        q = query_emb[index.query_of_row[ok]]
        p = doc_emb[index.positive_of_row[ok]]
        label = np.concatenate([np.einsum("nd,nd->n", q, p)[:, None], negative_scores[ok]], axis=1)
    table = _mined_table(anchors, positives, index.documents, ok, negatives[ok], label)
    if groups is not None:
        table = table.append_column(POSITIVE_GROUP, groups.take(pa.array(ok)))
    # the file name covers everything the rows depend on, so two different results never share a path (datasets
    # fingerprints a memory-mapped dataset by its file)
    params = (
        [model_fingerprint(model), query_prompt, corpus_prompt, range_min, range_max, num_negatives,
         sampling_strategy, output_scores, exclude_query, seed,
         hashlib.sha256(groups.to_numpy().tobytes()).hexdigest() if groups is not None else None]
        if cache_folder is not None
        else []
    )  # fmt: skip
    return _as_dataset(table, cache_folder, [anchors, positives, index.documents], params)


def _mined_table(
    anchors: pa.Array,
    positives: pa.Array,
    documents: pa.Array,
    rows: np.ndarray,
    negatives: np.ndarray,
    label: np.ndarray | None,
) -> pa.Table:
    columns = {"anchor": anchors.take(pa.array(rows)), "positive": positives.take(pa.array(rows))}
    for j, name in enumerate(negative_columns(negatives.shape[1])):
        columns[name] = documents.take(pa.array(negatives[:, j]))
    if label is not None:
        width = label.shape[1]
        offsets = pa.array(np.arange(0, label.size + 1, width, dtype=np.int32))
        columns["label"] = pa.ListArray.from_arrays(offsets, pa.array(label.astype(np.float64).ravel()))
    return pa.table(columns)


def _as_dataset(table: pa.Table, folder: str | os.PathLike[str] | None, texts: list[pa.Array], params: Any) -> Dataset:
    """The table as a Dataset: an Arrow file under ``folder`` (memory-mapped, named by its inputs), else in memory."""
    if folder is None:
        return Dataset(pa.Table.from_batches(table.to_batches()))
    digest = hashlib.sha256(json.dumps(params).encode())
    for array in texts:
        digest.update(text_keys(array).tobytes())
    path = Path(folder) / f"curated-{digest.hexdigest()[:24]}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=65536):
            writer.write_batch(batch)
    return Dataset.from_file(str(path))


__all__ = ["mine_hard_negatives"]
