"""The quickstart recipe (training/recipes/quickstart.yaml, what `kalm-st quickstart` runs) end to end on a tiny
backbone: every step, curation outputs feeding the stages, before/after scores, a kalm-v2 folder plain ST loads.

The real run (SmolLM2-135M) is documented in docs/quickstart.md; this checks the wiring in CI.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer

from kalm_st.cli import main

from .conftest import REPO_ROOT

TINY = "builtin:tiny-qwen2"
SMALL_TRAINING = ["max_steps=1", "per_device_train_batch_size=4"]


def test_quickstart_recipe_end_to_end_on_a_tiny_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)  # the recipe names the bundled data relative to the clone's root
    overrides = [f"output_dir={tmp_path / 'work'}", f"zero_shot.model={TINY}", "zero_shot.max_seq_length=128"]
    for step in ("zero_shot", "trained"):  # 100 STS-B dev pairs instead of the held-out sets, for time
        overrides += [f"{step}.data_dir=data/tiny/tiny_eval", f"{step}.tasks=[STSBenchmark]"]
    for stage in ("stage1", "stage2", "stage3"):
        overrides += [f"{stage}.set.args.{a}" for a in SMALL_TRAINING] + [f"{stage}.set.model.max_seq_length=128"]
    overrides.append(f"stage1.set.model.init_from={TINY}")
    argv = ["quickstart", "--output", str(tmp_path / "kalm-v2")] + [x for o in overrides for x in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "zero_shot" in out and "trained" in out and "STSBenchmark" in out

    work = tmp_path / "work"
    for step in ("zero_shot", "trained"):
        scores = json.loads((work / step / "scores.json").read_text())
        assert set(scores) == {"STSBenchmark"} and all(map(math.isfinite, scores.values()))
    # Stage-3 rows: MiniLM's embeddings of the anchor, the positive and the 2 mined / labelled negatives of every task.
    teacher = pq.read_table(work / "teacher" / "data.parquet").to_pydict()
    assert set(teacher["task"]) == {"STSBenchmark", "TrecQARetrieval", "Banking77Classification"}
    assert all(len(label) == 4 and all(len(v) == 384 for v in label) for label in teacher["label"])
    assert "negative_3" not in teacher
    negatives = zip(teacher["negative_1"], teacher["negative_2"], strict=True)
    assert all(p not in negs for p, negs in zip(teacher["positive"], negatives, strict=True))

    # The soup is what kalm-v2/ holds, and plain sentence-transformers loads it, bidirectional.
    model = SentenceTransformer(str(tmp_path / "kalm-v2"), device="cpu")
    assert model[0].auto_model.config.is_causal is False
    assert model.encode(["hello world"]).shape == (1, 64)


def test_quickstart_outside_a_clone_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart"]) == 2
    assert "runs from the root of a kalm-st clone" in capsys.readouterr().err
