"""The curation subcommands end to end on real data files: label -> teacher-score, mine -> filter."""

from __future__ import annotations

import csv
import json

import numpy as np
from sentence_transformers import SentenceTransformer, util

from kalm_st.cli import main


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


def test_label_then_teacher_score(tmp_path, shared_data_dir, minilm_dir):
    with (shared_data_dir / "banking77" / "train.csv").open(encoding="utf8") as handle:
        rows = list(csv.DictReader(handle))
    classes = sorted({r["category"] for r in rows})[:4]
    sample = [r for c in classes for r in [r for r in rows if r["category"] == c][:15]]
    source = tmp_path / "banking.csv"
    with source.open("w", encoding="utf8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(sample)
    class_of = {r["text"]: r["category"] for r in sample}

    labelled = tmp_path / "labelled.jsonl"
    assert main(["label", str(source), "-o", str(labelled), "--task", "Banking77Classification",
                 "--label-column", "category", "--num-negatives", "3"]) == 0  # fmt: skip
    out = _read_jsonl(labelled)
    assert out and all(r["task"] == "Banking77Classification" for r in out)
    for r in out:
        anchor = r["anchor"].split(" \n Query: ")[-1]  # the instruction may prefix the anchor
        assert r["positive"] != anchor and class_of[r["positive"].split(" \n Query: ")[-1]] == class_of[anchor]
        assert all(class_of[r[f"negative_{k}"].split(" \n Query: ")[-1]] != class_of[anchor] for k in (1, 2, 3))

    scored = tmp_path / "scored.jsonl"
    assert main(["teacher-score", str(labelled), "-o", str(scored), "--model", str(minilm_dir), "--no-instructions",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0  # fmt: skip
    first = _read_jsonl(scored)[0]
    teacher = SentenceTransformer(str(minilm_dir), device="cpu")
    candidates = [first["positive"], first["negative_1"], first["negative_2"], first["negative_3"]]
    expected = util.cos_sim(teacher.encode([first["anchor"]]), teacher.encode(candidates))[0].numpy()
    # float32 cosines (|x| <= 1) of texts encoded in other batches: torch.testing.assert_close's float32 tolerances
    np.testing.assert_allclose(first["label"], expected, rtol=1.3e-6, atol=1e-5)


def test_mine_then_filter(tmp_path, shared_data_dir, minilm_dir):
    with (shared_data_dir / "stsb" / "train.csv").open(encoding="utf8") as handle:
        pairs = [r for r in csv.reader(handle) if float(r[2]) >= 4.0][:40]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"query": a, "positive": b}) + "\n" for a, b, _ in pairs), encoding="utf8")

    mined = tmp_path / "mined.jsonl"
    assert main(["mine", str(source), "-o", str(mined), "--model", str(minilm_dir), "--range-min", "2",
                 "--range-max", "12", "--num-negatives", "2", "--device", "cpu", "--no-instructions"]) == 0  # fmt: skip
    rows = _read_jsonl(mined)
    assert rows and all(r["negative_1"] not in (r["anchor"], r["positive"]) for r in rows)

    kept = tmp_path / "kept.jsonl"
    assert main(["filter", str(mined), "-o", str(kept), "--model", str(minilm_dir), "--top-k", "1",
                 "--device", "cpu", "--no-instructions"]) == 0  # fmt: skip
    assert 0 < len(_read_jsonl(kept)) <= len(rows)


def test_missing_input_file_is_a_clear_error(tmp_path, capsys):
    assert main(["label", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o.jsonl"), "--task", "X"]) == 2
    assert "missing.csv" in capsys.readouterr().err
