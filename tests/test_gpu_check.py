"""``benchmarks/gpu_check.py``: the CPU smoke runs every part and writes a sane report; the FLOP count by hand."""

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
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(gpu_check: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The report of one ``--cpu-smoke`` run, read back from the JSON file it wrote."""
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.perf_counter()
    gpu_check.main(["--cpu-smoke", "--output-dir", str(out)])
    wall = time.perf_counter() - start
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf8"))
    report["_test_wall_s"] = wall
    return report, out


def _runs(report: dict[str, Any], part: str) -> list[dict[str, Any]]:
    return report["parts"][part]["result"]["runs"]


def test_smoke_writes_both_reports_with_every_part_ok(smoke) -> None:
    report, out = smoke
    assert report["schema"] == 1 and report["mode"] == "cpu-smoke"
    assert list(report["parts"]) == ["tests", "train", "loss", "encode"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        assert 0 < part["seconds"] <= part["limit_s"]
    assert report["elapsed_s"] < report["budget_s"]
    assert report["_test_wall_s"] < 120  # the ceiling for the smoke
    packages = report["environment"]["packages"]
    assert packages["torch"] == torch.__version__ and packages["flash-attn"] is None
    text = (out / "gpu_check.md").read_text(encoding="utf8")
    for heading in ("## 1. Attention back-ends", "## 2. Training throughput", "## 3. Cached loss", "## 4. Encode"):
        assert heading in text
    assert "6*N*T = 5.662e+07" in text  # 3 * 18,874,368 written out


def test_smoke_runs_the_gpu_tests_with_a_working_causal_control(smoke) -> None:
    result = smoke[0]["parts"]["tests"]["result"]
    assert result["exit_code"] == 0 and result["all_passed"]
    cases = {case["test"]: case for case in result["cases"]}
    ran = [name for name, case in cases.items() if case["outcome"] == "passed"]
    assert sorted(ran) == sorted(
        [
            "test_embeddings_match_fp32_eager[eager]",
            "test_embeddings_match_fp32_eager[sdpa]",
            "test_padding_control_is_detected",
            "test_bidirectional_with_causal_control[eager]",
            "test_bidirectional_with_causal_control[sdpa]",
        ]
    )
    skipped = [case for case in cases.values() if case["outcome"] == "skipped"]
    assert len(skipped) == 6 and all("flash-attention-2 needs a CUDA device" in c["message"] for c in skipped)
    for backend in ("eager", "sdpa"):
        numbers = cases[f"test_bidirectional_with_causal_control[{backend}]"]["properties"]
        # The probe separates the two: under causal attention the first token does not move at all, under
        # bidirectional attention it moves by a visible fraction of its scale; other texts never leak in.
        assert numbers["causal_first_token_shift"] == 0.0
        assert numbers["bidirectional_first_token_shift"] > 0.05 * numbers["bidirectional_scale"]
        assert numbers["bidirectional_cross_text_shift"] == 0.0 and numbers["causal_cross_text_shift"] == 0.0
        match = cases[f"test_embeddings_match_fp32_eager[{backend}]"]["properties"]
        assert match["min_cosine_vs_fp32_eager"] >= 0.9999 and match["min_cosine_batch_vs_alone"] >= 0.9999
    leaked = cases["test_padding_control_is_detected"]["properties"]["min_cosine_with_padding_attended"]
    assert leaked < 0.99  # attending to padding is far outside the 0.9999 threshold


def test_flop_count_by_hand(gpu_check: ModuleType) -> None:
    from transformers import Qwen2Model

    from kalm_st import testing

    config = testing.tiny_qwen_config()
    flops = gpu_check.flop_count(config, [32] * 4)
    assert flops["matmul_params"] == TINY_MATMUL_PARAMS
    assert flops["model_flops"] == SMOKE_MODEL_FLOPS
    assert flops["hardware_flops_with_checkpointing"] == SMOKE_HARDWARE_FLOPS_CHECKPOINTED
    # Unequal lengths: the attention term is per text, 4*L*H*(10^2 + 30^2) = 512,000; dense 2*N*40 = 5,898,240.
    assert gpu_check.flop_count(config, [10, 30])["model_flops"] == 3 * (5_898_240 + 512_000)

    # N against the weights of the layers' Linear modules of real models (built on the meta device: no memory).
    for cfg in (config, testing.tiny_qwen_config(**gpu_check.QWEN2_0_5B_SHAPE)):
        with torch.device("meta"):
            model = Qwen2Model(cfg)
        linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
        assert gpu_check.flop_count(cfg, [1])["matmul_params"] == linear
    # The Qwen2-0.5B shape has Qwen2-0.5B's published size (mteb's n_parameters for KaLM-V2 mini: 494,032,768).
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert gpu_check.flop_count(cfg, [1])["matmul_params"] == 357_826_560


def test_smoke_train_part_counts_flops_for_its_batch(smoke) -> None:
    result = smoke[0]["parts"]["train"]["result"]
    assert result["batch"] == 4 and result["seq_len"] == 32 and result["peak_bf16_tflops"] is None
    runs = {(r["backend"], r["checkpointing"]): r for r in _runs(smoke[0], "train")}
    assert set(runs) == {("sdpa", False), ("sdpa", True), ("flash_attention_2", False), ("flash_attention_2", True)}
    for checkpointing in (False, True):
        run = runs[("sdpa", checkpointing)]
        assert run["status"] == "ok", run.get("traceback")
        assert run["path"] == "padded" and run["min_max_len"] == [32, 32] and run["tokens_per_step"] == 128
        assert run["model_flops_per_step"] == SMOKE_MODEL_FLOPS
        expected_hardware = SMOKE_HARDWARE_FLOPS_CHECKPOINTED if checkpointing else SMOKE_MODEL_FLOPS
        assert run["hardware_flops_per_step"] == expected_hardware
        assert run["step_s_median"] > 0 and len(run["step_s_all"]) == 2
        assert math.isclose(run["tokens_per_s"] * run["step_s_median"], 128)
        assert math.isclose(run["model_tflops_per_s"], SMOKE_MODEL_FLOPS / run["step_s_median"] / 1e12)
        assert run["mfu"] is None and run["hfu"] is None  # no peak FLOP/s for a CPU
        assert run["memory"]["peak_mib"] >= run["memory"]["start_mib"] > 0
        assert all(math.isfinite(v) for v in run["loss_first_last"])
    # The two runs start from the same weights and batch: checkpointing changes memory and time, not the loss.
    assert runs[("sdpa", True)]["loss_first_last"][0] == pytest.approx(runs[("sdpa", False)]["loss_first_last"][0])
    for checkpointing in (False, True):
        run = runs[("flash_attention_2", checkpointing)]
        assert run["status"] == "skipped" and run["reason"] == "flash-attention-2 needs a CUDA device"


def test_smoke_loss_and_encode_parts(smoke) -> None:
    loss_runs = {r["loss"]: r for r in _runs(smoke[0], "loss")}
    assert (loss_runs["FocalInfoNCE"]["batch"], loss_runs["FocalInfoNCE"]["mini_batch"]) == (8, None)
    assert (loss_runs["CachedFocalInfoNCE"]["batch"], loss_runs["CachedFocalInfoNCE"]["mini_batch"]) == (32, 8)
    for name, batch in (("FocalInfoNCE", 8), ("CachedFocalInfoNCE", 32)):
        run = loss_runs[name]
        assert run["status"] == "ok", run.get("traceback")
        assert run["tokens_per_step"] == batch * (16 + 32)  # anchors cut at 16 tokens, positives at 32
        assert run["step_s_median"] > 0 and all(math.isfinite(v) for v in run["loss_values"])
        assert run["memory"]["peak_mib"] >= run["memory"]["start_mib"] > 0

    runs = {r["backend"]: r for r in _runs(smoke[0], "encode")}
    assert runs["flash_attention_2"]["status"] == "skipped"
    sdpa = runs["sdpa"]
    assert sdpa["status"] == "ok", sdpa.get("traceback")
    assert sdpa["modules"] == {
        "kalm_st": ["BidirectionalDecoder", "MeanPooling", "Normalize"],
        "stock": ["Transformer", "Pooling", "Normalize"],
    }
    assert sdpa["min_cosine_kalm_vs_stock"] >= 0.9999  # the stock stack reads is_causal=False from config.json
    assert all(rate > 0 for rate in sdpa["sentences_per_s"].values())
    assert math.isclose(
        sdpa["ratio_kalm_over_stock"], sdpa["sentences_per_s"]["kalm_st"] / sdpa["sentences_per_s"]["stock"]
    )


def test_peak_table_prefers_the_specific_variant(gpu_check: ModuleType) -> None:
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == (989.4, "H100")
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 NVL") == (835.0, "H100 NVL")
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == (989.4, "H200")
    assert gpu_check.peak_bf16_tflops("NVIDIA L40S") == (362.1, "L40S")
    assert gpu_check.peak_bf16_tflops("NVIDIA L4") == (121.0, "L4")
    assert gpu_check.peak_bf16_tflops("Tesla T4") == (None, None)


def test_a_failing_or_overrunning_part_is_recorded(gpu_check: ModuleType) -> None:
    def broken(limit: float) -> dict:
        raise FileNotFoundError("data/trecqa/train.csv")

    def slow(limit: float) -> dict:
        time.sleep(5)
        return {}

    record = gpu_check.run_part("loss", broken, 10.0)
    assert record["status"] == "error" and record["error"] == "FileNotFoundError: data/trecqa/train.csv"
    assert "raise FileNotFoundError" in record["traceback"]
    start = time.perf_counter()
    record = gpu_check.run_part("train", slow, 0.2)
    assert record["status"] == "timeout" and "train" in record["error"]
    assert time.perf_counter() - start < 2


def test_no_budget_left_skips_every_part_and_still_writes_the_report(gpu_check: ModuleType, tmp_path: Path) -> None:
    gpu_check.main(["--cpu-smoke", "--budget-s", "0", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf8"))
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(
        ("tests", "train", "loss", "encode"), "skipped"
    )
    assert (tmp_path / "gpu_check.md").exists()
