"""What the GPU cases of the benchmarks share: the machine (device, dtype, smoke or not), one randomly initialised
checkpoint, real input texts, timing, peak memory, the FLOP count and the per-configuration bookkeeping.

A GPU case is a function ``gpu_case(ctx: GpuContext) -> dict`` in the benchmark module it checks (e.g.
``benchmarks/encode_speed.py``); ``benchmarks/gpu_check.py`` lists and runs them. It returns JSON-ready numbers:
``{"notes": [...], "runs": [{...}, ...], "goals": {...}}`` (each key optional); ``runs`` become a table in the report,
``goals`` (True / False / None: not decided) its goals section.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("sdpa", "flash_attention_2")

QWEN2_0_5B_SHAPE: dict[str, Any] = dict(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32_768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
"""Qwen/Qwen2-0.5B's architecture (494.0 M parameters with the tied embedding), randomly initialised here."""

# Dense (no structured sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s, matched in order as
# substrings of torch.cuda.get_device_name(): the specific variants (PCIe, NVL) come before the family name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.4),
    ("H100", 989.4),  # SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # SXM
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str | None]:
    """``(TFLOP/s, matched table key)`` of a device name, or ``(None, None)`` when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops, key
    return None, None


def flop_count(config: Any, lengths: list[int]) -> dict[str, int]:
    """Model FLOPs of one forward + backward over texts of ``lengths`` tokens (the MFU convention of PaLM, Chowdhery
    et al. 2022, appendix B): ``3 * (2*N*T + 4*L*H*sum_i s_i^2)``, ``N = L * (2*d*H + 2*d*H_kv + 3*d*F)`` matmul
    weights (embeddings are a lookup, an embedder has no LM head), ``H`` = heads x head_dim, the attention term over
    the full ``s x s`` scores (bidirectional: no causal halving). Activation checkpointing re-runs the forward:
    hardware FLOPs are then ``4 *`` the forward. Elementwise work (norms, RoPE, softmax, SiLU) is not counted."""
    d = config.hidden_size
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    h = config.num_attention_heads * head_dim
    h_kv = config.num_key_value_heads * head_dim
    matmul_params = layers * (2 * d * h + 2 * d * h_kv + 3 * d * config.intermediate_size)
    tokens = sum(lengths)
    dense_forward = 2 * matmul_params * tokens
    attention_forward = 4 * layers * h * sum(s * s for s in lengths)
    forward = dense_forward + attention_forward
    return {
        "matmul_params": matmul_params,
        "tokens": tokens,
        "dense_forward": dense_forward,
        "attention_forward": attention_forward,
        "model_flops": 3 * forward,
        "hardware_flops_with_checkpointing": 4 * forward,
    }


class BudgetExceeded(Exception):
    """A case ran past the time it was given."""


def error_record(error: BaseException) -> dict[str, Any]:
    tail = "\n".join(traceback.format_exc().strip().splitlines()[-25:])
    return {"status": "error", "error": f"{type(error).__name__}: {error}", "traceback": tail}


class MemoryMeter:
    """Peak memory inside a ``with`` block: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's
    resident set sampled every millisecond by a thread (coarse; CPU numbers are for the smoke only)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> MemoryMeter:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.result = {
            "peak_mib": round(peak / 2**20, 1),
            "start_mib": round(self._start / 2**20, 1),
            "peak_above_start_mib": round((peak - self._start) / 2**20, 1),
        }


def trecqa_answers(limit: int = 2000) -> list[str]:
    with open(REPO / "data" / "trecqa" / "train.csv", newline="", encoding="utf8") as handle:
        return [row["atext"] for row in itertools.islice(csv.DictReader(handle), limit)]


def stsb_sentences(count: int) -> list[str]:
    with open(REPO / "data" / "stsb" / "test.csv", newline="", encoding="utf8") as handle:
        pool = [text for row in csv.reader(handle) for text in row[:2]]
    return [pool[i % len(pool)] for i in range(count)]


def long_texts(count: int, tokens: int, offset: int = 0) -> list[str]:
    """``count`` distinct real texts (TrecQA answers run together), each long enough to be cut at ``tokens``."""
    answers = trecqa_answers()
    texts = []
    for i in range(count):
        parts, j = [], (offset + 37 * i) % len(answers)
        while sum(len(p) for p in parts) < 8 * tokens:  # >= 8 characters a token: always past the cut
            parts.append(answers[j])
            j = (j + 1) % len(answers)
        texts.append(" ".join(parts))
    return texts


def text_lengths(features: dict[str, Any]) -> list[int]:
    if "cu_seq_lens_q" in features:
        cu = features["cu_seq_lens_q"].tolist()
        return [end - begin for begin, end in zip(cu[:-1], cu[1:], strict=True)]
    return [int(n) for n in features["attention_mask"].sum(-1).tolist()]


def input_path(features: dict[str, Any]) -> str:
    return "unpadded (cu_seq_lens)" if "cu_seq_lens_q" in features else "padded"


class GpuContext:
    """One run of the GPU check: the device and dtype, the smoke flag, the time a case has, and the one randomly
    initialised checkpoint (the Qwen2-0.5B shape with the real tokenizer on a GPU, the tiny test config on CPU)."""

    def __init__(self, smoke: bool, peak_tflops: float | None = None) -> None:
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        # float32 on CPU: bf16 matmuls are ~100x slower on AVX2-only CPUs (ENVIRONMENT.md) and round per ISA.
        self.dtype = "float32" if smoke else "bfloat16"
        self.peak_override = peak_tflops
        self.deadline = float("inf")
        self.min_config_s = 0.5 if smoke else 15.0  # a configuration is not started with less than this left
        self._scratch = tempfile.TemporaryDirectory(prefix="kalm-gpu-check-")
        self._checkpoint: Path | None = None

    def pick(self, gpu: Any, smoke: Any) -> Any:
        """A case's size: ``gpu`` on the GPU, ``smoke`` in the CPU smoke."""
        return smoke if self.smoke else gpu

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def config(self) -> Any:
        from kalm_st import testing

        return testing.tiny_qwen_config(**self.pick(QWEN2_0_5B_SHAPE, {}))

    def fa2_missing(self) -> str | None:
        if self.smoke:
            return "flash-attention-2 needs a CUDA device"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed"
        return None

    def checkpoint(self) -> Path:
        """Build (once) and save the randomly initialised model that every case loads."""
        if self._checkpoint is None:
            from kalm_st import build_model, testing

            if self.smoke:
                tokenizer: Any = testing.train_tiny_tokenizer(trecqa_answers(200), vocab_size=500)
            else:
                tokenizer = testing.qwen_tokenizer_dir()
            folder = Path(self._scratch.name) / "model"
            build_model(self.config(), tokenizer=tokenizer, dtype=self.dtype, device="cpu", seed=0).save(str(folder))
            gc.collect()
            self._checkpoint = folder
        return self._checkpoint

    def load(self, backend: str, max_seq_length: int) -> Any:
        from kalm_st import load_model

        model = load_model(
            self.checkpoint(),
            device=self.device,
            model_kwargs={"dtype": self.torch_dtype(), "attn_implementation": backend},
        )
        model.max_seq_length = max_seq_length
        return model

    def features(self, model: Any, texts: list[str]) -> dict[str, Any]:
        import torch
        from sentence_transformers.util import batch_to_device

        return batch_to_device(model.preprocess(texts), torch.device(self.device))

    def synchronize(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> float:
        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start

    def median_times(self, step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], dict[str, Any]]:
        """``warmup`` untimed calls, then ``steps`` timed ones under a :class:`MemoryMeter`: (times, memory)."""
        for _ in range(warmup):
            step()
        with MemoryMeter(self.device) as meter:
            times = [self.timed(step) for _ in range(steps)]
        return times, {"step_s_median": statistics.median(times), "step_s_all": times, "memory": meter.result}

    def free_memory(self) -> None:
        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def each(self, configs: Iterable[dict[str, Any]], run: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
        """``run(**config)`` per configuration, each record the config plus its result: skipped (flash-attention-2
        without flash_attn, or too little time left), or an error recorded with its traceback, the rest still run."""
        records = []
        for config in configs:
            record: dict[str, Any] = dict(config)
            missing = self.fa2_missing() if config.get("backend") == "flash_attention_2" else None
            if missing:
                record.update(status="skipped", reason=missing)
            elif self.deadline - time.perf_counter() < self.min_config_s:
                record.update(status="skipped", reason="time budget")
            else:
                try:
                    record.update({"status": "ok", **run(**config)})
                except BudgetExceeded:
                    raise
                except Exception as error:  # noqa: BLE001 - recorded; the other configurations still run
                    record.update(error_record(error))
                self.free_memory()
            records.append(record)
        return records

    def close(self) -> None:
        self._scratch.cleanup()


def attention_tests_case(ctx: GpuContext) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu`` in a subprocess (the attention back-ends against fp32 eager, bidirectionality with a
    causal control, padding and cross-text isolation): outcomes and the numbers each test records."""
    junit = Path(ctx._scratch.name) / "gpu_tests.junit.xml"
    knobs = {"KALM_GPU_TEST_DEVICE": ctx.device, "KALM_GPU_TEST_DTYPE": ctx.dtype,
             "KALM_GPU_TEST_SIZE": ctx.pick("gpu", "tiny")}  # fmt: skip
    env = {
        **os.environ,
        **knobs,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
               "-o", "junit_family=xunit1", f"--junitxml={junit}"]  # fmt: skip
    try:
        timeout = max(1.0, ctx.deadline - time.perf_counter() - 2)
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise BudgetExceeded(f"pytest ran past {error.timeout:.0f} s") from error
    runs = []
    for case in ET.parse(junit).getroot().iter("testcase") if junit.exists() else ():
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = ("skipped" if tag == "skipped" else "failed"), node.get("message")
                break
        numbers = {p.get("name"): float(p.get("value")) for p in case.iter("property")}
        runs.append({"test": case.get("name"), "status": outcome, "reason": message, **numbers})

    def all_passed(prefix: str) -> bool | None:
        ran = [r for r in runs if r["test"].startswith(prefix) and r["status"] != "skipped"]
        return all(r["status"] == "passed" for r in ran) if ran else None

    return {
        "notes": [f"`pytest -m gpu tests/gpu` with {knobs}: exit code {done.returncode}"]
        + ([] if done.returncode == 0 else ["```", "\n".join((done.stdout + done.stderr).splitlines()[-40:]), "```"]),
        "exit_code": done.returncode,
        "runs": runs,
        "goals": {
            "flash_attention_2_equals_sdpa": all_passed("test_flash_attention_2_matches_sdpa"),
            "bidirectional_every_backend": all_passed("test_bidirectional_with_causal_control"),
            "matches_fp32_eager_every_backend": all_passed("test_embeddings_match_fp32_eager"),
        },
    }
