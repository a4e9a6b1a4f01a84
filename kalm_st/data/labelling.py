"""Example-based multi-class labelling (METHOD.md §5): labelled texts -> (text, same-class text, other classes)."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from tqdm.auto import tqdm

from kalm_st.data.columns import negative_columns

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


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
    :func:`kalm_st.data.build_training_prompts` (``task_types={task: "Classification"}``), which puts the
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
