"""``benchmarks/gpu_check.py``: the CPU smoke runs every case and reports what each measured; the FLOP count of
``benchmarks/gpu_lib.py`` against a count by hand and against the weights of real models."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# tiny_qwen_config(): d = 64, L = 2, 4 heads x 16 = H = 64, 2 KV heads x 16 = H_kv = 32, F = 128.
# N = L * (2*d*H + 2*d*H_kv + 3*d*F) = 2 * (8192 + 4096 + 24576) = 73,728 matmul weights.
# The smoke's training batch is 4 texts cut at 32 tokens: T = 128, sum s_i^2 = 4 * 1024 = 4096.
# forward = 2*N*T + 4*L*H*sum s_i^2 = 18,874,368 + 2,097,152 = 20,971,520.
TINY_MATMUL_PARAMS = 73_728
SMOKE_MODEL_FLOPS = 3 * 20_971_520  # 62,914,560
SMOKE_HARDWARE_FLOPS_CHECKPOINTED = 4 * 20_971_520  # 83,886,080


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_benchmark", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path: gpu_lib and the benchmark modules import
    return module


@pytest.fixture(scope="module")
def smoke(gpu_check: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The report of one ``--cpu-smoke`` run, read back from the JSON file it wrote."""
    out = tmp_path_factory.mktemp("gpu-check")
    gpu_check.main(["--cpu-smoke", "--output-dir", str(out)])
    return json.loads((out / "gpu_check.json").read_text(encoding="utf8")), out


def test_smoke_runs_every_listed_case_and_writes_both_reports(gpu_check: ModuleType, smoke) -> None:
    report, out = smoke
    assert list(report["cases"]) == [name for name, _, _ in gpu_check.CASES]
    for name, case in report["cases"].items():
        assert case["status"] == "ok", (name, case.get("error"), case.get("traceback"))
        assert 0 < case["seconds"] <= case["limit_s"]
    assert report["environment"]["packages"]["torch"] == torch.__version__
    text = (out / "gpu_check.md").read_text(encoding="utf8")
    for name in report["cases"]:
        assert f"## {name}" in text
    assert "6*N*T = 5.662e+07" in text  # 3 * 18,874,368 written out


def test_smoke_runs_the_gpu_tests_with_a_working_causal_control(smoke) -> None:
    result = smoke[0]["cases"]["tests"]["result"]
    assert result["exit_code"] == 0
    cases = {run["test"]: run for run in result["runs"]}
    ran = sorted(name for name, case in cases.items() if case["status"] == "passed")
    assert ran == sorted(
        [
            "test_embeddings_match_fp32_eager[eager]",
            "test_embeddings_match_fp32_eager[sdpa]",
            "test_padding_control_is_detected",
            "test_bidirectional_with_causal_control[eager]",
            "test_bidirectional_with_causal_control[sdpa]",
        ]
    )
    skipped = [case for case in cases.values() if case["status"] == "skipped"]
    assert len(skipped) == 6 and all("flash-attention-2 needs a CUDA device" in c["reason"] for c in skipped)
    for backend in ("eager", "sdpa"):
        numbers = cases[f"test_bidirectional_with_causal_control[{backend}]"]
        # The probe separates the two: under causal attention the first token does not move at all, under
        # bidirectional attention it moves by a visible fraction of its scale; other texts never leak in.
        assert numbers["causal_first_token_shift"] == 0.0
        assert numbers["bidirectional_first_token_shift"] > 0.05 * numbers["bidirectional_scale"]
        assert numbers["bidirectional_cross_text_shift"] == 0.0 and numbers["causal_cross_text_shift"] == 0.0
        match = cases[f"test_embeddings_match_fp32_eager[{backend}]"]
        assert match["min_cosine_vs_fp32_eager"] >= 0.9999 and match["min_cosine_batch_vs_alone"] >= 0.9999
    assert cases["test_padding_control_is_detected"]["min_cosine_with_padding_attended"] < 0.99
    goals = smoke[0]["goals"]
    assert goals["bidirectional_every_backend"] is True and goals["flash_attention_2_equals_sdpa"] is None


def test_flop_count_by_hand(gpu_check: ModuleType) -> None:
    from gpu_lib import QWEN2_0_5B_SHAPE, flop_count
    from transformers import Qwen2Model

    from kalm_st import testing

    config = testing.tiny_qwen_config()
    flops = flop_count(config, [32] * 4)
    assert flops["matmul_params"] == TINY_MATMUL_PARAMS
    assert flops["model_flops"] == SMOKE_MODEL_FLOPS
    assert flops["hardware_flops_with_checkpointing"] == SMOKE_HARDWARE_FLOPS_CHECKPOINTED
    # Unequal lengths: the attention term is per text, 4*L*H*(10^2 + 30^2) = 512,000; dense 2*N*40 = 5,898,240.
    assert flop_count(config, [10, 30])["model_flops"] == 3 * (5_898_240 + 512_000)

    # N against the weights of the layers' Linear modules of real models (built on the meta device: no memory).
    for cfg in (config, testing.tiny_qwen_config(**QWEN2_0_5B_SHAPE)):
        with torch.device("meta"):
            model = Qwen2Model(cfg)
        linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
        assert flop_count(cfg, [1])["matmul_params"] == linear
    # The Qwen2-0.5B shape has Qwen2-0.5B's published size (mteb's n_parameters for KaLM-V2 mini: 494,032,768).
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_smoke_train_case_counts_the_flops_of_its_batch(smoke) -> None:
    runs = {(r["backend"], r["checkpointing"]): r for r in smoke[0]["cases"]["train"]["result"]["runs"]}
    for checkpointing in (False, True):
        run = runs[("sdpa", checkpointing)]
        assert run["status"] == "ok", run.get("traceback")
        assert run["path"] == "padded" and run["min_max_len"] == [32, 32] and run["tokens_per_step"] == 128
        assert run["model_flops_per_step"] == SMOKE_MODEL_FLOPS
        expected_hardware = SMOKE_HARDWARE_FLOPS_CHECKPOINTED if checkpointing else SMOKE_MODEL_FLOPS
        assert run["hardware_flops_per_step"] == expected_hardware
        assert run["mfu"] is None  # no peak FLOP/s for a CPU
        assert all(math.isfinite(v) for v in run["loss_first_last"])
    # The two runs start from the same weights and batch: checkpointing changes memory and time, not the loss.
    assert runs[("sdpa", True)]["loss_first_last"][0] == pytest.approx(runs[("sdpa", False)]["loss_first_last"][0])
    for checkpointing in (False, True):
        assert runs[("flash_attention_2", checkpointing)]["reason"] == "flash-attention-2 needs a CUDA device"


def test_smoke_loss_and_encode_cases(smoke) -> None:
    loss_runs = {r["loss"]: r for r in smoke[0]["cases"]["loss"]["result"]["runs"]}
    for name, batch in (("FocalInfoNCE", 8), ("CachedFocalInfoNCE", 32)):
        run = loss_runs[name]
        assert run["status"] == "ok", run.get("traceback")
        assert run["tokens_per_step"] == batch * (16 + 32)  # anchors cut at 16 tokens, positives at 32
        assert all(math.isfinite(v) for v in run["loss_values"])
    runs = {r["backend"]: r for r in smoke[0]["cases"]["encode"]["result"]["runs"]}
    sdpa = runs["sdpa"]
    assert sdpa["status"] == "ok", sdpa.get("traceback")
    assert sdpa["modules"] == {
        "kalm_st": ["BidirectionalDecoder", "MeanPooling", "Normalize"],
        "stock": ["Transformer", "Pooling", "Normalize"],
    }
    assert sdpa["min_cosine_kalm_vs_stock"] >= 0.9999  # the stock stack reads is_causal=False from config.json


def test_a_failing_or_overrunning_case_is_recorded(gpu_check: ModuleType, monkeypatch) -> None:
    from gpu_lib import GpuContext

    def broken(ctx) -> dict:
        raise FileNotFoundError("data/trecqa/train.csv")

    def slow(ctx) -> dict:
        time.sleep(5)
        return {}

    fake = ModuleType("fake_cases")
    fake.broken, fake.slow = broken, slow
    monkeypatch.setitem(sys.modules, "fake_cases", fake)
    ctx = GpuContext(smoke=True)
    record = gpu_check.run_case("loss", "fake_cases:broken", ctx, 10.0)
    assert record["status"] == "error" and record["error"] == "FileNotFoundError: data/trecqa/train.csv"
    assert "raise FileNotFoundError" in record["traceback"]
    start = time.perf_counter()
    record = gpu_check.run_case("train", "fake_cases:slow", ctx, 0.2)
    assert record["status"] == "timeout" and "train" in record["error"]
    assert time.perf_counter() - start < 2
    ctx.close()


def test_no_budget_left_skips_every_case_and_still_writes_the_report(gpu_check: ModuleType, tmp_path: Path) -> None:
    gpu_check.main(["--cpu-smoke", "--budget-s", "0", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf8"))
    assert {name: case["status"] for name, case in report["cases"].items()} == dict.fromkeys(
        (name for name, _, _ in gpu_check.CASES), "skipped"
    )
    assert (tmp_path / "gpu_check.md").exists()
