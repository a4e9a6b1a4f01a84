"""Training-data format: read jsonl / csv / parquet with ``datasets``, validate, normalise to ST's column layout.

Input columns (one row per training example):

- ``anchor`` (or ``query``): the query text;
- ``positive``: the positive document;
- hard negatives, either a list column ``negatives`` (in CSV a JSON-encoded list), or ``negative_1 .. negative_n``,
  or a single ``negative`` (sentence-transformers' triplet layout);
- ``task`` (optional): the task name; rows are split into one dataset per task (default: ``default_task``, else the
  file's stem);
- ``instruction`` (optional): a per-row instruction. Sentence-transformers' prompts are per task and column, so a
  task whose rows have one gets its instructions written into the texts
  (:func:`kalm_st.instructions.bake_instructions`): each row's own, else the task's, on the sides the task instructs
  (anchors; documents too for symmetric and single-text types); a text already starting with the KaLM template is
  kept as written;
- ``label`` or ``teacher_scores`` (optional): teacher scores of ``[positive, negative_1, .., negative_n]``, or
  teacher embeddings ``(2 + n, d)`` of ``[anchor, positive, negative_1, .., negative_n]`` (``kalm-st teacher-embed``;
  :class:`~kalm_st.losses.EmbeddingDistillation`, in-batch :class:`~kalm_st.losses.ContrastiveDistillation`);
- ``positive_group`` (optional, integer): consecutive rows with the same value are one query's positives
  (:mod:`kalm_st.data.positive_groups`: one of them trains per epoch); written by the KaLM / FlagEmbedding reader and
  kept by the curation steps.

Output: a ``datasets.DatasetDict`` keyed by task, each with the columns ``anchor, positive, negative_1..negative_n
[, label][, positive_group]`` in that order (the layout sentence-transformers' losses read; ``label`` is the column name ST's data
collator treats as labels). Per-task instructions are *not* baked into the texts (except for tasks with row
instructions, above): :func:`build_training_prompts` builds the nested ``prompts`` dict for
``SentenceTransformerTrainingArguments(prompts=...)``, so the same data can be trained with other instructions. Which
text gets which instruction: ``docs/instructions.md``.

Every problem is collected before anything trains and reported at once by :class:`DataValidationError`, one line per
problem naming the file, the 0-based row index and the column.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from kalm_st.data.writing import write_training_data  # re-exported: the reader and the writer of one format
from kalm_st.instructions import SINGLE_TEXT_TASK_TYPES, bake_instructions, column_prompts

logger = logging.getLogger(__name__)

ANCHOR_ALIASES: tuple[str, ...] = ("anchor", "query")
TEACHER_SCORE_ALIASES: tuple[str, ...] = ("label", "teacher_scores")

_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
}
_MAX_REPORTED = 20


class DataValidationError(ValueError):
    """Bad training data; ``problems`` lists every problem found as ``"file: row i: column 'c': what"``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:_MAX_REPORTED]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"{len(self.problems)} problem(s) in the training data:\n  {lines}")


def negative_columns_of(dataset: Dataset) -> list[str]:
    """The ``negative_k`` columns a dataset has, in order."""
    return [c for c in dataset.column_names if c.startswith("negative_")]


def negative_columns(n: int) -> list[str]:
    """``["negative_1", ..., "negative_n"]``."""
    return [f"negative_{i}" for i in range(1, n + 1)]


def read_table(path: str | os.PathLike[str]) -> Dataset:
    """Read one jsonl/json/csv/tsv/parquet file with ``datasets``.

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path or a folder, ``ValueError`` for an
    unsupported suffix, and :class:`DataValidationError` naming the file for an empty or unparsable one (with the
    reader's own reason, e.g. the row of a JSON syntax error), instead of ``datasets``' generic error.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Training data path {path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"Training data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unsupported format {suffix!r}; use one of {sorted(_FORMATS)}")
    if path.stat().st_size == 0:
        raise DataValidationError([f"{path}: the file is empty (0 bytes)"])
    builder, kwargs = _FORMATS[suffix]
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except OSError:
        raise  # the machine's problem (disk, permissions), not the file's content
    except Exception as error:  # datasets wraps the reader's error in a generic one: report the reader's reason
        if _holds_no_rows(error):
            raise DataValidationError([f"{path}: no rows (the file holds no records)"]) from error
        raise DataValidationError([f"{path}: cannot be read as {_FORMAT_NAMES[suffix]}: {_reasons(error)}"]) from error
    if dataset.num_rows == 0:
        raise DataValidationError([f"{path}: no rows (the file holds no records)"])
    return dataset


_FORMAT_NAMES = {".jsonl": "JSON lines", ".json": "JSON", ".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet"}


def _error_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _holds_no_rows(error: BaseException) -> bool:
    # datasets' words for a file that parsed to nothing (blank lines, a CSV header only)
    return any(
        isinstance(e, StopIteration) or "corresponds to no data" in str(e) or "No columns to parse" in str(e)
        for e in _error_chain(error)
    )


def _reasons(error: BaseException) -> str:
    """The readers' messages under ``datasets``' generic DatasetGenerationError, innermost last."""
    reasons = []
    for e in _error_chain(error):
        if type(e).__name__ == "DatasetGenerationError":
            continue
        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if text not in reasons:
            reasons.append(text)
    return "; ".join(reasons[:3])


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value: Any) -> Any:
    """A list column value; CSV files carry lists as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _row_negatives(row: Mapping[str, Any], neg_columns: Sequence[str], list_column: str | None) -> list[Any]:
    if list_column is not None:
        value = _as_list(row[list_column])
        if _is_missing(value):
            return []
        return list(value) if isinstance(value, list | tuple) else [value]
    values = [row[c] for c in neg_columns]
    # negative_k columns of a file mixing tasks with different counts hold null/empty for the missing ones
    while values and (_is_missing(values[-1]) or values[-1] == ""):
        values.pop()
    return values


def _sorted_negative_columns(columns: Iterable[str]) -> list[str]:
    numbered = [c for c in columns if c.startswith("negative_") and c[len("negative_") :].isdigit()]
    numbered.sort(key=lambda c: int(c[len("negative_") :]))
    if not numbered and "negative" in columns:
        return ["negative"]
    return numbered


KNOWN_COLUMNS: tuple[str, ...] = (
    *ANCHOR_ALIASES,
    "positive",
    "negatives",
    "negative",
    "task",
    "instruction",
    *TEACHER_SCORE_ALIASES,
    "positive_group",
)
"""The input columns kalm-st reads (plus ``negative_1..n``); see the module docstring."""


def _check_column_names(columns: Sequence[str], source: str) -> list[str]:
    """A problem for a column that looks like a misspelled known one (its data would be dropped); a warning for
    other unknown columns, which are ignored."""
    problems, ignored = [], []
    absent = [c for c in KNOWN_COLUMNS if c not in columns]
    for column in columns:
        if column in KNOWN_COLUMNS or _is_numbered_negative(column):
            continue
        close = difflib.get_close_matches(column, absent, n=1, cutoff=0.8)
        if close:
            problems.append(
                f"{source}: column {column!r} is not a column kalm-st reads; did you mean {close[0]!r}? "
                "(rename it, or drop it)"
            )
        else:
            ignored.append(column)
    if ignored:
        logger.warning(
            "%s: ignoring column(s) %s (kalm-st reads %s and negative_1..n)", source, ignored, KNOWN_COLUMNS
        )
    return problems


def _is_numbered_negative(column: str) -> bool:
    return column.startswith("negative_") and column[len("negative_") :].isdigit()


def warn_duplicate_pairs(dataset: Dataset, source: str, task: str) -> int:
    """Log a warning when (anchor, positive) pairs repeat: two copies in one batch are each other's false in-batch
    negative. Returns the number of repeated rows (counted with Arrow, no Python loop over rows)."""
    import pyarrow.compute as pc

    table = dataset.data.table.select(["anchor", "positive"])
    counts = table.group_by(["anchor", "positive"]).aggregate([("anchor", "count")])
    repeated = table.num_rows - counts.num_rows
    if repeated:
        example = counts.filter(pc.greater(counts["anchor_count"], 1))["anchor"][0].as_py()
        logger.warning(
            "%s: task %r: %d row(s) repeat an earlier (anchor, positive) pair (e.g. anchor %r); duplicates in one "
            "batch are false in-batch negatives: deduplicate the data",
            source,
            task,
            repeated,
            example[:80],
        )
    return repeated


def _is_embedding_label(value: Any) -> bool:
    """A ``label`` of teacher embeddings (a list of vectors) rather than teacher scores (a list of numbers)."""
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], list | tuple)


def _check_embedding_label(vectors: Sequence[Any], num_negatives: int, truncate: bool) -> tuple[list[Any], str | None]:
    """``(vectors, problem)`` for a teacher-embedding label: ``2 + n`` vectors (anchor, positive, n negatives) of
    one dimension, finite numbers; cut to ``2 + n`` when ``truncate`` (``num_negatives`` kept fewer negatives)."""
    expected = 2 + num_negatives
    vectors = list(vectors)[:expected] if truncate else list(vectors)
    if len(vectors) != expected:
        return vectors, (
            f"teacher embeddings must be {expected} vectors (anchor, positive + {num_negatives} negatives), "
            f"got {len(vectors)}"
        )
    dims = {len(v) if isinstance(v, list | tuple) else -1 for v in vectors}
    if len(dims) != 1 or min(dims) < 1:
        return vectors, f"ragged teacher embeddings: vector lengths {sorted(dims)} (every vector needs the same)"
    for k, vector in enumerate(vectors):
        if any(not isinstance(x, int | float) or _is_missing(x) or math.isinf(x) for x in vector):
            return vectors, f"NaN, infinite or non-numeric value in teacher embedding {k}"
    return vectors, None


def normalize_dataset(
    dataset: Dataset,
    *,
    source: str = "<dataset>",
    default_task: str = "default",
    require_negatives: bool = False,
    num_negatives: int | None = None,
    batch_size: int | None = None,
    task_types: Mapping[str, str] | None = None,
    row_instructions: bool = True,
) -> tuple[DatasetDict, list[str]]:
    """Normalise one in-memory dataset; returns ``(DatasetDict by task, problems)`` (problems empty when valid).

    See :func:`load_training_data` for the arguments; ``source`` names the data in the messages.
    """
    task_types = dict(task_types or {})
    columns = dataset.column_names
    problems: list[str] = _check_column_names(columns, source)
    anchor_col = next((c for c in ANCHOR_ALIASES if c in columns), None)
    if anchor_col is None:
        problems.append(f"{source}: missing column: need one of {list(ANCHOR_ALIASES)} (have {columns})")
    if "positive" not in columns:
        problems.append(f"{source}: missing column 'positive' (have {columns})")
    if problems:
        return DatasetDict(), problems

    list_column = "negatives" if "negatives" in columns else None
    neg_columns = [] if list_column else _sorted_negative_columns(columns)
    has_negatives = bool(list_column or neg_columns)
    if require_negatives and not has_negatives:
        problems.append(f"{source}: missing column: negatives are required ('negatives' or 'negative_1..n')")
        return DatasetDict(), problems
    score_col = next((c for c in TEACHER_SCORE_ALIASES if c in columns), None)
    task_col = "task" if "task" in columns else None
    instruction_col = "instruction" if "instruction" in columns and row_instructions else None
    if "instruction" in columns and not row_instructions:
        logger.warning("%s: column 'instruction' ignored (row instructions off): texts are used as written", source)

    if instruction_col is None:
        fast = _normalize_by_task(
            dataset, task_col, default_task, anchor_col, neg_columns, score_col, num_negatives, list_column
        )
        if fast is not None:  # clean data: checked in Arrow batches, the columns kept memory-mapped as they are
            for task, part in fast.items():
                if batch_size is not None and len(part) < batch_size:
                    problems.append(
                        f"{source}: task {task!r}: {len(part)} valid row(s), fewer than one batch of {batch_size}; "
                        "add data, lower the batch size or merge the task into another"
                    )
            return (DatasetDict() if problems else fast), problems

    rows: dict[str, dict[str, list[Any]]] = {}
    first_row: dict[str, int] = {}
    neg_counts: dict[str, int] = {}
    label_kinds: dict[str, bool] = {}  # task -> its label holds teacher embeddings (else teacher scores)
    label_dims: dict[str, int] = {}  # task -> the teacher-embedding dimension of its first row
    group_col = "positive_group" if "positive_group" in columns else None
    for index, row in enumerate(dataset):
        where = f"{source}: row {index}"
        task = row[task_col] if task_col else default_task
        if _is_missing(task) or task == "":
            task = default_task
        task = str(task)
        anchor, positive = row[anchor_col], row["positive"]
        row_ok = True
        for column, value in ((anchor_col, anchor), ("positive", positive)):
            if _is_missing(value) or not isinstance(value, str) or not value.strip():
                problems.append(f"{where}: column {column!r}: empty or not a string ({value!r})")
                row_ok = False
        negatives = _row_negatives(row, neg_columns, list_column) if has_negatives else []
        neg_label = list_column or "negative_1..n"
        for k, negative in enumerate(negatives):
            if _is_missing(negative) or not isinstance(negative, str) or not negative.strip():
                problems.append(f"{where}: column {neg_label!r}: negative {k + 1} is empty or not a string")
                row_ok = False
        if num_negatives is not None and len(negatives) > num_negatives:
            negatives = negatives[:num_negatives]
        if require_negatives and not negatives:
            problems.append(f"{where}: column {neg_label!r}: no negatives, but negatives are required")
            row_ok = False
        if task in neg_counts and negatives and len(negatives) != neg_counts[task] and row_ok:
            problems.append(
                f"{where}: column {neg_label!r}: ragged negatives: {len(negatives)} here, {neg_counts[task]} in "
                f"row {first_row[task]} of task {task!r} (every row of a task needs the same number)"
            )
            row_ok = False
        scores = None
        if score_col is not None:
            scores = _as_list(row[score_col])
            if _is_embedding_label(scores):  # teacher embeddings: (2 + n, d), anchor and every candidate
                scores, problem = _check_embedding_label(scores, len(negatives), num_negatives is not None)
                if problem is None and task in label_dims and len(scores[0]) != label_dims[task]:
                    problem = (
                        f"teacher embeddings of {len(scores[0])} dims here, {label_dims[task]} in row "
                        f"{first_row[task]} of task {task!r}"
                    )
                if problem is not None:
                    problems.append(f"{where}: column {score_col!r}: {problem}")
                    row_ok = False
            else:
                expected = 1 + len(negatives)
                if not isinstance(scores, list | tuple) or len(scores) < expected:
                    problems.append(
                        f"{where}: column {score_col!r}: teacher scores must be a list of {expected} numbers "
                        f"(positive + {len(negatives)} negatives), got {scores!r}"
                    )
                    row_ok = False
                else:
                    scores = list(scores)[:expected] if num_negatives is not None else list(scores)
                    if len(scores) != expected:
                        problems.append(
                            f"{where}: column {score_col!r}: ragged teacher scores: {len(scores)} values for "
                            f"{expected} texts"
                        )
                        row_ok = False
                    elif any(not isinstance(s, int | float) or _is_missing(s) or math.isinf(s) for s in scores):
                        problems.append(
                            f"{where}: column {score_col!r}: NaN, infinite or non-numeric score in {scores}"
                        )
                        row_ok = False
            if row_ok and task in label_kinds and label_kinds[task] != _is_embedding_label(scores):
                kinds = ("teacher scores", "teacher embeddings")
                problems.append(
                    f"{where}: column {score_col!r}: {kinds[_is_embedding_label(scores)]} here, "
                    f"{kinds[label_kinds[task]]} in row {first_row[task]} of task {task!r}"
                )
                row_ok = False
        group = row[group_col] if group_col else None
        if group_col and group is not None and (isinstance(group, bool) or not isinstance(group, int)):
            problems.append(f"{where}: column {group_col!r}: must be an integer (the row's query), got {group!r}")
            row_ok = False
        if not row_ok:
            continue
        if task not in rows:
            rows[task] = {"anchor": [], "positive": [], "negatives": [], "label": [], "instruction": [], "group": []}
            first_row[task] = index
            neg_counts[task] = len(negatives)
            if scores is not None:
                label_kinds[task] = _is_embedding_label(scores)
                if label_kinds[task]:
                    label_dims[task] = len(scores[0])
        if negatives and neg_counts[task] == 0:
            problems.append(
                f"{where}: column {neg_label!r}: ragged negatives: {len(negatives)} here, 0 in row "
                f"{first_row[task]} of task {task!r}"
            )
            continue
        if not negatives and neg_counts[task] > 0:
            problems.append(
                f"{where}: column {neg_label!r}: ragged negatives: 0 here, {neg_counts[task]} in row "
                f"{first_row[task]} of task {task!r}"
            )
            continue
        bucket = rows[task]
        bucket["anchor"].append(anchor)
        bucket["positive"].append(positive)
        bucket["negatives"].append(negatives)
        if scores is not None and _is_embedding_label(scores):
            bucket["label"].append([[float(v) for v in vector] for vector in scores])
        else:
            bucket["label"].append([float(s) for s in scores] if scores is not None else None)
        own = row[instruction_col] if instruction_col else None
        bucket["instruction"].append(own if isinstance(own, str) else None)
        bucket["group"].append(group)

    result = DatasetDict()
    for task, bucket in rows.items():
        n_rows = len(bucket["anchor"])
        if batch_size is not None and n_rows < batch_size:
            problems.append(
                f"{source}: task {task!r}: {n_rows} valid row(s), fewer than one batch of {batch_size}; "
                "add data, lower the batch size or merge the task into another"
            )
            continue
        data: dict[str, list[Any]] = {"anchor": bucket["anchor"], "positive": bucket["positive"]}
        for k, column in enumerate(negative_columns(neg_counts[task])):
            data[column] = [negs[k] for negs in bucket["negatives"]]
        if score_col is not None:
            data["label"] = bucket["label"]
        missing = [i for i, group in enumerate(bucket["group"]) if group is None]
        if group_col is not None and len(missing) < n_rows:  # a task of a mixed file may have none: no groups
            if missing:
                problems.append(
                    f"{source}: task {task!r}: column {group_col!r}: missing in {len(missing)} of {n_rows} row(s) "
                    f"(first: row {missing[0]} of the task)"
                )
                continue
            data[group_col] = bucket["group"]
        result[task] = Dataset.from_dict(data)
        if instruction_col:
            try:
                result[task] = bake_instructions(result[task], task, task_types.get(task), bucket["instruction"])
            except ValueError as error:  # an unknown task type
                problems.append(f"{source}: task {task!r}: {error}")
    return result, problems


_ARROW_BATCH = 1 << 16


def _is_list_type(data_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type)


def _is_text_type(data_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _normalize_by_task(
    dataset: Dataset,
    task_col: str | None,
    default_task: str,
    anchor_col: str,
    neg_columns: Sequence[str],
    score_col: str | None,
    num_negatives: int | None,
    list_column: str | None,
) -> DatasetDict | None:
    """:func:`_normalize_arrow` per task of a file with a ``task`` column (a curation output), split in Arrow.

    Each task's rows are selected by index (one contiguous slice, as :func:`write_training_data` writes them, is a
    memory-mapped view); the negative and label columns a task leaves all null (a file mixing tasks with different
    counts) are not its columns. None when any task needs the row-by-row path.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if task_col is None:
        fast = _normalize_arrow(dataset, anchor_col, neg_columns, score_col, num_negatives, list_column)
        return None if fast is None else DatasetDict({default_task: fast})
    if dataset._indices is not None:
        return None
    values = dataset.data.table.column(task_col)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return None
    values = pc.if_else(pc.equal(pc.fill_null(values, ""), ""), pa.scalar(default_task, values.type), values)
    result = DatasetDict()
    for task in pc.unique(values).to_pylist():
        rows = np.flatnonzero(pc.equal(values, task).to_numpy(zero_copy_only=False))
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        part = dataset.select(range(rows[0], rows[-1] + 1) if contiguous else rows).remove_columns(task_col)
        table = part.data.table if contiguous else None  # a contiguous select is a slice of the file's table
        own = list(neg_columns)
        if table is not None:  # drop the columns this task leaves empty
            while own and table.column(own[-1]).null_count == len(rows):
                own.pop()
        part_score = score_col
        if table is not None and score_col is not None and table.column(score_col).null_count == len(rows):
            part_score = None
        unused = [c for c in neg_columns if c not in own] + ([score_col] if score_col and not part_score else [])
        group = "positive_group"
        if table is not None and group in table.column_names and table.column(group).null_count == len(rows):
            unused.append(group)
        if unused:
            part = part.remove_columns(unused)
        normalized = _normalize_arrow(part, anchor_col, own, part_score, num_negatives, list_column)
        if normalized is None:
            return None
        result[str(task)] = normalized
    return result


def _normalize_arrow(
    dataset: Dataset,
    anchor_col: str,
    neg_columns: Sequence[str],
    score_col: str | None,
    num_negatives: int | None,
    list_column: str | None = None,
) -> Dataset | None:
    """The vectorised path of :func:`normalize_dataset` for one task's rows in kalm-st's columns.

    Checks the same rules with ``pyarrow.compute`` over record batches (no Python object per row) and returns the
    dataset's own columns, selected and renamed (memory-mapped, not copied). Returns None as soon as anything would
    be a problem or needs per-row work (ragged negatives, scores to truncate): the row-by-row path then reports it
    with file, row and column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = dataset.features.arrow_schema
    list_length = None
    if list_column is not None:  # a list column of negatives: every row the same number, else the row path
        list_type = schema.field(list_column).type
        if not (pa.types.is_list(list_type) or pa.types.is_large_list(list_type)):
            return None
        if not _is_text_type(list_type.value_type):
            return None
        lengths = pc.list_value_length(dataset.data.table.column(list_column))
        low, high = pc.min_max(lengths).values()
        if lengths.null_count or low.as_py() != high.as_py() or not low.as_py() or dataset._indices is not None:
            return None
        list_length = low.as_py()
    available = len(neg_columns) if list_length is None else list_length
    n = available if num_negatives is None else min(num_negatives, available)
    text_columns = [anchor_col, "positive", *neg_columns]
    if any(not _is_text_type(schema.field(c).type) for c in text_columns):
        return None
    embedding_label = False  # label of teacher embeddings (2 + n, d) rather than teacher scores (1 + n)
    if score_col is not None:
        score_type = schema.field(score_col).type
        if not _is_list_type(score_type) or n != available:
            return None
        embedding_label = _is_list_type(score_type.value_type)
        values_type = score_type.value_type.value_type if embedding_label else score_type.value_type
        if not pa.types.is_floating(values_type):
            return None
    label_dim = None
    group_col = "positive_group" if "positive_group" in dataset.column_names else None
    if group_col is not None:
        group_type = schema.field(group_col).type
        if not pa.types.is_integer(group_type) or dataset.data.table.column(group_col).null_count:
            return None
    columns = text_columns + ([list_column] if list_column else []) + ([score_col] if score_col else [])
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_ARROW_BATCH):
        for column in text_columns:
            texts = batch.column(column)
            if texts.null_count or pc.any(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py():
                return None
        if score_col is not None:
            scores = batch.column(score_col)
            lengths = pc.list_value_length(scores)
            if lengths.null_count or not pc.all(pc.equal(lengths, (2 if embedding_label else 1) + n)).as_py():
                return None
            values = pc.list_flatten(scores)
            if embedding_label:  # every vector of every row the same dimension
                dims = pc.list_value_length(values)
                low, high = pc.min_max(dims).values()
                if dims.null_count or low.as_py() != high.as_py() or not low.as_py():
                    return None
                if label_dim is not None and low.as_py() != label_dim:
                    return None
                label_dim = low.as_py()
                values = pc.list_flatten(values)
            if values.null_count or not pc.all(pc.is_finite(values)).as_py():
                return None
        if list_column is not None:
            values = pc.list_flatten(batch.column(list_column))
            if values.null_count or pc.any(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)).as_py():
                return None
    if list_column is not None:
        return (
            dataset.with_format("arrow")
            .map(
                _explode_negatives,
                batched=True,
                batch_size=_ARROW_BATCH,
                remove_columns=dataset.column_names,
                fn_kwargs={
                    "anchor_col": anchor_col,
                    "list_column": list_column,
                    "n": n,
                    "score_col": score_col,
                    "group_col": group_col,
                },
                desc="Reading negatives",
            )
            .with_format(None)
        )
    keep = [anchor_col, "positive", *neg_columns[:n]] + ([score_col] if score_col else [])
    out = dataset.select_columns(keep + ([group_col] if group_col else []))
    names = {anchor_col: "anchor", **{c: f"negative_{k + 1}" for k, c in enumerate(neg_columns[:n])}}
    if score_col is not None:
        names[score_col] = "label"
    return out.rename_columns({old: new for old, new in names.items() if old != new})


def _explode_negatives(
    batch: Any, *, anchor_col: str, list_column: str, n: int, score_col: str | None, group_col: str | None = None
) -> Any:
    """A record batch with a ``negatives`` list column -> ``anchor, positive, negative_1..n[, label]``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {"anchor": batch.column(anchor_col), "positive": batch.column("positive")}
    for k in range(n):
        out[f"negative_{k + 1}"] = pc.list_element(batch.column(list_column), k)
    if score_col is not None:
        out["label"] = batch.column(score_col)
    if group_col is not None:
        out[group_col] = batch.column(group_col)
    return pa.table(out)


def load_training_data(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    default_task: str | None = None,
    require_negatives: bool = False,
    num_negatives: int | None = None,
    batch_size: int | None = None,
    task_types: Mapping[str, str] | None = None,
    row_instructions: bool = True,
) -> DatasetDict:
    """Read, validate and normalise training files into ``DatasetDict({task: Dataset(anchor, positive,
    negative_1..n[, label])})``.

    Args:
        paths: One or more ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` files. Rows of the same task from
            several files are concatenated (they must then have the same number of negatives).
        default_task: Task of rows without a ``task`` column/value; default: the file's stem.
        require_negatives: Every row must have at least one hard negative (fine-tuning / distillation stages).
        num_negatives: Keep the first ``num_negatives`` negatives of each row (and teacher scores accordingly);
            rows with fewer are still an error (ragged).
        batch_size: Every task needs at least this many rows (pass the *global* batch size, per-device batch size
            times the number of processes, when training task-homogeneous batches).
        task_types: Task name -> MTEB task type; decides which columns get the instruction of a task with row
            instructions (:func:`kalm_st.instructions.resolve_instruction`). Pass the types training uses.
        row_instructions: Apply an ``instruction`` column (default). False (``--no-instructions``): ignore it, every
            text stays as written.

    Raises:
        FileNotFoundError: a file does not exist.
        DataValidationError: (a ``ValueError``) listing every problem found, each with file, row and column.
    """
    path_list = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
    problems: list[str] = []
    parts: dict[str, list[Dataset]] = {}
    with_row_instructions: set[str] = set()
    for path in path_list:
        dataset = read_table(path)
        normalized, file_problems = normalize_dataset(
            dataset,
            source=str(path),
            default_task=default_task or path.stem,
            require_negatives=require_negatives,
            num_negatives=num_negatives,
            task_types=task_types,
            row_instructions=row_instructions,
        )
        problems.extend(file_problems)
        if row_instructions and "instruction" in dataset.column_names:
            with_row_instructions.update(normalized)
        for task, part in normalized.items():
            warn_duplicate_pairs(part, str(path), task)
            parts.setdefault(task, []).append(part)
    result = DatasetDict()
    for task, datasets_of_task in parts.items():
        if len({tuple(d.column_names) for d in datasets_of_task}) > 1:
            layouts = [d.column_names for d in datasets_of_task]
            problems.append(f"task {task!r}: files disagree on the columns (ragged negatives across files): {layouts}")
            continue
        from datasets import concatenate_datasets

        merged = concatenate_datasets(datasets_of_task) if len(datasets_of_task) > 1 else datasets_of_task[0]
        if task in with_row_instructions and len(datasets_of_task) > 1:
            # another file of the task has no row instructions: its texts get the task's (baking is idempotent)
            merged = bake_instructions(merged, task, (task_types or {}).get(task))
        if batch_size is not None and len(merged) < batch_size:
            problems.append(
                f"task {task!r} ({', '.join(map(str, path_list))}): {len(merged)} row(s), fewer than one batch of "
                f"{batch_size}; add data, lower the batch size or merge the task into another"
            )
            continue
        result[task] = merged
    if problems:
        raise DataValidationError(problems)
    return result


def validate_training_data(
    data: Dataset | DatasetDict,
    *,
    require_negatives: bool = False,
    batch_size: int | None = None,
    source: str = "<dataset>",
    task_types: Mapping[str, str] | None = None,
    row_instructions: bool = True,
) -> DatasetDict:
    """Validate data already in memory (e.g. from the curation tools); returns it normalised as a ``DatasetDict``.

    A ``Dataset`` with a ``task`` column is split by task; a ``DatasetDict`` keeps its keys as task names.
    ``task_types`` and ``row_instructions`` as in :func:`load_training_data`.
    """
    items = data.items() if isinstance(data, DatasetDict) else [(None, data)]
    problems: list[str] = []
    result = DatasetDict()
    for name, dataset in items:
        normalized, part_problems = normalize_dataset(
            dataset,
            source=f"{source}[{name}]" if name is not None else source,
            default_task=name or "default",
            require_negatives=require_negatives,
            batch_size=batch_size,
            task_types=task_types,
            row_instructions=row_instructions,
        )
        problems.extend(part_problems)
        result.update(normalized)
    if problems:
        raise DataValidationError(problems)
    return result


def build_training_prompts(
    data: DatasetDict | Iterable[str],
    task_types: Mapping[str, str] | None = None,
) -> dict[str, dict[str, str]]:
    """The nested ``prompts`` dict for ``SentenceTransformerTrainingArguments(prompts=...)``.

    ``{task: {"anchor": query_prompt, "positive": document_prompt, "negative_1": document_prompt, ...}}`` from
    :func:`kalm_st.instructions.column_prompts`, the resolver the curation commands use too: the task's instruction
    (table, else its type's from ``task_types``, else the retrieval default) on anchors, and on documents for
    symmetric and single-text types (classification, clustering: e.g. the output of
    :func:`kalm_st.data.label_examples`). A column whose texts already carry the KaLM template (a task with row
    instructions, or curated output) gets none. Empty prompts are left out (ST then adds nothing). With task names
    only (no ``DatasetDict``), the columns ``anchor, positive, negative_1..64`` are assumed uninstructed.

    Note: ST's collator picks the prompts of a batch from its *first* row's task, so batches mixing tasks
    (``homogeneous_ratio < 1``) give every row that task's prompts.

    Raises:
        ValueError: an unknown task type; a column where some texts carry the template and others do not.
    """
    task_types = dict(task_types or {})
    prompts: dict[str, dict[str, str]] = {}
    for task in data:
        columns = data[task] if isinstance(data, DatasetDict) else ["anchor", "positive", *negative_columns(64)]
        entry = column_prompts(columns, task, task_types.get(task))
        prompts[task] = {column: prompt for column, prompt in entry.items() if prompt}
    return prompts


__all__ = [
    "ANCHOR_ALIASES",
    "SINGLE_TEXT_TASK_TYPES",
    "TEACHER_SCORE_ALIASES",
    "DataValidationError",
    "build_training_prompts",
    "load_training_data",
    "negative_columns",
    "normalize_dataset",
    "validate_training_data",
    "write_training_data",
]
