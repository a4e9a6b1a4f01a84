"""The quickstart pipeline end to end (every stage, curation, soup, before/after evaluation) on a tiny backbone.

The real run (SmolLM2-135M, ~13 minutes with installs) is documented in docs/quickstart.md; this checks the wiring in CI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sentence_transformers import SentenceTransformer

from kalm_st.recipe.quickstart import QuickstartSizes, run_quickstart

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_end_to_end_on_a_tiny_backbone(tmp_path, monkeypatch, tiny_qwen_dir):
    # The quickstart runs from a clone's root; give it the bundled data and configs, keep its outputs in tmp_path.
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "training").symlink_to(REPO / "training")
    monkeypatch.chdir(tmp_path)
    sizes = QuickstartSizes(
        stage1_sts=32, stage1_trecqa=32, curated_sts=16, curated_trecqa_questions=6, banking_classes=4,
        banking_per_class=4, eval_sts_pairs=20, eval_trecqa_questions=4, mine_range=(1, 8), filter_top_k=50,
    )  # fmt: skip
    result = run_quickstart(
        "kalm-v2",
        backbone=str(tiny_qwen_dir),
        sizes=sizes,
        overrides=["args.max_steps=1", "args.per_device_train_batch_size=4"],
    )
    expected_metrics = {"STS-B test Spearman", "TrecQA test MRR@10"}
    assert set(result.before) == set(result.after) == expected_metrics
    assert all(math.isfinite(v) for v in [*result.before.values(), *result.after.values()])
    for stage in (
        "eval_before",
        "stage1_pretrain",
        "curate",
        "stage2_finetune",
        "stage3_distill",
        "soup",
        "eval_after",
    ):
        assert stage in result.timings

    # Stage-3 rows carry teacher scores for the positive and the 3 mined / labelled negatives.
    work = tmp_path / "outputs" / "quickstart" / "data"
    for name in ("sts", "trecqa", "banking77"):
        rows = [json.loads(line) for line in (work / f"stage3_{name}.jsonl").read_text().splitlines()]
        assert rows and all(len(r["label"]) == 4 for r in rows)
        assert all(r["positive"] not in (r["negative_1"], r["negative_2"], r["negative_3"]) for r in rows)

    # The soup is what kalm-v2/ holds, and plain sentence-transformers loads it.
    model = SentenceTransformer(str(tmp_path / "kalm-v2"), device="cpu")
    assert model[0].auto_model.config.is_causal is False
    assert model.encode(["hello world"]).shape == (1, 64)
