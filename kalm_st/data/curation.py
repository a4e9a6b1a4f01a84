"""Data curation of KaLM-Embedding-V2 (METHOD.md §5): hard-negative mining, ranking-consistency filtering,
example-based multi-class labelling and teacher scoring.

All functions take and return a ``datasets.Dataset`` in the training layout of :mod:`kalm_st.data.formats`
(``anchor, positive, negative_1..n[, label]``); apply them per task (one ``Dataset`` of a ``DatasetDict``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from kalm_st.data.formats import negative_columns

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

logger = logging.getLogger(__name__)


def _negative_columns_of(dataset: Dataset) -> list[str]:
    return [c for c in dataset.column_names if c.startswith("negative_")]


# --------------------------------------------------------------------------------------------------------------------
# Hard-negative mining
# --------------------------------------------------------------------------------------------------------------------


def mine_hard_negatives(
    dataset: Dataset,
    model: SentenceTransformer,
    *,
    corpus: Sequence[str] | None = None,
    range_min: int = 50,
    range_max: int = 100,
    num_negatives: int = 7,
    sampling_strategy: Literal["random", "top"] = "random",
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    output_scores: bool = False,
    exclude_query: bool = True,
    batch_size: int = 32,
    use_faiss: bool = False,
    cache_folder: str | os.PathLike[str] | None = None,
    seed: int = 0,
    verbose: bool = False,
    **kwargs: Any,
) -> Dataset:
    """Mine hard negatives with sentence-transformers' ``util.mine_hard_negatives``, with KaLM's defaults.

    Retrieves the top ``range_max`` candidates of each anchor among ``corpus`` (default: the positives) and samples
    ``num_negatives`` from the candidates ranked ``range_min .. range_max - 1`` (0-based, counted after removing the
    query's positives and, with ``exclude_query``, the query's own text). KaLM [read]: ranks 50-100, 7 negatives,
    random sampling.

    sentence-transformers already guarantees that no positive of the query (any row with the same anchor text) is
    returned. It does *not* exclude the query itself when the query's text is also in the corpus (symmetric data:
    a sentence that is an anchor in one row and a positive in another); with ``exclude_query=True`` (default) such a
    query is passed to ST as an extra positive of itself, which removes it from its own candidates without changing
    the corpus, and the helper row is dropped from the result.

    Returns:
        ``Dataset(anchor, positive, negative_1..negative_n[, label])``: existing negatives of ``dataset`` are
        replaced; rows for which fewer than ``num_negatives`` candidates exist in the range are dropped (ST's
        behaviour, logged); ``label`` holds the mining model's ``[s(q, p), s(q, n_1), ...]`` if ``output_scores``.
        Rows come grouped by anchor (ST's order).

    Extra ``kwargs`` go to ST's function (e.g. ``cross_encoder``, ``absolute_margin``, ``use_multi_process``).
    Sampling is seeded with ``seed`` (ST samples with Python's ``random``; its global state is restored after).
    """
    from sentence_transformers.util import mine_hard_negatives as st_mine_hard_negatives

    for column in ("anchor", "positive"):
        if column not in dataset.column_names:
            raise ValueError(f"mine_hard_negatives: missing column {column!r} (have {dataset.column_names})")
    pairs = dataset.select_columns(["anchor", "positive"])
    anchors, positives = list(pairs["anchor"]), list(pairs["positive"])
    self_pairs = [i for i, (a, p) in enumerate(zip(anchors, positives, strict=True)) if a == p]
    if self_pairs:
        logger.warning("mine_hard_negatives: dropping %d row(s) whose positive equals the anchor", len(self_pairs))
        keep = sorted(set(range(len(anchors))) - set(self_pairs))
        pairs = pairs.select(keep)
        anchors, positives = [anchors[i] for i in keep], [positives[i] for i in keep]
    corpus_list = list(corpus) if corpus is not None else None
    helper_anchors: list[str] = []
    if exclude_query:
        corpus_texts = set(corpus_list if corpus_list is not None else []) | set(positives)
        helper_anchors = sorted({a for a in anchors if a in corpus_texts})
        if helper_anchors:
            helper = Dataset.from_dict({"anchor": helper_anchors, "positive": helper_anchors})
            from datasets import concatenate_datasets

            pairs = concatenate_datasets([pairs, helper])
    n_input = len(pairs) - len(helper_anchors)

    state = random.getstate()
    random.seed(seed)
    try:
        mined = st_mine_hard_negatives(
            pairs,
            model,
            anchor_column_name="anchor",
            positive_column_name="positive",
            corpus=corpus_list,
            range_min=range_min,
            range_max=range_max,
            num_negatives=num_negatives,
            sampling_strategy=sampling_strategy,
            query_prompt=query_prompt,
            corpus_prompt=corpus_prompt,
            output_format="n-tuple",
            output_scores=output_scores,
            batch_size=batch_size,
            use_faiss=use_faiss,
            cache_folder=str(cache_folder) if cache_folder is not None else None,
            verbose=verbose,
            **kwargs,
        )
    finally:
        random.setstate(state)
    if helper_anchors:
        mined = mined.filter(lambda a, p: a != p, input_columns=["anchor", "positive"])
    if output_scores:
        mined = mined.rename_column("scores", "label")
    dropped = n_input - len(mined)
    if dropped:
        logger.info(
            "mine_hard_negatives: %d of %d row(s) dropped: fewer than %d candidates in ranks %d-%d",
            dropped,
            n_input,
            num_negatives,
            range_min,
            range_max,
        )
    return mined


# --------------------------------------------------------------------------------------------------------------------
# Ranking-consistency filtering
# --------------------------------------------------------------------------------------------------------------------


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
    for column in _negative_columns_of(dataset):
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


# --------------------------------------------------------------------------------------------------------------------
# Example-based multi-class labelling
# --------------------------------------------------------------------------------------------------------------------


def label_examples(
    dataset: Dataset,
    *,
    text_column: str = "text",
    label_column: str = "label",
    num_negatives: int = 7,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> Dataset:
    """Example-based multi-class labelling [inferred]: labelled texts -> ``(anchor, positive, negative_1..n)``.

    For each text of class ``c``: the positive is another example of ``c`` (a different text, never the same
    string), the negatives are ``num_negatives`` distinct texts of other classes (from distinct classes while there
    are enough classes) that never occur in ``c``. Texts of a class with no other distinct text are skipped (logged).
    Deterministic given ``seed``.

    Instructions: give the task a single-text type in
    :func:`kalm_st.data.formats.build_training_prompts` (``task_types={task: "Classification"}``), which puts the
    task's instruction on every column; train without in-batch negatives (METHOD.md §3).
    """
    for column in (text_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"label_examples: missing column {column!r} (have {dataset.column_names})")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    texts = list(dataset[text_column])
    labels = list(dataset[label_column])
    by_class: dict[Any, list[str]] = defaultdict(list)
    for text, label in zip(texts, labels, strict=True):
        if isinstance(text, str) and text.strip() and text not in by_class[label]:
            by_class[label].append(text)
    classes = list(by_class)
    if len(classes) < 2:
        raise ValueError(f"label_examples: need at least 2 classes, got {len(classes)}")
    class_sets = {c: set(ts) for c, ts in by_class.items()}
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"anchor": [], "positive": [], **{c: [] for c in negative_columns(num_negatives)}}
    skipped = 0
    for text, label in tqdm(
        list(zip(texts, labels, strict=True)), desc="Labelling examples", disable=not show_progress_bar
    ):
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        same = [t for t in by_class[label] if t != text]
        if not same:
            skipped += 1
            continue
        positive = rng.choice(same)
        other_classes = [c for c in classes if c != label]
        negatives: list[str] = []
        used: set[str] = set()
        attempts = 0
        while len(negatives) < num_negatives:
            rng.shuffle(other_classes)
            progress = False
            for c in other_classes:
                candidates = [t for t in by_class[c] if t not in used and t not in class_sets[label]]
                if not candidates:
                    continue
                choice = rng.choice(candidates)
                used.add(choice)
                negatives.append(choice)
                progress = True
                if len(negatives) == num_negatives:
                    break
            attempts += 1
            if not progress or attempts > num_negatives:
                break
        if len(negatives) < num_negatives:
            skipped += 1
            continue
        out["anchor"].append(text)
        out["positive"].append(positive)
        for column, negative in zip(negative_columns(num_negatives), negatives, strict=True):
            out[column].append(negative)
    if skipped:
        logger.info("label_examples: skipped %d of %d text(s) (no other example of the class)", skipped, len(texts))
    return Dataset.from_dict(out)


# --------------------------------------------------------------------------------------------------------------------
# Teacher scoring
# --------------------------------------------------------------------------------------------------------------------


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
    ``encode_query(anchor)`` and ``encode_document(text)``; a ``CrossEncoder`` teacher with ``predict`` on
    ``(anchor, text)`` pairs (its default activation). Each distinct text is embedded once.

    With ``cache_dir``, the scores are stored in ``{cache_dir}/teacher_scores_{hash}.npy`` keyed by (teacher
    identity, prompts, every row's texts); a rerun on the same data loads them instead of recomputing. The teacher
    identity is ``teacher_id`` or :func:`teacher_name`; pass ``teacher_id`` when two teachers share a name.
    """
    from sentence_transformers import CrossEncoder

    columns = ["anchor", "positive", *_negative_columns_of(dataset)]
    for column in columns[:2]:
        if column not in dataset.column_names:
            raise ValueError(f"score_with_teacher: missing column {column!r} (have {dataset.column_names})")
    anchors = list(dataset["anchor"])
    candidates = [list(dataset[c]) for c in columns[1:]]  # (1 + n) lists of len(dataset)
    n_rows, n_cand = len(anchors), len(candidates)

    cache_file: Path | None = None
    if cache_dir is not None:
        key = json.dumps([teacher_id or teacher_name(teacher), query_prompt, document_prompt, anchors, candidates])
        digest = hashlib.sha256(key.encode("utf8")).hexdigest()[:32]
        cache_file = Path(cache_dir) / f"teacher_scores_{digest}.npy"
        if cache_file.is_file():
            scores = np.load(cache_file)
            if scores.shape == (n_rows, n_cand):
                logger.info("score_with_teacher: loaded cached scores from %s", cache_file)
                return _with_label(dataset, scores)

    if isinstance(teacher, CrossEncoder):
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


__all__ = [
    "FilterReport",
    "filter_by_rank",
    "label_examples",
    "mine_hard_negatives",
    "positive_ranks",
    "score_with_teacher",
    "teacher_name",
]
