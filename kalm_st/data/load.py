"""Task specs -> a validated, memory-mapped Arrow ``DatasetDict`` in the canonical layout, for every input layout,
in one pass of record batches (one policy for all of them; ``docs/data.md``).

Each shard of a task is converted by one batched ``Dataset.map`` in Arrow format (:mod:`kalm_st.data.convert`, which
reads with :mod:`kalm_st.data.readers`: ``pyarrow.compute`` and numpy, no Python object per row), whose output is ``datasets``' fingerprinted cache file:
memory-mapped, shared by the processes of a run, and read again (nothing converted or checked) on a restart.

The policy, the same whatever the layout:

- negatives: ``n`` = ``num_negatives`` (None: the longest list of the task; 0: none, in-batch negatives only, in any
  stage); a row with more keeps its first ``n``; ``0 < k < n``: its own plus seeded draws from them
  (``ragged_negatives: resample``) or dropped (``drop``); a row with none, in a task with negatives, is dropped;
  teacher scores and embeddings follow the negatives kept;
- positives: a row with several (KaLM ``pos``) becomes one row per positive grouped by ``positive_group``, one of
  them trained per epoch (``positives: epoch``; :mod:`kalm_st.data.positive_groups`), or one drawn at load
  (``once``);
- instructions: written into the texts when the data carries them (an ``instruction`` / ``prompt`` column, or a
  KaLM / F2LLM layout, whose texts the authors instructed at load): the row's own, else the task's; a text that
  already carries the template keeps it (``instructed_queries: keep``) or loses it (``replace`` / ``strip``); tasks
  whose documents are instructed (symmetric, single-text) give them the query's instruction. Other tasks keep their
  texts as written and get ST prompts (:func:`build_training_prompts`);
- duplicates: (anchor, positive) pairs repeating an earlier one are counted (hashes, once per fingerprint) and
  logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_st.data.checks import DataValidationError, check_column_names, is_list, is_text, repeated_pairs
from kalm_st.data.columns import (
    ANCHOR_ALIASES,
    KNOWN_COLUMNS,
    POSITIVE_GROUP,
    TEACHER_SCORE_ALIASES,
    detect_format,
    negative_columns,
    numbered_negatives,
)
from kalm_st.data.convert import BatchPlan, convert_batch
from kalm_st.data.readers import Layout
from kalm_st.data.shards import Shard, open_shards
from kalm_st.data.tasks import TaskSource
from kalm_st.instructions import (
    column_prompts,
    resolve_instruction,
)

logger = logging.getLogger(__name__)

FLAG_TYPES: Mapping[str, str | None] = {
    "normal": None,
    "only_1neg": None,
    "symmetric_sts": "STS",
    "symmetric_clustering": "Clustering",
    "symmetric_class": "Classification",
}
"""FlagEmbedding's row ``type`` -> kalm-st task type (None: the task's own)."""
_BATCH = 10_000


@dataclass(frozen=True)
class LoadOptions:
    """One policy for every layout (the ``data`` section of a stage config; module doc)."""

    num_negatives: int | None = None
    require_negatives: bool = False
    ragged_negatives: str = "resample"
    instructed_queries: str = "keep"
    positives: str = "epoch"
    seed: int = 0
    row_instructions: bool = True
    source: str | None = None
    """The config file, for errors that name its keys (None: plain files, errors name the files)."""
    skip_remote: bool = False


@dataclass
class Part:
    """The rows of one task in one shard: a slice of the shard (``first_row`` on), or its ``row_numbers``."""

    shard: Shard
    dataset: Any
    first_row: int = 0
    row_numbers: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Planning a task: layouts, the number of negatives, positives, type and instructions (schema and column statistics)
# ----------------------------------------------------------------------------------------------------------------------


def _layout(part: Part, fmt: str, options: LoadOptions, problems: list[str]) -> Layout | None:
    columns, label = part.dataset.column_names, part.shard.label
    schema = part.dataset.features.arrow_schema
    if fmt == "kalm":
        scores = {c: c if c in columns else None for c in ("pos_scores", "neg_scores")}
        if scores["neg_scores"] and not scores["pos_scores"]:
            problems.append(
                f"{label}: column 'neg_scores': neg_scores need pos_scores (teacher scores of the positives) too"
            )
            return None
        if scores["pos_scores"] and "neg" in columns and not scores["neg_scores"]:
            problems.append(
                f"{label}: column 'pos_scores': pos_scores without neg_scores: the negatives have no teacher score"
            )
            return None
        return Layout("query", "pos", True, "neg" if "neg" in columns else None, (), None, False, scores["pos_scores"],
                      scores["neg_scores"], "prompt" if "prompt" in columns else None, None, part.shard.csv)  # fmt: skip
    if fmt == "f2llm":
        return Layout("query", "passage", False, None, tuple(numbered_negatives(columns)), csv=part.shard.csv)
    found = check_column_names(columns, KNOWN_COLUMNS, label)
    query = next((c for c in ANCHOR_ALIASES if c in columns), None)
    if query is None:
        found.append(f"{label}: missing column: need one of {list(ANCHOR_ALIASES)} (have {columns})")
    if "positive" not in columns:
        found.append(f"{label}: missing column 'positive' (have {columns})")
    problems.extend(found)
    if found:
        return None
    score = next((c for c in TEACHER_SCORE_ALIASES if c in columns), None)
    if score is not None and _all_null(part.dataset, score):
        score = None  # a task of a mixed file without labels
    embeddings = False
    if score is not None:
        kind = schema.field(score).type
        embeddings = is_list(kind) and is_list(kind.value_type)
        if part.shard.csv and is_text(kind):  # JSON text: look at the first value's nesting
            first = pc.drop_null(part.dataset.data.table.column(score).slice(0, 1000))
            embeddings = len(first) > 0 and first[0].as_py().strip()[1:].lstrip().startswith("[")
    instruction = "instruction" in columns and options.row_instructions
    if "instruction" in columns and not options.row_instructions:
        logger.warning("%s: column 'instruction' ignored (row instructions off): texts are used as written", label)
    group = POSITIVE_GROUP if POSITIVE_GROUP in columns and not _all_null(part.dataset, POSITIVE_GROUP) else None
    listed = "negatives" if "negatives" in columns else None
    return Layout(query, "positive", False, listed, () if listed else tuple(numbered_negatives(columns)), score,
                  embeddings, None, None, "instruction" if instruction else None, group, part.shard.csv)  # fmt: skip


def _all_null(dataset: Any, column: str) -> bool:
    return (
        dataset.data.table.column(column).null_count == len(dataset)
        if dataset._indices is None
        else (pc.all(pc.is_null(dataset.select_columns([column]).with_format("arrow")[:].column(0))).as_py())
    )


def _longest(part: Part, layout: Layout) -> int:
    """The most negatives a row of the part has (Arrow, batch by batch: constant memory)."""
    columns = [c for c in (layout.neg_list, *layout.neg_columns) if c]
    longest = 0
    for batch in part.dataset.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH) if columns else ():
        if layout.neg_list is not None:
            column = batch.column(layout.neg_list)
            if layout.csv and is_text(column.type):
                from kalm_st.data.checks import parse_json_lists

                column = parse_json_lists(column.combine_chunks(), layout.neg_list, part.shard.label)
            if not is_list(column.type):
                return 0  # the batches of the conversion name the rows
            longest = max(longest, int(pc.max(pc.list_value_length(column)).as_py() or 0))
            continue
        for k, name in enumerate(layout.neg_columns):
            column = batch.column(name)
            filled = pc.is_valid(column) if not is_text(column.type) else pc.not_equal(column, "")
            if k + 1 > longest and pc.any(filled).as_py():
                longest = k + 1
    return longest


def _most_positives(part: Part, layout: Layout) -> int:
    if not layout.pos_is_list:
        return 1
    column = part.dataset.data.table.column(layout.pos) if part.dataset._indices is None else None
    if column is None or not is_list(column.type):
        return 1
    return int(pc.max(pc.list_value_length(column)).as_py() or 0)


def _flag_type(part: Part) -> str | None:
    """The task type a FlagEmbedding ``type`` column asks for (``symmetric_sts`` -> STS, ...)."""
    if "type" not in part.dataset.column_names:
        return None
    values = [v for v in pc.unique(part.dataset.data.table.column("type")).to_pylist() if v is not None]
    unknown = sorted(set(map(str, values)) - set(FLAG_TYPES))
    if unknown:
        raise DataValidationError(
            [f"{part.shard.label}: column 'type': unknown value(s) {unknown} (known: {list(FLAG_TYPES)})"]
        )
    types = {FLAG_TYPES[v] for v in values} - {None}
    if len(types) > 1:
        raise DataValidationError(
            [f"{part.shard.label}: column 'type': one task mixes {sorted(values)}; split it into tasks"]
        )
    return next(iter(types), None)


def load_task(spec: TaskSource, parts: Sequence[Part], options: LoadOptions) -> tuple[Any, TaskSource]:
    """One task's parts (its rows in each shard) -> ``(Dataset, spec with the type and layout the data gave)``."""
    from datasets import concatenate_datasets

    problems: list[str] = []
    parts = _cap(parts, spec.max_rows)
    formats = {detect_format(p.dataset.column_names, _pos_is_text(p.dataset)) for p in parts}
    if len(formats) > 1:
        raise DataValidationError([f"task {spec.name!r}: its files mix layouts {sorted(formats)} ({spec.path})"])
    fmt = formats.pop()
    layouts = [_layout(p, fmt, options, problems) for p in parts]
    if problems:
        raise DataValidationError(problems)
    data_type = next((t for t in (_flag_type(p) for p in parts) if t), None)
    if data_type is not None and spec.type in (None, "Retrieval") and data_type != spec.type:
        logger.info("%s: task type %s, from the rows' 'type' column", spec.key, data_type)
        spec = replace(spec, type=data_type)
    longest = max(_longest(p, lay) for p, lay in zip(parts, layouts, strict=True))
    wanted = options.num_negatives
    if wanted and wanted > longest:
        message = (f"data.num_negatives is {wanted}, but {spec.key} ({spec.path}) has {longest} negatives per row; "
                   "lower data.num_negatives or mine more negatives.")  # fmt: skip
        if options.source is not None:
            from kalm_st.recipe.config import ConfigError

            raise ConfigError(f"{options.source}: {message}")
        raise DataValidationError([f"task {spec.name!r} ({spec.path}): {message}"])
    n = longest if wanted is None else wanted
    if options.require_negatives and n == 0:
        raise DataValidationError([
            f"{parts[0].shard.label}: missing column: negatives are required ('negatives' or 'negative_1..n'); "
            "no row of the task has any (num_negatives: 0 trains in-batch negatives only)"
        ])  # fmt: skip
    bake = fmt != "st" or any(lay.prompt is not None for lay in layouts)
    instruction, documents = "", False
    if bake:
        try:
            resolved = resolve_instruction(spec.name, spec.type or "Retrieval")
        except ValueError as error:  # an unknown task type
            raise DataValidationError([f"{spec.path}: task {spec.name!r}: {error}"]) from error
        instruction, documents = spec.instruction or resolved.instruction, resolved.documents
    expand = options.positives == "epoch" and any(
        _most_positives(p, lay) > 1 for p, lay in zip(parts, layouts, strict=True)
    )
    converted, offset, source_rows = [], 0, 0
    for part, layout in zip(parts, layouts, strict=True):
        plan = BatchPlan(layout, part.shard.label, part.shard.unit, part.shard.first, part.first_row, part.row_numbers, n,
                     expand, offset, options.seed, options.ragged_negatives, options.instructed_queries, bake,
                     instruction, documents)  # fmt: skip
        used = [c for c in part.dataset.column_names if c in _used(layout)]
        try:
            done = (
                part.dataset.select_columns(used).with_format("arrow")
                .map(convert_batch, batched=True, batch_size=_BATCH, with_indices=True, remove_columns=used,
                     fn_kwargs={"plan": plan}, desc=f"Reading {spec.name}")
                .with_format(None)
            )  # fmt: skip
        except DataValidationError as error:
            problems.extend(error.problems)
            continue
        converted.append(done)
        offset += len(part.dataset)
        source_rows += len(part.dataset)
    if problems:
        raise DataValidationError(problems)
    layouts_out = {tuple(d.column_names) for d in converted}
    if len(layouts_out) > 1:
        raise DataValidationError([f"task {spec.name!r}: files disagree on the columns: {sorted(layouts_out)}"])
    dataset = concatenate_datasets(converted) if len(converted) > 1 else converted[0]
    kept = pc.count_distinct(dataset.data.table.column(POSITIVE_GROUP)).as_py() if expand else len(dataset)
    if kept < source_rows:
        logger.warning("%s: %d of %d row(s) dropped (no negatives in a task with negatives%s)", spec.path,
                       source_rows - kept, source_rows, ", or fewer than wanted (ragged_negatives: drop)"
                       if options.ragged_negatives == "drop" else "")  # fmt: skip
    repeated, example = repeated_pairs(dataset)
    if repeated:
        logger.warning(
            "%s: task %r: %d row(s) repeat an earlier (anchor, positive) pair (e.g. anchor %r); duplicates in one "
            "batch are false in-batch negatives: deduplicate the data", spec.path, spec.name, repeated, example[:80]
        )  # fmt: skip
    return dataset, replace(spec, converted=bake)


def _pos_is_text(dataset: Any) -> bool:
    return "pos" in dataset.column_names and is_text(dataset.features.arrow_schema.field("pos").type)


def _used(layout: Layout) -> set[str]:
    return {layout.query, layout.pos, layout.neg_list, *layout.neg_columns, layout.label, layout.pos_scores,
            layout.neg_scores, layout.prompt, layout.group} - {None}  # fmt: skip


def _cap(parts: Sequence[Part], max_rows: int | None) -> list[Part]:
    """The first ``max_rows`` rows over the parts in order."""
    if max_rows is None:
        return list(parts)
    out, left = [], max_rows
    for part in parts:
        if left <= 0:
            break
        if len(part.dataset) > left:
            numbers = part.row_numbers[:left] if part.row_numbers is not None else None
            part = Part(part.shard, part.dataset.select(range(left)), part.first_row, numbers)
        out.append(part)
        left -= len(part.dataset)
    return out


def task_parts(shard: Shard, default: str) -> dict[str, Part]:
    """A shard's rows by task: by its ``task`` column (empty values: ``default``), else all of them."""
    dataset = shard.dataset
    if "task" not in dataset.column_names:
        return {default: Part(shard, dataset)}
    values = dataset.data.table.column("task")
    if not is_text(values.type):
        values = values.cast(pa.string())
    values = pc.if_else(pc.equal(pc.fill_null(values, ""), ""), pa.scalar(default, values.type), values)
    parts = {}
    for task in pc.unique(values).to_pylist():
        rows = np.flatnonzero(pc.equal(values, task).to_numpy(zero_copy_only=False))
        if rows[-1] - rows[0] + 1 == len(rows):  # contiguous (as curation writes tasks): a slice of the file
            parts[str(task)] = Part(shard, dataset.select(range(rows[0], rows[-1] + 1)), int(rows[0]))
        else:
            parts[str(task)] = Part(shard, dataset.select(rows), 0, rows)
    return parts


def load_tasks(specs: Mapping[str, TaskSource], options: LoadOptions) -> tuple[Any, dict[str, TaskSource]]:
    """``(DatasetDict by task, {name: spec with the type the data asked for})`` for a stage's or a step's tasks.

    Raises ``FileNotFoundError`` naming the config key, :class:`DataValidationError` listing every problem (file,
    row and column), ``ConfigError`` for a task a file does not hold or more negatives asked than the data has.
    """
    opened: dict[tuple[Any, ...], list[Shard]] = {}
    parts: dict[str, list[Part]] = {}
    for name, spec in specs.items():
        if options.skip_remote and spec.remote:
            logger.info("Dry run: %s (%s) is remote, not checked offline.", spec.key, spec.path)
            continue
        where = (spec.path, spec.revision, spec.config_name)
        if where not in opened:
            try:
                opened[where] = open_shards(*where)
            except (FileNotFoundError, IsADirectoryError) as error:
                raise type(error)(f"{options.source or spec.path}: {spec.key}.path: {error}") from error
        parts[name] = []
        for shard in opened[where]:
            by_task = task_parts(shard, name)
            if name not in by_task:
                from kalm_st.recipe.config import ConfigError

                raise ConfigError(
                    f"{options.source}: {spec.key}.path {spec.path!r} holds tasks {list(by_task)}, not {name!r} "
                    "(rename the task after the file's 'task' values, or drop that column)."
                )
            parts[name].append(by_task[name])
    _check_siblings(specs, parts)
    return _finish(specs, parts, options, None)


def _check_siblings(specs: Mapping[str, TaskSource], parts: Mapping[str, list[Part]]) -> None:
    """Sub-folders of one source must have the same columns: the odd one out -> an error naming its file."""
    by_source: dict[str, dict[tuple[str, ...], list[tuple[str, str]]]] = {}
    for name, task_parts_ in parts.items():
        source = specs[name].key.split("[")[0]
        for part in task_parts_:
            layout = tuple(sorted(part.dataset.column_names))
            by_source.setdefault(source, {}).setdefault(layout, []).append((name, part.shard.label))
    problems = []
    for layouts in by_source.values():
        if len(layouts) <= 1 or len({t for members in layouts.values() for t, _ in members}) <= 1:
            continue
        common = max(layouts, key=lambda k: len(layouts[k]))
        for layout, members in layouts.items():
            missing, extra = sorted(set(common) - set(layout)), sorted(set(layout) - set(common))
            what = "; ".join(
                p for p in (missing and f"missing column(s) {missing}", extra and f"extra column(s) {extra}") if p
            )
            problems += [
                f"{label}: column {(missing or extra)[0]!r}: the columns of sub-folder {task!r} differ from its "
                f"siblings' {list(common)} ({what})"
                for task, label in members
                if layout != common
            ]
    if problems:
        raise DataValidationError(problems)


# ----------------------------------------------------------------------------------------------------------------------
# Files and data in memory (the curation tools, the Python API)
# ----------------------------------------------------------------------------------------------------------------------


def load_training_data(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    default_task: str | None = None,
    require_negatives: bool = False,
    num_negatives: int | None = None,
    batch_size: int | None = None,
    task_types: Mapping[str, str] | None = None,
    row_instructions: bool = True,
    **policy: Any,
) -> Any:
    """Read, validate and convert training files into ``DatasetDict({task: Dataset(anchor, positive,
    negative_1..n[, label][, positive_group])})``.

    Args:
        paths: Files (``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet``), globs or folders of shards, in any
            layout. Rows of one task from several files are concatenated.
        default_task: Task of rows without a ``task`` column / value; default: the file's stem.
        require_negatives: A task must have hard negatives (fine-tuning / distillation).
        num_negatives: Negatives per row (module doc); None: the longest list of the task.
        batch_size: Every task needs at least this many rows.
        task_types: Task name -> MTEB task type (which texts get a baked-in instruction).
        row_instructions: Apply an ``instruction`` column (default); False: texts as written.
        policy: :class:`LoadOptions` fields (``ragged_negatives``, ``instructed_queries``, ``positives``, ``seed``).
    """

    options = LoadOptions(num_negatives=num_negatives, require_negatives=require_negatives,
                          row_instructions=row_instructions, **policy)  # fmt: skip
    return load_files(paths, options, task_types, default_task=default_task, batch_size=batch_size)[0]


def load_files(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    options: LoadOptions,
    task_types: Mapping[str, str] | None = None,
    *,
    default_task: str | None = None,
    batch_size: int | None = None,
) -> tuple[Any, dict[str, TaskSource]]:
    """``(DatasetDict, specs)`` of files (or globs, folders): one task per file, or per value of its ``task``
    column; rows of one task in several files are concatenated."""
    path_list = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    shards = [(shard, default_task or Path(path).stem) for path in path_list for shard in open_shards(str(path))]
    return _load_shards(shards, ", ".join(map(str, path_list)), options, task_types, batch_size)


def validate_training_data(
    data: Any,
    *,
    require_negatives: bool = False,
    batch_size: int | None = None,
    source: str = "<dataset>",
    task_types: Mapping[str, str] | None = None,
    row_instructions: bool = True,
) -> Any:
    """:func:`load_training_data` for data already in memory (a ``Dataset``, split by its ``task`` column, or a
    ``DatasetDict`` keyed by task)."""
    from datasets import DatasetDict

    items = data.items() if isinstance(data, DatasetDict) else [(None, data)]
    shards = [(Shard(f"{source}[{name}]" if name is not None else source, d), name or "default") for name, d in items]
    options = LoadOptions(require_negatives=require_negatives, row_instructions=row_instructions)
    return _load_shards(shards, source, options, task_types, batch_size)[0]


def _load_shards(shards: Sequence[tuple[Shard, str]], where: str, options: LoadOptions,
                 task_types: Mapping[str, str] | None, batch_size: int | None) -> tuple[Any, dict[str, TaskSource]]:  # fmt: skip
    """Shards (with the task of rows without a ``task`` value) -> tasks, each one spec named by ``where``."""
    by_task: dict[str, list[Part]] = {}
    for shard, default in shards:
        for task, part in task_parts(shard, default).items():
            by_task.setdefault(task, []).append(part)
    specs = {task: TaskSource(task, where, task, (task_types or {}).get(task)) for task in by_task}
    return _finish(specs, by_task, options, batch_size)


def _finish(specs: Mapping[str, TaskSource], by_task: Mapping[str, list[Part]], options: LoadOptions,
            batch_size: int | None) -> Any:  # fmt: skip
    from datasets import DatasetDict

    result, resolved, problems = DatasetDict(), {}, []
    for task, parts in by_task.items():
        try:
            dataset, resolved[task] = load_task(specs[task], parts, options)
        except DataValidationError as error:
            problems.extend(error.problems)
            continue
        if batch_size is not None and len(dataset) < batch_size:
            problems.append(
                f"task {task!r} ({specs[task].path}): {len(dataset)} row(s), fewer than one batch of {batch_size}; "
                "add data, lower the batch size or merge the task into another"
            )
            continue
        result[task] = dataset
    if problems:
        raise DataValidationError(problems)
    return result, resolved


def build_training_prompts(
    data: Any | Iterable[str], task_types: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """The nested ``prompts`` dict for ``SentenceTransformerTrainingArguments(prompts=...)``.

    ``{task: {"anchor": query_prompt, "positive": document_prompt, ...}}`` from
    :func:`kalm_st.instructions.column_prompts`, the resolver the curation commands use too: the task's instruction
    on anchors, and on documents for symmetric and single-text types. A column whose texts already carry the KaLM
    template gets none; empty prompts are left out. With task names only, ``anchor, positive, negative_1..64``.

    Note: ST's collator picks the prompts of a batch from its *first* row's task.

    Raises:
        ValueError: an unknown task type; a column where some texts carry the template and others do not.
    """
    from datasets import DatasetDict

    task_types = dict(task_types or {})
    prompts: dict[str, dict[str, str]] = {}
    for task in data:
        columns = data[task] if isinstance(data, DatasetDict) else ["anchor", "positive", *negative_columns(64)]
        entry = column_prompts(columns, task, task_types.get(task))
        prompts[task] = {column: prompt for column, prompt in entry.items() if prompt}
    return prompts


__all__ = [
    "FLAG_TYPES",
    "LoadOptions",
    "build_training_prompts",
    "load_files",
    "load_task",
    "load_tasks",
    "load_training_data",
    "validate_training_data",
]
