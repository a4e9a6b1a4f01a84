"""Fixtures of the recipe tests: small training files in the kalm-st layout, written to tmp_path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "training" / "configs"
TINY_TRAIN = REPO_ROOT / "data" / "tiny" / "tiny_train.jsonl"


def write_rows(path: Path, num_rows: int = 16, num_negatives: int = 7, with_label: bool = True, seed: int = 0) -> Path:
    """``num_rows`` real STS-B pairs with ``num_negatives`` negatives (other rows' positives) and teacher scores."""
    base = [json.loads(line) for line in TINY_TRAIN.read_text(encoding="utf8").splitlines()]
    rng = random.Random(seed)
    with path.open("w", encoding="utf8") as handle:
        for i, row in enumerate(base[:num_rows]):
            others = [base[j]["positive"] for j in rng.sample([j for j in range(len(base)) if j != i], num_negatives)]
            record = {"anchor": row["anchor"], "positive": row["positive"], "negatives": others}
            if with_label:
                record["label"] = [0.9] + [round(rng.uniform(0.0, 0.6), 3) for _ in others]
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "rows.jsonl")
