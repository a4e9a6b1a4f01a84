"""Teacher scores for contrastive distillation (METHOD.md §3), cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from kalm_st.data.candidates import arrow_column, column_array
from kalm_st.data.columns import negative_columns_of
from kalm_st.data.embedding_store import encode_cached, text_keys
from kalm_st.data.positive_groups import POSITIVE_GROUP, group_starts
from kalm_st.io import save_numpy_atomic

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

logger = logging.getLogger(__name__)


def teacher_name(teacher: SentenceTransformer | CrossEncoder) -> str:
    """A stable identity of a teacher for the cache key: its class and where its weights came from."""
    name = getattr(getattr(teacher, "model_card_data", None), "base_model", None)
    if not name:
        first = teacher[0] if hasattr(teacher, "__getitem__") else teacher
        auto_model = getattr(first, "auto_model", getattr(teacher, "model", None))
        name = getattr(getattr(auto_model, "config", None), "_name_or_path", None)
    return f"{type(teacher).__name__}:{name or 'unknown'}"


def score_with_teacher(
    dataset: Dataset,
    teacher: SentenceTransformer | CrossEncoder,
    *,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    teacher_id: str | None = None,
    chunk_size: int = 8192,
    show_progress_bar: bool = True,
) -> Dataset:
    """Teacher scores of each row's ``[positive, negative_1, .., negative_n]`` into the ``label`` column.

    A ``SentenceTransformer`` teacher scores with its own similarity function (cosine for most) between
    ``encode_query(anchor, prompt=query_prompt)`` and ``encode_document(text, prompt=document_prompt)``; each
    distinct text is embedded once. Prompts as in sentence-transformers: ``None`` lets the model use its own
    ``"query"`` / ``"document"`` prompt, ``""`` adds nothing (the curation CLI always passes strings, from
    :func:`kalm_st.instructions.column_prompts`).

    A ``CrossEncoder`` teacher scores ``(anchor, text)`` pairs with ``predict`` (its default activation), on the
    texts as they are in ``dataset``: it takes **no prompts** (a reranker has its own input format; write any
    instruction into the texts instead), and a non-empty ``query_prompt`` or ``document_prompt`` is a
    ``ValueError`` rather than being dropped silently.

    With ``cache_dir``, the scores are stored in ``{cache_dir}/teacher_scores_{hash}.npy`` keyed by (teacher
    identity, prompts (bi-encoder only), every row's texts); a rerun on the same data loads them instead of
    recomputing. Work goes ``chunk_size`` rows (or texts) at a time and is saved per chunk (a bi-encoder's
    embeddings in the store under ``{cache_dir}/embeddings``, a reranker's scores beside the result file), so a
    killed run resumes after its last finished chunk. The teacher identity is ``teacher_id`` or :func:`teacher_name`; pass ``teacher_id`` when two
    teachers share a name.

    Raises:
        ValueError: a missing column; prompts for a ``CrossEncoder`` teacher.
    """
    from sentence_transformers import CrossEncoder

    columns = ["anchor", "positive", *negative_columns_of(dataset)]
    for column in columns[:2]:
        if column not in dataset.column_names:
            raise ValueError(f"score_with_teacher: missing column {column!r} (have {dataset.column_names})")
    is_cross_encoder = isinstance(teacher, CrossEncoder)
    if is_cross_encoder and (query_prompt or document_prompt):
        raise ValueError(
            f"score_with_teacher: a CrossEncoder teacher takes no prompts (got query_prompt={query_prompt!r}, "
            f"document_prompt={document_prompt!r}): it scores (anchor, text) pairs as written, in its own input "
            "format. Pass no prompts, or write the instruction into the texts"
        )
    anchors = column_array(dataset, "anchor")
    candidates = [column_array(dataset, c) for c in columns[1:]]  # (1 + n) arrays of len(dataset)
    n_rows, n_cand = len(anchors), len(candidates)

    cache_file: Path | None = None
    if cache_dir is not None:
        if not is_cross_encoder:  # the prompts the teacher will use, resolved as encode_query/encode_document do
            prompts = getattr(teacher, "prompts", None) or {}
            query_prompt = prompts.get("query", "") if query_prompt is None else query_prompt
            document_prompt = prompts.get("document", "") if document_prompt is None else document_prompt
        prompts_key = [] if is_cross_encoder else [query_prompt, document_prompt]  # a reranker uses none
        key = hashlib.sha256(json.dumps([teacher_id or teacher_name(teacher), *prompts_key]).encode())
        for array in (anchors, *candidates):
            key.update(text_keys(array).tobytes())
        cache_file = Path(cache_dir) / f"teacher_scores_{key.hexdigest()[:32]}.npy"
        if cache_file.is_file():
            scores = np.load(cache_file)
            if scores.shape == (n_rows, n_cand):
                logger.info("score_with_teacher: loaded cached scores from %s", cache_file)
                return _with_label(dataset, scores)

    if is_cross_encoder:
        scores = _cross_encoder_scores(
            teacher, anchors, candidates, cache_file, batch_size, chunk_size, show_progress_bar
        )
    else:
        root = Path(cache_dir) / "embeddings" if cache_dir is not None else None
        queries = pc.unique(anchors)
        documents = pc.unique(pa.chunked_array(candidates, type=pa.large_string()))
        common = {"normalize": False, "batch_size": batch_size, "chunk_size": chunk_size}
        query_emb = encode_cached(teacher, queries, root, role="query", prompt=query_prompt, **common)
        doc_emb = encode_cached(teacher, documents, root, role="document", prompt=document_prompt, **common)
        query_rows = _positions(anchors, queries)
        doc_rows = [_positions(column, documents) for column in candidates]
        scores = np.empty((n_rows, n_cand), dtype=np.float64)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            q = torch.from_numpy(np.asarray(query_emb[query_rows[start:end]]))
            for j, rows in enumerate(doc_rows):
                d = torch.from_numpy(np.asarray(doc_emb[rows[start:end]]))
                scores[start:end, j] = teacher.similarity_pairwise(q, d).float().numpy()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_numpy_atomic(cache_file, scores)
        shutil.rmtree(cache_file.with_suffix(".parts"), ignore_errors=True)
    return _with_label(dataset, scores)


def _positions(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    return pc.index_in(values, value_set=value_set).to_numpy(zero_copy_only=False).astype(np.int64)


def _cross_encoder_scores(
    teacher: CrossEncoder,
    anchors: pa.Array,
    candidates: list[pa.Array],
    cache_file: Path | None,
    batch_size: int,
    chunk_size: int,
    show_progress_bar: bool,
) -> np.ndarray:
    """``(rows, candidates)`` reranker scores, ``chunk_size`` rows at a time; with a cache file, each finished chunk
    is saved beside it (``.parts/``), so a killed run resumes after its last chunk."""
    from tqdm.auto import tqdm

    n_rows = len(anchors)
    parts = cache_file.with_suffix(".parts") if cache_file is not None else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
    scores = np.empty((n_rows, len(candidates)), dtype=np.float64)
    starts = range(0, n_rows, chunk_size)
    for start in tqdm(starts, desc="Teacher scores", disable=not show_progress_bar):
        end = min(start + chunk_size, n_rows)
        part = parts / f"rows-{start:012d}.npy" if parts is not None else None
        if part is not None and part.is_file():
            scores[start:end] = np.load(part)
            continue
        chunk_anchors = anchors.slice(start, end - start).to_pylist()
        pairs = [
            (a, t)
            for column in candidates
            for a, t in zip(chunk_anchors, column.slice(start, end - start).to_pylist(), strict=True)
        ]
        flat = teacher.predict(pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
        scores[start:end] = np.asarray(flat, dtype=np.float64).reshape(len(candidates), end - start).T
        if part is not None:
            save_numpy_atomic(part, scores[start:end])
    return scores


def _with_label(dataset: Dataset, scores: np.ndarray) -> Dataset:
    """``dataset`` with ``label`` = each row's scores, a ``list<double>`` column built from the array (no per-row
    Python lists)."""
    if "label" in dataset.column_names:
        dataset = dataset.remove_columns("label")
    offsets = pa.array(np.arange(0, scores.size + 1, scores.shape[1], dtype=np.int64))
    label = pa.LargeListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(scores, dtype=np.float64).ravel()))
    return dataset.add_column("label", label.cast(pa.list_(pa.float64())))


def as_flag_embedding(dataset: Dataset) -> Dataset:
    """Scored rows in FlagEmbedding's layout: ``query``, ``pos: [positive]``, ``neg: [negative_1..n]``,
    ``pos_scores: [label[0]]``, ``neg_scores: label[1:]`` (the raw teacher scores, aligned with ``pos`` / ``neg``),
    built from the Arrow columns (no per-row Python objects).

    Rows of one ``positive_group`` (one query's positives, :mod:`kalm_st.data.positive_groups`) become one row again:
    ``pos`` lists their positives in order, ``neg`` their negatives one row after another (each row may have been
    mined its own), the scores aligned with both."""
    for column in ("anchor", "positive", "label"):
        if column not in dataset.column_names:
            raise ValueError(f"as_flag_embedding: missing column {column!r} (have {dataset.column_names})")
    negatives = negative_columns_of(dataset)
    n_rows, n_neg = len(dataset), len(negatives)
    label = arrow_column(dataset, "label")
    widths = pc.list_value_length(label).to_numpy(zero_copy_only=False)
    if len(widths) and not (widths == 1 + n_neg).all():
        row = int(np.flatnonzero(widths != 1 + n_neg)[0])
        raise ValueError(f"as_flag_embedding: row {row}: label has {widths[row]} scores for {1 + n_neg} texts")
    scores = pc.list_flatten(label).to_numpy(zero_copy_only=False).astype(np.float64).reshape(n_rows, 1 + n_neg)
    # output row g holds input rows starts[g] .. starts[g + 1] - 1 (one each without groups)
    starts = group_starts(dataset) if POSITIVE_GROUP in dataset.column_names else np.arange(n_rows, dtype=np.int64)
    bounds = np.append(starts, n_rows)
    per_group = pa.array(bounds.astype(np.int32))  # positives (and their scores) of each output row
    per_group_neg = pa.array((bounds * n_neg).astype(np.int32))  # n_neg negatives per input row (0: empty lists)
    order = (np.arange(n_neg)[None, :] * n_rows + np.arange(n_rows)[:, None]).ravel()  # row i's negatives together
    stacked = pa.concat_arrays([column_array(dataset, c) for c in negatives] or [pa.array([], pa.large_string())])
    table = pa.table(
        {
            "query": column_array(dataset, "anchor").take(pa.array(starts)),
            "pos": pa.ListArray.from_arrays(per_group, column_array(dataset, "positive")),
            "neg": pa.ListArray.from_arrays(per_group_neg, stacked.take(pa.array(order, type=pa.int64()))),
            "pos_scores": pa.ListArray.from_arrays(per_group, pa.array(scores[:, 0])),
            "neg_scores": pa.ListArray.from_arrays(per_group_neg, pa.array(scores[:, 1:].ravel())),
        }
    )
    return Dataset(table)


def write_flag_embedding(data: Any, folder: str | os.PathLike[str]) -> Path:
    """Scored tasks (a ``DatasetDict``) as FlagEmbedding's training layout: ``folder/{task}.jsonl``, atomically.
    Scores keep 15 significant digits (pandas' JSON writer at its most precise)."""
    from kalm_st.io import atomic_directory

    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        for task, dataset in data.items():
            as_flag_embedding(dataset).to_json(
                str(tmp / f"{task}.jsonl"), lines=True, force_ascii=False, double_precision=15
            )
    return folder


__all__ = ["as_flag_embedding", "score_with_teacher", "teacher_name", "write_flag_embedding"]
