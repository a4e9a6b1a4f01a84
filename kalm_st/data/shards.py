"""Open a task's rows as memory-mapped Arrow tables, one per shard, with ``datasets`` (its cache, offline mode and
Hub authentication apply unchanged); ``datasets``' generic errors reworded to name the file and the reader's reason.

A shard knows how a user counts its rows: 1-based lines for jsonl / csv (the header is line 1), 1-based rows for
parquet, Hub datasets and data in memory.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kalm_st.data.checks import DataValidationError
from kalm_st.io import atomic_file

FORMATS: dict[str, tuple[str, str, dict[str, Any]]] = {
    ".jsonl": ("json", "JSON lines", {"chunksize": 1 << 20}),
    ".json": ("json", "JSON", {"chunksize": 1 << 20}),
    ".csv": ("csv", "CSV", {}),
    ".tsv": ("csv", "TSV", {"sep": "\t"}),
    ".parquet": ("parquet", "Parquet", {}),
}
"""Suffix -> (``datasets`` builder, the format's name in messages, builder options). JSON is parsed 1 MB at a time
(``datasets``' default, 10 MB, keeps about 0.13 GB of private memory while it converts)."""
_GLOB_CHARS = "*?["


HUB_PREFIX = "hf://datasets/"


def is_remote_path(path: str) -> bool:
    return path.startswith("hf://")


def parse_hub_path(path: str) -> tuple[str, str | None]:
    """``hf://datasets/ORG/NAME[/SUB...]`` -> ``("ORG/NAME", "SUB..." or None)``."""
    parts = path[len(HUB_PREFIX) :].strip("/").split("/") if path.startswith(HUB_PREFIX) else []
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{path!r}: a Hub dataset is written hf://datasets/ORG/NAME[/SUBFOLDER]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def has_readme_configs(folder: Path) -> bool:
    readme = folder / "README.md"
    return readme.is_file() and "configs:" in readme.read_text(encoding="utf8", errors="replace")


@dataclass(frozen=True)
class Shard:
    """One table of a task's rows and how its rows are named in messages: ``{label}: {unit} {first + row}``."""

    label: str
    dataset: Any
    unit: str = "row"
    first: int = 1
    """The number of row 0: 1 for rows and jsonl lines, 2 for CSV lines (after the header)."""
    csv: bool = False
    """Lists are JSON text in CSV files."""


def shard_of(path: Path, dataset: Any) -> Shard:
    builder = FORMATS[path.suffix.lower()][0]
    if builder == "parquet":
        return Shard(str(path), dataset)
    return Shard(str(path), dataset, "line", 2 if builder == "csv" else 1, csv=builder == "csv")


def read_table(path: str | os.PathLike[str]) -> Any:
    """Read one jsonl/json/csv/tsv/parquet file with ``datasets`` (a memory-mapped ``Dataset``).

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path or a folder, ``ValueError`` for an
    unsupported suffix, and :class:`DataValidationError` naming the file for an empty or unparsable one (with the
    reader's own reason, e.g. the row of a JSON syntax error), instead of ``datasets``' generic error.
    """
    from datasets import load_dataset

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Training data path {path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"Training data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported format {suffix!r}; use one of {sorted(FORMATS)}")
    if path.stat().st_size == 0:
        raise DataValidationError([f"{path}: the file is empty (0 bytes)"])
    builder, name, kwargs = FORMATS[suffix]
    try:
        if builder == "parquet":
            dataset = _parquet_as_arrow(path)
        else:
            dataset = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except OSError:
        raise  # the machine's problem (disk, permissions), not the file's content
    except Exception as error:  # datasets wraps the reader's error in a generic one: report the reader's reason
        if _holds_no_rows(error):
            raise DataValidationError([f"{path}: no rows (the file holds no records)"]) from error
        reason = reasons(error)
        if builder == "json" and "to null" in reason:  # datasets takes a chunk's types from the file's first chunk
            reason += (
                "; a column is empty (null or []) in every row of the file's first MB and holds values later:"
                " put a row with a value in that column among the first rows"
            )
        raise DataValidationError([f"{path}: cannot be read as {name}: {reason}"]) from error
    if dataset.num_rows == 0:
        raise DataValidationError([f"{path}: no rows (the file holds no records)"])
    return dataset


def _parquet_as_arrow(path: Path) -> Any:
    """A parquet file as a memory-mapped ``Dataset``: copied once, record batch by record batch, into an Arrow file
    of ``datasets``' cache, named by the file's path, size and modification time (a changed file is copied anew).

    ``datasets``' parquet builder (5.2: pre-buffered reads through a Python file object) keeps the bytes it read
    until the file is done, 0.35 GB of private memory per million rows in ``benchmarks/data_scale.py``; this copy
    holds one batch at a time.
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, config
    from filelock import FileLock

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{pa.__version__}".encode()).hexdigest()
    folder = Path(config.HF_DATASETS_CACHE) / "kalm_st_parquet" / key[:24]
    target = folder / "data.arrow"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / "data.lock")):
        if not target.is_file():
            # pre_buffer off and a 1 MB read buffer: one batch in memory, not the file's column chunks; atomic: a
            # crash leaves no half-written copy
            with (
                atomic_file(target) as partial,
                pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as source,
                pa.OSFile(str(partial), "wb") as sink,
                pa.ipc.new_stream(sink, source.schema_arrow) as writer,
            ):
                for batch in source.iter_batches(batch_size=10_000):
                    writer.write_batch(batch)
                    pa.default_memory_pool().release_unused()
    return Dataset.from_file(str(target))


def _error_chain(error: BaseException | None) -> list[BaseException]:
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


def reasons(error: BaseException) -> str:
    """The readers' messages under ``datasets``' generic DatasetGenerationError, innermost last."""
    found: list[str] = []
    for e in _error_chain(error):
        if type(e).__name__ == "DatasetGenerationError":
            continue
        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if text not in found:
            found.append(text)
    return "; ".join(found[:3])


def local_shards(path: str) -> list[Path]:
    """The files a local path names: itself, a glob's matches, or a folder's supported files (recursive)."""
    if any(c in path for c in _GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"Training data glob matches no file: {path}")
        return files
    folder = Path(path)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise IsADirectoryError(
                f"Training data path {folder} is a directory without {'/'.join(sorted(FORMATS))} shards"
            )
        return files
    return [folder]


def open_shards(path: str, revision: str | None = None, config_name: str | None = None) -> list[Shard]:
    """A task's shards: one per local file, one for a Hub dataset or a folder laid out as one (README ``configs:``)."""

    if is_remote_path(path) or (Path(path).is_dir() and has_readme_configs(Path(path))):
        from datasets import load_dataset

        repo, sub = parse_hub_path(path) if is_remote_path(path) else (path, None)
        label = path + (f" [config {config_name}]" if config_name else "")
        try:
            dataset = load_dataset(repo, name=config_name, data_dir=sub, revision=revision, split="train")
        except FileNotFoundError:
            raise
        except Exception as error:  # datasets wraps the reader's error: name the source and the reason
            raise DataValidationError([f"{label}: cannot be read: {reasons(error)}"]) from error
        return [Shard(label, dataset)]
    return [shard_of(shard, read_table(shard)) for shard in local_shards(path)]


def column_tasks(path: str) -> list[str]:
    """The distinct values of the ``task`` column of a local file (or of every shard of a glob / folder), in order
    of first occurrence: the tasks of a curation step's output, read without loading the other columns."""
    import pyarrow.compute as pc

    names: list[str] = []
    for shard in local_shards(path):
        table = read_table(shard)
        if "task" not in table.column_names:
            raise ValueError(f"{shard}: tasks: column needs a 'task' column (have {table.column_names})")
        names += [n for n in pc.unique(table.data.table.column("task")).to_pylist() if n not in names]
    return names


__all__ = [
    "FORMATS",
    "HUB_PREFIX",
    "Shard",
    "column_tasks",
    "has_readme_configs",
    "is_remote_path",
    "local_shards",
    "open_shards",
    "parse_hub_path",
    "read_table",
    "reasons",
]
