"""Write data/tiny/tiny_kalm/: the 64 real STS-B rows of data/tiny/tiny_train.jsonl in the paper's public
layout (DATA_AND_SERVING.md §1), for the tiny twin of the paper's recipe (training/recipes/kalm_v2_tiny.yaml).

- ``pretrain/{sts_a,sts_b}/train-00000-of-00001.parquet``: ``query``, ``pos`` (one text), ``neg: []`` (weak pairs,
  in-batch negatives only), like HIT-TMG/KaLM-embedding-pretrain-data;
- ``finetune/stsb/train-00000-of-00001.parquet``: ``query`` with the instruction baked in, ``pos``, ``neg`` (3, or 2
  on every fifth row: ragged, re-sampled by the reader), like KaLM-Embedding/KaLM-embedding-finetuning-data.

    python training/prepare/tiny_kalm_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parents[2] / "data" / "tiny"
INSTRUCTION = "Instruct: Retrieve semantically similar text. \n Query: "
SHARD = "train-00000-of-00001.parquet"


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "tiny_train.jsonl").read_text(encoding="utf8").splitlines()]
    out = HERE / "tiny_kalm"
    for name, part in (("sts_a", rows[:32]), ("sts_b", rows[32:])):
        folder = out / "pretrain" / name
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "query": [r["anchor"] for r in part],
                "pos": [[r["positive"]] for r in part],
                "neg": pa.array([[] for _ in part], type=pa.list_(pa.string())),
            }
        )
        pq.write_table(table, folder / SHARD)
    folder = out / "finetune" / "stsb"
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "query": [INSTRUCTION + r["anchor"] for r in rows],
            "pos": [[r["positive"]] for r in rows],
            "neg": [r["negatives"][: 2 if i % 5 == 0 else 3] for i, r in enumerate(rows)],
        }
    )
    pq.write_table(table, folder / SHARD)
    print(f"wrote {out}")  # noqa: T201


if __name__ == "__main__":
    main()
