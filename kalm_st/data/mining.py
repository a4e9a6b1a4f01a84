"""Hard-negative mining with the previous-stage model (METHOD.md §5) on sentence-transformers' miner."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from datasets import Dataset

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


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

    Prompts as in sentence-transformers: ``query_prompt`` / ``corpus_prompt`` ``None`` lets the model use its own
    ``"query"`` / ``"document"`` prompt (a kalm-st model carries the retrieval instruction as ``"query"``), ``""``
    adds nothing. To encode as training does, take them from :func:`kalm_st.instructions.column_prompts` (the
    ``anchor`` and ``positive`` entries), as ``kalm-st mine`` does.

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
