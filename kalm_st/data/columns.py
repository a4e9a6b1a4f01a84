"""The canonical training layout and the input layouts kalm-st reads, by their columns.

Canonical (what every reader gives, what sentence-transformers' losses read): ``anchor, positive,
negative_1..n[, label][, positive_group]``; ``label`` holds teacher scores ``[positive, negative_1..n]`` or teacher
embeddings ``(2 + n, d)`` of ``[anchor, positive, negative_1..n]``.

Input layouts, detected from the columns (:func:`detect_format`):

- ``st`` (kalm-st / sentence-transformers): ``anchor`` or ``query``, ``positive``, negatives as a list ``negatives``
  (in CSV a JSON list), as ``negative_1..n`` or as one ``negative``; optional ``task``, ``instruction``, ``label``
  or ``teacher_scores``, ``positive_group``;
- ``kalm`` (KaLM / FlagEmbedding): ``query``, ``pos`` list, ``neg`` list, optional ``pos_scores`` / ``neg_scores``,
  ``prompt``, ``type``;
- ``f2llm``: ``query``, ``passage``, ``negative_1..k``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ANCHOR_ALIASES: tuple[str, ...] = ("anchor", "query")
TEACHER_SCORE_ALIASES: tuple[str, ...] = ("label", "teacher_scores")
POSITIVE_GROUP = "positive_group"
"""The column naming a row's source row (int64): rows of one query with several positives share it."""

KNOWN_COLUMNS: tuple[str, ...] = (
    *ANCHOR_ALIASES,
    "positive",
    "negatives",
    "negative",
    "task",
    "instruction",
    *TEACHER_SCORE_ALIASES,
    POSITIVE_GROUP,
)
"""The input columns of the ``st`` layout (plus ``negative_1..n``)."""


def negative_columns(n: int) -> list[str]:
    """``["negative_1", ..., "negative_n"]``."""
    return [f"negative_{i}" for i in range(1, n + 1)]


def negative_columns_of(dataset: Any) -> list[str]:
    """The ``negative_k`` columns a dataset has, in order."""
    return [c for c in dataset.column_names if c.startswith("negative_")]


def is_numbered_negative(column: str) -> bool:
    return column.startswith("negative_") and column[len("negative_") :].isdigit()


def numbered_negatives(columns: Iterable[str]) -> list[str]:
    """``negative_1..n`` in numeric order (``negative`` alone when there are none)."""
    columns = list(columns)
    numbered = sorted((c for c in columns if is_numbered_negative(c)), key=lambda c: int(c[len("negative_") :]))
    return numbered or (["negative"] if "negative" in columns else [])


def detect_format(columns: Iterable[str], pos_is_text: bool = False) -> str:
    """``kalm`` (``pos`` with ``neg``, or a ``pos`` that is not a text column), ``f2llm`` (``passage`` without
    ``positive``) or ``st`` (anything else: a file with ``query`` and a text ``pos`` is a misspelled kalm-st one)."""
    columns = list(columns)
    if "pos" in columns and ("neg" in columns or not pos_is_text):
        return "kalm"
    if "passage" in columns and "positive" not in columns:
        return "f2llm"
    return "st"


__all__ = [
    "ANCHOR_ALIASES",
    "KNOWN_COLUMNS",
    "POSITIVE_GROUP",
    "TEACHER_SCORE_ALIASES",
    "detect_format",
    "negative_columns",
    "negative_columns_of",
    "numbered_negatives",
]
