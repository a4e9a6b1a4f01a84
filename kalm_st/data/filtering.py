"""Ranking-consistency filtering (METHOD.md §5): drop an example whose positive is not in the top k."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datasets import Dataset
from tqdm.auto import tqdm

from kalm_st.data.formats import negative_columns_of

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterReport:
    """What :func:`filter_by_rank` kept and dropped."""

    total: int
    kept: int
    dropped: int
    top_k: int
    ranks: list[int]
    """0-based rank of each input row's positive (0 = the best candidate)."""

    def __str__(self) -> str:
        share = self.dropped / self.total if self.total else 0.0
        return (
            f"kept {self.kept} of {self.total} rows, dropped {self.dropped} ({share:.1%}) not in the top {self.top_k}"
        )


def positive_ranks(
    dataset: Dataset,
    model: SentenceTransformer,
    *,
    corpus: Sequence[str] | None = None,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    show_progress_bar: bool = True,
) -> list[int]:
    """0-based rank of each row's positive among the corpus, for the row's anchor.

    The corpus is ``corpus`` (if given) plus every positive and negative text of ``dataset``, deduplicated. The rank
    counts the candidates scoring strictly higher than the positive, not counting the anchor's own text and the
    anchor's other positives (rows with the same anchor).
    """
    anchors = list(dataset["anchor"])
    positives = list(dataset["positive"])
    texts: list[str] = list(corpus or []) + positives
    for column in negative_columns_of(dataset):
        texts.extend(t for t in dataset[column] if t)
    corpus_texts = list(dict.fromkeys(texts))
    corpus_index = {t: i for i, t in enumerate(corpus_texts)}
    unique_anchors = list(dict.fromkeys(anchors))
    anchor_index = {a: i for i, a in enumerate(unique_anchors)}
    own_positives: dict[str, set[int]] = defaultdict(set)
    for a, p in zip(anchors, positives, strict=True):
        own_positives[a].add(corpus_index[p])

    doc_emb = model.encode_document(
        corpus_texts,
        prompt=corpus_prompt,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=show_progress_bar,
    )
    query_emb = model.encode_query(
        unique_anchors,
        prompt=query_prompt,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=show_progress_bar,
    )
    ranks = [0] * len(anchors)
    rows_of_anchor: dict[int, list[int]] = defaultdict(list)
    for row, a in enumerate(anchors):
        rows_of_anchor[anchor_index[a]].append(row)
    for start in tqdm(
        range(0, len(unique_anchors), chunk_size), desc="Ranking positives", disable=not show_progress_bar
    ):
        scores = model.similarity(query_emb[start : start + chunk_size], doc_emb).float()  # (chunk, n_corpus)
        for offset in range(scores.size(0)):
            q = start + offset
            anchor = unique_anchors[q]
            row_scores = scores[offset].clone()
            excluded = list(own_positives[anchor])
            if anchor in corpus_index:
                excluded.append(corpus_index[anchor])
            for row in rows_of_anchor[q]:
                positive_score = row_scores[corpus_index[positives[row]]]
                others = row_scores.clone()
                others[excluded] = -float("inf")
                ranks[row] = int((others > positive_score).sum())
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
    show_progress_bar: bool = True,
) -> tuple[Dataset, FilterReport]:
    """Ranking-consistency filtering [read]: drop each row whose positive is not in its anchor's top ``top_k``.

    A row is kept iff its positive's 0-based rank (see :func:`positive_ranks`) is ``< top_k``. Returns the kept rows
    (all columns, original order) and a :class:`FilterReport`, also logged at INFO.

    ``query_prompt`` encodes the anchors, ``corpus_prompt`` every candidate. As in sentence-transformers, ``None``
    lets the model use its own ``"query"`` / ``"document"`` prompt and ``""`` adds nothing; training's prompts come
    from :func:`kalm_st.instructions.column_prompts`, as in ``kalm-st filter``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ranks = positive_ranks(
        dataset,
        model,
        corpus=corpus,
        query_prompt=query_prompt,
        corpus_prompt=corpus_prompt,
        batch_size=batch_size,
        show_progress_bar=show_progress_bar,
    )
    keep = [i for i, rank in enumerate(ranks) if rank < top_k]
    report = FilterReport(total=len(ranks), kept=len(keep), dropped=len(ranks) - len(keep), top_k=top_k, ranks=ranks)
    logger.info("filter_by_rank: %s", report)
    return dataset.select(keep), report
