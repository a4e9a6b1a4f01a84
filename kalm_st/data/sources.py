"""Where a task's rows come from, and the KaLM / FlagEmbedding / F2LLM formats, read in constant memory.

Sources (``TaskConfig.path`` or a ``data.sources`` entry), all read with ``datasets.load_dataset`` so its cache,
offline mode (``HF_DATASETS_OFFLINE``) and Hub authentication apply unchanged:

- a file (``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet``), a glob of shards (``corpus/train-*.parquet``), or a
  folder of shards (every supported file under it, sorted): one task; each shard is read on its own so an error
  names the shard and the row inside it;
- a folder laid out as a Hub dataset repository (a ``README.md`` with ``configs:``), or a Hub dataset
  ``hf://datasets/ORG/NAME[/SUBFOLDER]`` (with ``revision``): ``load_dataset(folder_or_id, name=config,
  data_dir=SUBFOLDER, revision=...)``, the same call for both;
- ``tasks: subfolders`` expands a folder (local or Hub) into one task per sub-folder (or per README config), named
  after it; a name ending in ``no_in_batch_neg`` (FlagEmbedding) trains that task without in-batch negatives.

Formats (detected from the columns): sentence-transformers' (``anchor``/``query``, ``positive``, negatives; the
checks of :mod:`kalm_st.data.formats`), KaLM / FlagEmbedding (``query``, ``pos`` list, ``neg`` list, optional
``pos_scores``/``neg_scores``, ``prompt``, ``type``) and F2LLM (``query``, ``passage``, ``negative_1..k``). The last
two are converted to ``anchor, positive, negative_1..n[, label]`` by :func:`convert_pairs` with a batched
``Dataset.map`` in Arrow format: ``pyarrow.compute`` on record batches, no Python object per row; the result is a
fingerprinted Arrow cache file, memory-mapped, so a restart with the cache in place neither converts nor validates
again. Rules (DATA_AND_SERVING.md §1-2):

- several positives: one per row per epoch, seeded (``positives: epoch``, the default): the row is read as one row
  per positive, grouped by a ``positive_group`` column, and the sampler trains one row of each group per epoch,
  drawn by a hash of ``(seed, epoch, group)`` (:mod:`kalm_st.data.positive_groups`); ``positives: once``: one
  positive per row drawn at load by a hash of ``(seed, row)``, the same every epoch;
- ``n`` negatives per row: the first ``n`` when a row has more; ``0 < len(neg) < n``: the row's own plus seeded
  draws with replacement from them (``ragged_negatives: resample``, the authors' behaviour) or the row is dropped
  (``drop``); ``neg: []`` (all rows of a task): no negative columns, in-batch negatives only; rows with an empty
  ``neg`` in a task that has negatives are dropped (logged);
- ``pos_scores``/``neg_scores`` (FlagEmbedding teacher scores) follow the chosen positive and negatives into
  ``label``;
- instructions are written into the texts (every query carries the template afterwards, so the task's prompt adds
  nothing): ``keep`` (default) keeps a query's own ``Instruct: ... \\n Query: `` and instructs the others with the
  row's ``prompt``, else the task's (explicit, else the table's); ``replace`` strips the row's and writes the task's;
  ``strip`` strips it and adds none. Symmetric and single-text tasks (and FlagEmbedding's ``symmetric_sts`` /
  ``symmetric_clustering``) get it on the documents too; ``symmetric_class`` is a Classification task.
"""

from __future__ import annotations

import glob as _glob
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_st.data.counter_hash import splitmix64
from kalm_st.data.formats import _FORMATS, DataValidationError, read_table
from kalm_st.data.positive_groups import POSITIVE_GROUP
from kalm_st.instructions import INSTRUCTED_TEXT_PATTERN, KALM_INSTRUCTION_TEMPLATE, resolve_instruction

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://datasets/"
NO_IN_BATCH_SUFFIX = "no_in_batch_neg"
FLAG_TYPES: Mapping[str, str | None] = {
    "normal": None,
    "only_1neg": None,
    "symmetric_sts": "STS",
    "symmetric_clustering": "Clustering",
    "symmetric_class": "Classification",
}
"""FlagEmbedding's row ``type`` -> kalm-st task type (None: the task's own)."""
_GLOB_CHARS = "*?["
_CONVERT_BATCH = 10_000


@dataclass(frozen=True)
class TaskSource:
    """One task's rows: where they are and how to read them (a resolved ``TaskConfig`` or sources entry).

    ``key`` is the config key that named it (for error messages); ``config_name`` a README ``configs:`` entry;
    ``type`` None: from the data's FlagEmbedding ``type`` column, else Retrieval.
    """

    name: str
    path: str
    key: str
    type: str | None = None
    revision: str | None = None
    config_name: str | None = None
    max_rows: int | None = None
    in_batch_negatives: bool | None = None
    instruction: str | None = None
    converted: bool = False
    """Set once loaded: the rows were KaLM / FlagEmbedding / F2LLM, converted by :func:`convert_pairs`."""

    @property
    def remote(self) -> bool:
        return self.path.startswith("hf://")


def is_remote_path(path: str) -> bool:
    return path.startswith("hf://")


def has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def parse_hub_path(path: str) -> tuple[str, str | None]:
    """``hf://datasets/ORG/NAME[/SUB...]`` -> ``("ORG/NAME", "SUB..." or None)``."""
    if not path.startswith(HUB_PREFIX):
        raise ValueError(f"{path!r}: a Hub dataset is written hf://datasets/ORG/NAME[/SUBFOLDER]")
    parts = path[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{path!r}: a Hub dataset is written hf://datasets/ORG/NAME[/SUBFOLDER]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _readme_configs(folder: Path) -> bool:
    readme = folder / "README.md"
    return readme.is_file() and "configs:" in readme.read_text(encoding="utf8", errors="replace")


def list_subtasks(path: str, revision: str | None = None) -> list[tuple[str, str, str | None]]:
    """The tasks of a folder (local or Hub): ``[(task name, path, config name)]``.

    A README with ``configs:`` (local or Hub): one task per config (``datasets.get_dataset_config_names``, which
    works offline from the cache). Otherwise one task per sub-folder (local: the folder listing; Hub: the repository
    tree, which needs the network).
    """
    from datasets import get_dataset_config_names

    if is_remote_path(path):
        repo, sub = parse_hub_path(path)
        if sub is None:
            try:
                names = get_dataset_config_names(repo, revision=revision)
            except Exception:  # noqa: BLE001 - no README configs: list the tree below
                names = []
            if names and names != ["default"]:
                return [(n, path, n) for n in names]
        from huggingface_hub import HfApi

        entries = HfApi().list_repo_tree(repo, path_in_repo=sub or "", repo_type="dataset", revision=revision)
        folders = sorted(e.path.rsplit("/", 1)[-1] for e in entries if type(e).__name__ == "RepoFolder")
        return [(f, f"{path.rstrip('/')}/{f}", None) for f in folders if not f.startswith(".")]
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Training data folder not found: {folder}")
    if _readme_configs(folder):
        return [(n, path, n) for n in get_dataset_config_names(str(folder))]
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not subs:
        raise FileNotFoundError(f"{folder}: no sub-folders to expand into tasks (tasks: subfolders)")
    return [(s, str(folder / s), None) for s in subs]


def list_column_tasks(path: str) -> list[str]:
    """The distinct values of the ``task`` column of a local file (or of every shard of a glob / folder), in order
    of first occurrence: the tasks of a curation step's output, read without loading the other columns."""
    names: list[str] = []
    for shard in local_shards(path):
        table = read_table(shard)
        if "task" not in table.column_names:
            raise ValueError(f"{shard}: tasks: column needs a 'task' column (have {table.column_names})")
        column = table.select_columns(["task"]).with_format("arrow")[:].column("task")
        names += [name for name in pc.unique(column).to_pylist() if name not in names]
    return names


def local_shards(path: str) -> list[Path]:
    """The files a local path names: itself, a glob's matches, or a folder's supported files (recursive)."""
    if has_glob(path):
        files = sorted(Path(p) for p in _glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"Training data glob matches no file: {path}")
        return files
    folder = Path(path)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _FORMATS)
        if not files:
            raise FileNotFoundError(f"{folder}: no {'/'.join(sorted(_FORMATS))} shards in the folder")
        return files
    return [folder]


def open_source(task: TaskSource) -> list[tuple[str, Any]]:
    """``[(label for messages, Dataset)]`` of a task: one per local shard, one for a Hub / README-config dataset."""
    from datasets import load_dataset

    if task.remote or (Path(task.path).is_dir() and _readme_configs(Path(task.path))):
        if task.remote:
            repo, sub = parse_hub_path(task.path)
        else:
            repo, sub = task.path, None
        label = task.path + (f" [config {task.config_name}]" if task.config_name else "")
        try:
            dataset = load_dataset(repo, name=task.config_name, data_dir=sub, revision=task.revision, split="train")
        except FileNotFoundError:
            raise
        except Exception as error:  # datasets wraps the reader's error: name the source and the reason
            from kalm_st.data.formats import _reasons

            raise DataValidationError([f"{label}: cannot be read: {_reasons(error)}"]) from error
        return [(label, dataset)]
    return [(str(shard), read_table(shard)) for shard in local_shards(task.path)]


# ----------------------------------------------------------------------------------------------------------------------
# Format detection and conversion
# ----------------------------------------------------------------------------------------------------------------------


def detect_format(columns: Sequence[str]) -> str:
    """``kalm`` (``pos``), ``f2llm`` (``passage``) or ``st`` (anything else: kalm-st's own checks apply)."""
    if "pos" in columns:
        return "kalm"
    if "passage" in columns and "positive" not in columns:
        return "f2llm"
    return "st"


def _first(mask: pa.Array) -> int | None:
    index = pc.index(pc.fill_null(mask, True), True).as_py()
    return None if index < 0 else index


def _fail(label: str, row: int, column: str, what: str) -> None:
    raise DataValidationError([f"{label}: row {row}: column {column!r}: {what}"])


def _check_texts(texts: pa.Array, rows: np.ndarray, label: str, column: str, what: str = "text") -> None:
    """Null or blank texts -> one error naming the row (``rows`` maps each text to its 0-based row in the file)."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        if len(texts):
            _fail(label, int(rows[0]), column, f"{what}s must be strings, got {texts.type}")
        return
    bad = pc.or_kleene(pc.is_null(texts), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0))
    at = _first(bad)
    if at is not None:
        _fail(label, int(rows[at]), column, f"empty or missing {what}")


def _list_parts(column: pa.Array, rows: np.ndarray, label: str, name: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """``(flat values, per-row lengths, per-row starts into the flat values)`` of a list column."""
    lengths_arr = pc.list_value_length(column)
    at = _first(pc.is_null(lengths_arr))
    if at is not None:
        _fail(label, int(rows[at]), name, "missing list (null)")
    lengths = lengths_arr.to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    return pc.list_flatten(column), lengths, starts


def _check_scores(
    values: pa.Array, lengths: np.ndarray, expected: np.ndarray, rows: np.ndarray, label: str, name: str, owner: str
) -> None:
    mismatch = np.flatnonzero(lengths != expected)
    if mismatch.size:
        i = int(mismatch[0])
        _fail(label, int(rows[i]), name, f"{lengths[i]} scores for {expected[i]} texts in {owner!r}")
    if not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        if len(values):
            _fail(label, int(rows[0]), name, f"scores must be numbers, got {values.type}")
        return
    numbers = pc.cast(values, pa.float64())
    bad = pc.invert(pc.fill_null(pc.is_finite(numbers), False))
    at = _first(bad)
    if at is not None:
        parent = np.repeat(np.arange(len(lengths)), lengths)
        _fail(label, int(rows[parent[at]]), name, f"NaN, infinite or missing score {numbers[at].as_py()}")


def _instruct(texts: pa.Array, prefixes: pa.Array | None, policy: str) -> pa.Array:
    """Write the template into texts: ``keep`` a text's own, ``replace`` it, ``strip`` it (``prefixes`` None: none)."""
    instructed = pc.fill_null(pc.match_substring_regex(texts, pattern=INSTRUCTED_TEXT_PATTERN), False)
    if policy != "keep":
        texts = pc.replace_substring_regex(texts, pattern=INSTRUCTED_TEXT_PATTERN, replacement="", max_replacements=1)
    if prefixes is None or policy == "strip":
        return texts
    joined = pc.binary_join_element_wise(prefixes, texts, "")
    return pc.if_else(instructed, texts, joined) if policy == "keep" else joined


def _f2llm_as_lists(batch: pa.Table, neg_columns: Sequence[str]) -> tuple[pa.Array, pa.Array | None]:
    """``passage`` and ``negative_1..k`` as ``pos`` / ``neg`` list arrays (nulls and blanks left out of ``neg``)."""
    n = batch.num_rows
    passages = batch.column("passage").combine_chunks()
    pos = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), passages)
    if not neg_columns:
        return pos, None
    k = len(neg_columns)
    stacked = pa.concat_arrays([batch.column(c).combine_chunks().cast(pa.string()) for c in neg_columns])
    order = (np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel()  # row-major: row i's k negatives in a row
    values = stacked.take(pa.array(order))
    valid = pc.and_(pc.is_valid(values), pc.not_equal(pc.fill_null(values, ""), ""))
    valid_np = valid.to_numpy(zero_copy_only=False).reshape(n, k)
    offsets = np.concatenate([[0], np.cumsum(valid_np.sum(axis=1))]).astype(np.int32)
    neg = pa.ListArray.from_arrays(pa.array(offsets), values.filter(valid))
    return pos, neg


def _convert_batch(
    batch: pa.Table,
    indices: list[int],
    *,
    label: str,
    fmt: str,
    num_negatives: int,
    seed: int,
    ragged: str,
    policy: str,
    instruction: str,
    documents: bool,
    neg_columns: Sequence[str],
    expand: bool = False,
    group_offset: int = 0,
) -> pa.Table:
    """One record batch of KaLM / FlagEmbedding / F2LLM rows -> ``anchor, positive, negative_1..n[, label]``.

    ``expand``: a row with ``k`` positives becomes ``k`` consecutive rows (one positive each, the same query,
    negatives and negative scores) with a ``positive_group`` column, ``group_offset`` + the source row.
    """
    n = batch.num_rows
    start = indices[0] if n else 0
    rows = np.arange(start, start + n, dtype=np.int64)
    query = batch.column("query").combine_chunks()
    _check_texts(query, rows, label, "query")
    if fmt == "f2llm":
        _check_texts(batch.column("passage").combine_chunks(), rows, label, "passage")
        pos_col, neg_col = _f2llm_as_lists(batch, neg_columns)
        pos_name, neg_name = "passage", "negative_1..k"
    else:
        pos_col = batch.column("pos").combine_chunks()
        neg_col = batch.column("neg").combine_chunks() if "neg" in batch.column_names else None
        pos_name, neg_name = "pos", "neg"
    pos_flat, pos_len, pos_start = _list_parts(pos_col, rows, label, pos_name)
    at = np.flatnonzero(pos_len == 0)
    if at.size:
        _fail(label, int(rows[at[0]]), pos_name, "empty list: every row needs a positive")
    _check_texts(pos_flat, np.repeat(rows, pos_len), label, pos_name, "positive")
    choice = (splitmix64(seed, rows, 0) % pos_len.astype(np.uint64)).astype(np.int64) if n else np.zeros(0, np.int64)
    keep = np.ones(n, dtype=bool)
    neg_idx: list[np.ndarray] = []
    if neg_col is not None:
        neg_flat, neg_len, neg_start = _list_parts(neg_col, rows, label, neg_name)
        _check_texts(neg_flat, np.repeat(rows, neg_len), label, neg_name, "negative")
        if num_negatives > 0:
            keep &= neg_len > 0
            if ragged == "drop":
                keep &= neg_len >= num_negatives
            safe_len = np.maximum(neg_len, 1).astype(np.uint64)
            for k in range(num_negatives):
                drawn = (splitmix64(seed, rows, k + 1) % safe_len).astype(np.int64)
                neg_idx.append(neg_start + np.where(k < neg_len, k, drawn))
    sel = np.flatnonzero(keep)  # rows kept (all but empty / too short negatives)
    if expand:  # one output row per positive: take[i] is its source row, picked[i] its positive in the list
        counts = pos_len[sel]
        take = np.repeat(sel, counts)
        picked = np.arange(len(take), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    else:
        take, picked = sel, choice[sel]
    scores = None
    if "pos_scores" in batch.column_names or "neg_scores" in batch.column_names:
        if "pos_scores" not in batch.column_names:
            _fail(label, start, "pos_scores", "neg_scores need pos_scores (teacher scores of the positives) too")
        ps_flat, ps_len, ps_start = _list_parts(batch.column("pos_scores").combine_chunks(), rows, label, "pos_scores")
        _check_scores(ps_flat, ps_len, pos_len, rows, label, "pos_scores", pos_name)
        columns = [pc.cast(ps_flat, pa.float64()).to_numpy(zero_copy_only=False)[ps_start[take] + picked]]
        if neg_idx:
            if "neg_scores" not in batch.column_names:
                _fail(label, start, "neg_scores", "pos_scores without neg_scores: the negatives have no teacher score")
            ns_flat, ns_len, ns_start = _list_parts(
                batch.column("neg_scores").combine_chunks(), rows, label, "neg_scores"
            )
            _check_scores(ns_flat, ns_len, neg_len, rows, label, "neg_scores", neg_name)
            ns = pc.cast(ns_flat, pa.float64()).to_numpy(zero_copy_only=False)
            columns += [ns[idx[take]] if len(ns) else np.zeros(len(take)) for idx in neg_idx]
        scores = np.stack(columns, axis=1)
    # instructions: the row's prompt, else the task's
    prefixes = None
    if policy != "strip":
        head, tail = KALM_INSTRUCTION_TEMPLATE.split("{instruction}")
        if "prompt" in batch.column_names:
            own = pc.utf8_trim_whitespace(batch.column("prompt").combine_chunks().cast(pa.string()))
            own = pc.if_else(pc.equal(pc.fill_null(own, ""), ""), pa.scalar(instruction), own)
        else:
            own = pa.array(np.full(n, instruction, dtype=object), pa.string()) if n else pa.array([], pa.string())
        prefixes = pc.binary_join_element_wise(head, own, tail, "")
    taken = pa.array(take)
    if prefixes is not None:
        prefixes = prefixes.take(taken)
    out: dict[str, pa.Array] = {
        "anchor": _instruct(query.take(taken), prefixes, policy),
        "positive": pos_flat.take(pa.array(pos_start[take] + picked)),
    }
    for k, idx in enumerate(neg_idx):
        out[f"negative_{k + 1}"] = neg_flat.take(pa.array(idx[take]))
    if documents:
        for column in list(out)[1:]:
            out[column] = _instruct(out[column], prefixes, policy)
    for column in out:
        out[column] = out[column].cast(pa.large_string())
    if expand:
        out[POSITIVE_GROUP] = pa.array(rows[take] + group_offset, pa.int64())
    if scores is not None:
        out["label"] = pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), scores.shape[1]).cast(
            pa.list_(pa.float64())
        )
    return pa.table(out)


def _first_non_list(dataset: Any, column: str) -> int:
    """The first row whose value is not a list: JSON files mixing lists and scalars are read as JSON text."""
    values = dataset.data.table.column(column)
    storage = pa.chunked_array([getattr(c, "storage", c) for c in values.chunks])
    if pa.types.is_string(storage.type) or pa.types.is_large_string(storage.type):
        at = _first(pc.invert(pc.starts_with(pc.utf8_ltrim_whitespace(storage), "[")))
        return at or 0
    return 0


def most_positives(dataset: Any) -> int:
    """The longest ``pos`` list of a KaLM / FlagEmbedding dataset, 1 for other formats (Arrow: no per-row work)."""
    if "pos" not in dataset.column_names:
        return 1
    kind = dataset.features.arrow_schema.field("pos").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return 1  # not a list: convert_pairs names the row
    lengths = pc.list_value_length(dataset.data.table.column("pos"))
    return int(pc.max(lengths).as_py() or 0)


def source_task_type(dataset: Any, label: str) -> str | None:
    """The task type a FlagEmbedding ``type`` column asks for (``symmetric_sts`` -> STS, ...), None for none."""
    if "type" not in dataset.column_names:
        return None
    values = [v for v in pc.unique(dataset.data.table.column("type")).to_pylist() if v is not None]
    unknown = sorted(set(values) - set(FLAG_TYPES))
    if unknown:
        raise DataValidationError([f"{label}: column 'type': unknown value(s) {unknown} (known: {list(FLAG_TYPES)})"])
    types = {FLAG_TYPES[v] for v in values} - {None}
    if len(types) > 1:
        raise DataValidationError([f"{label}: column 'type': one task mixes {sorted(values)}; split it into tasks"])
    return next(iter(types), None)


def task_negatives(parts: Sequence[tuple[str, Any]], fmt: str, wanted: int | None) -> int:
    """Negatives per row of a task: ``wanted`` (None: the longest ``neg`` list), 0 when no row has any."""
    longest = 0
    for _, dataset in parts:
        if fmt == "f2llm":
            longest = max(longest, len([c for c in dataset.column_names if c.startswith("negative_")]))
        elif "neg" in dataset.column_names:
            lengths = pc.list_value_length(dataset.data.table.column("neg"))
            longest = max(longest, pc.max(lengths).as_py() or 0)
    if longest == 0:
        return 0
    return longest if wanted is None else wanted


def convert_pairs(
    dataset: Any,
    *,
    label: str,
    task_name: str,
    task_type: str | None,
    num_negatives: int,
    seed: int = 0,
    ragged_negatives: str = "resample",
    instructed_queries: str = "keep",
    instruction: str | None = None,
    positives: str = "epoch",
    group_offset: int = 0,
    several_positives: bool | None = None,
) -> Any:
    """KaLM / FlagEmbedding / F2LLM rows -> a ``Dataset(anchor, positive, negative_1..n[, label])`` (module doc).

    A batched ``map`` in Arrow format: cached by ``datasets``' fingerprint (a rerun reads the cache file, checks
    nothing again), memory-mapped. Bad input raises :class:`DataValidationError` naming ``label``, the 0-based row
    and the column.

    ``positives``: ``epoch`` (default): a row with several positives becomes one row per positive, grouped by a
    ``positive_group`` column (``group_offset`` + the row: pass the rows of the task's earlier shards), for the
    sampler's per-epoch draw (:mod:`kalm_st.data.positive_groups`); ``once``: one positive per row, drawn at load
    by a hash of ``(seed, row)``. ``several_positives``: whether any row of the task has several (None: look at this
    dataset); the shards of one task must agree, so that they concatenate.
    """
    columns = dataset.column_names
    fmt = detect_format(columns)
    schema = dataset.features.arrow_schema
    for name in ("pos", "neg", "pos_scores", "neg_scores") if fmt == "kalm" else ():
        if (
            name in columns
            and not pa.types.is_list(schema.field(name).type)
            and not pa.types.is_large_list(schema.field(name).type)
        ):
            _fail(label, _first_non_list(dataset, name), name, f"must be a list, got {schema.field(name).type}")
    resolved = resolve_instruction(task_name, task_type)
    neg_columns = sorted(
        (c for c in columns if c.startswith("negative_") and c[9:].isdigit()), key=lambda c: int(c[9:])
    )
    kwargs = {
        "label": label,
        "fmt": fmt,
        "num_negatives": int(num_negatives),
        "seed": int(seed),
        "ragged": ragged_negatives,
        "policy": instructed_queries,
        "instruction": instruction or resolved.instruction,
        "documents": resolved.documents,
        "neg_columns": neg_columns,
        "expand": positives == "epoch"
        and fmt == "kalm"
        and bool(several_positives if several_positives is not None else most_positives(dataset) > 1),
        "group_offset": int(group_offset),
    }
    converted = dataset.with_format("arrow").map(
        _convert_batch,
        batched=True,
        batch_size=_CONVERT_BATCH,
        with_indices=True,
        remove_columns=columns,
        fn_kwargs=kwargs,
        desc=f"Reading {task_name}",
    )
    converted = converted.with_format(None)
    kept = len(converted)
    if kwargs["expand"]:  # one row per positive: count the source rows (groups) kept
        kept = pc.count_distinct(converted.data.table.column(POSITIVE_GROUP)).as_py()
    dropped = len(dataset) - kept
    if dropped:
        logger.warning(
            "%s: %d of %d row(s) dropped (empty 'neg' in a task with negatives%s)",
            label,
            dropped,
            len(dataset),
            ", or fewer than the negatives wanted (ragged_negatives: drop)" if ragged_negatives == "drop" else "",
        )
    return converted


def check_sibling_columns(parts: Mapping[str, Sequence[tuple[str, Any]]]) -> None:
    """Sub-folders of one source must have the same columns: the odd one out -> an error naming its file."""
    layouts: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for task, shards in parts.items():
        for label, dataset in shards:
            layouts.setdefault(tuple(sorted(dataset.column_names)), []).append((task, label))
    if len(layouts) <= 1:
        return
    common = max(layouts, key=lambda k: len(layouts[k]))
    problems = []
    for layout, members in layouts.items():
        if layout == common:
            continue
        missing, extra = sorted(set(common) - set(layout)), sorted(set(layout) - set(common))
        for task, label in members:
            what = "; ".join(
                part
                for part in (
                    f"missing column(s) {missing}" if missing else "",
                    f"extra column(s) {extra}" if extra else "",
                )
                if part
            )
            problems.append(
                f"{label}: row 0: column {(missing or extra)[0]!r}: the columns of sub-folder {task!r} differ from "
                f"its siblings' {list(common)} ({what})"
            )
    raise DataValidationError(problems)


def with_suffix_rule(task: TaskSource) -> TaskSource:
    """The suffix rule: a task named ``..no_in_batch_neg`` trains without in-batch negatives."""
    if task.in_batch_negatives is None and task.name.endswith(NO_IN_BATCH_SUFFIX):
        return replace(task, in_batch_negatives=False)
    return task


def cap_parts(parts: Sequence[tuple[str, Any]], max_rows: int | None) -> list[tuple[str, Any]]:
    """Keep the first ``max_rows`` rows over the shards in order (whole shards, then a prefix of the last)."""
    if max_rows is None:
        return list(parts)
    out, left = [], max_rows
    for label, dataset in parts:
        if left <= 0:
            break
        out.append((label, dataset if len(dataset) <= left else dataset.select(range(left))))
        left -= len(out[-1][1])
    return out


__all__ = [
    "FLAG_TYPES",
    "HUB_PREFIX",
    "NO_IN_BATCH_SUFFIX",
    "TaskSource",
    "check_sibling_columns",
    "convert_pairs",
    "detect_format",
    "has_glob",
    "is_remote_path",
    "list_subtasks",
    "most_positives",
    "open_source",
    "parse_hub_path",
    "source_task_type",
    "task_negatives",
]
