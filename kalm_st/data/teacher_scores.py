"""Teacher scores for contrastive distillation (METHOD.md §3), cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset

from kalm_st.data.formats import negative_columns_of

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
    recomputing. The teacher identity is ``teacher_id`` or :func:`teacher_name`; pass ``teacher_id`` when two
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
    anchors = list(dataset["anchor"])
    candidates = [list(dataset[c]) for c in columns[1:]]  # (1 + n) lists of len(dataset)
    n_rows, n_cand = len(anchors), len(candidates)

    cache_file: Path | None = None
    if cache_dir is not None:
        prompts = [] if is_cross_encoder else [query_prompt, document_prompt]  # a cross-encoder uses none
        key = json.dumps([teacher_id or teacher_name(teacher), *prompts, anchors, candidates])
        digest = hashlib.sha256(key.encode("utf8")).hexdigest()[:32]
        cache_file = Path(cache_dir) / f"teacher_scores_{digest}.npy"
        if cache_file.is_file():
            scores = np.load(cache_file)
            if scores.shape == (n_rows, n_cand):
                logger.info("score_with_teacher: loaded cached scores from %s", cache_file)
                return _with_label(dataset, scores)

    if is_cross_encoder:
        pairs = [(a, cand[i]) for cand in candidates for i, a in enumerate(anchors)]
        flat = teacher.predict(
            pairs, batch_size=batch_size, show_progress_bar=show_progress_bar, convert_to_numpy=True
        )
        scores = np.asarray(flat, dtype=np.float64).reshape(n_cand, n_rows).T
    else:
        unique_anchors = list(dict.fromkeys(anchors))
        unique_docs = list(dict.fromkeys(t for cand in candidates for t in cand))
        a_index = {t: i for i, t in enumerate(unique_anchors)}
        d_index = {t: i for i, t in enumerate(unique_docs)}
        query_emb = teacher.encode_query(
            unique_anchors,
            prompt=query_prompt,
            batch_size=batch_size,
            convert_to_tensor=True,
            show_progress_bar=show_progress_bar,
        )
        doc_emb = teacher.encode_document(
            unique_docs,
            prompt=document_prompt,
            batch_size=batch_size,
            convert_to_tensor=True,
            show_progress_bar=show_progress_bar,
        )
        rows_q = torch.tensor([a_index[a] for a in anchors])
        scores = np.empty((n_rows, n_cand), dtype=np.float64)
        for j, cand in enumerate(candidates):
            rows_d = torch.tensor([d_index[t] for t in cand])
            scores[:, j] = teacher.similarity_pairwise(query_emb[rows_q], doc_emb[rows_d]).float().cpu().numpy()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, scores)
        os.replace(tmp, cache_file)
    return _with_label(dataset, scores)


def _with_label(dataset: Dataset, scores: np.ndarray) -> Dataset:
    if "label" in dataset.column_names:
        dataset = dataset.remove_columns("label")
    return dataset.add_column("label", [list(map(float, row)) for row in scores])


__all__ = ["score_with_teacher", "teacher_name"]
