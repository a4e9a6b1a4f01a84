"""Writing normalised training data: one ``.jsonl`` / ``.csv`` / ``.parquet`` file per call, atomically.

The inverse of :func:`kalm_st.data.load_training_data`: a ``DatasetDict`` is written with a ``task`` column,
which the reader splits again. Parquet goes from the Arrow tables as they are (a curation output of millions of rows
streams to disk, no Python object per row); jsonl / csv go through pandas.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from kalm_st.io import atomic_file


def _plain(value: Any) -> Any:
    """Nested lists of Python numbers/strings from arrays (pandas gives arrays of arrays for 2-D labels)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def write_training_data(data: Dataset | DatasetDict, path: str | os.PathLike[str]) -> Path:
    """Write normalised data to one ``.jsonl``/``.csv``/``.parquet`` file, atomically (temp file + rename).

    A ``DatasetDict`` is written with a ``task`` column, which :func:`load_training_data` splits again (tasks with
    fewer columns get nulls in the others). Parquet is written from the Arrow tables as they are (no Python object
    per row: a curation output of millions of rows streams to disk); jsonl / csv go through pandas.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ValueError(f"{target}: unsupported output format {suffix!r}; use .jsonl, .csv or .parquet")
    if suffix == ".parquet":
        return _write_parquet(data, target)
    if isinstance(data, DatasetDict):
        import pandas as pd

        frames = []
        for task, dataset in data.items():
            frame = dataset.to_pandas()
            frame.insert(0, "task", task)
            frames.append(frame)
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    else:
        frame = data.to_pandas()
    with atomic_file(target) as tmp:
        if suffix in (".jsonl", ".json"):
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            for column in frame.columns:
                if frame[column].map(lambda v: isinstance(v, list | tuple) or hasattr(v, "tolist")).any():
                    frame[column] = frame[column].map(lambda v: json.dumps(_plain(v)) if v is not None else None)
            frame.to_csv(tmp, index=False)
    return target


def _write_parquet(data: Dataset | DatasetDict, target: Path) -> Path:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = list(data.items()) if isinstance(data, DatasetDict) else [(None, data)]
    tables = []
    for task, dataset in parts:
        table = dataset.with_format("arrow")[:]  # the dataset's rows in order (memory-mapped where it is)
        if task is not None:
            table = table.add_column(0, "task", pc.fill_null(pa.nulls(len(table), pa.string()), task))
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    with atomic_file(target) as tmp:
        pq.write_table(table, tmp)
    return target


__all__ = ["write_training_data"]
