"""The GPU check of kalm-st, one prepared command: attention back-ends, training MFU, cached-loss memory, encode speed.

    python benchmarks/gpu_check.py                 # a CUDA machine; about 3 min on one H100/H200, capped at 7 min
    python benchmarks/gpu_check.py --cpu-smoke     # every part on a tiny config on CPU (the default test suite runs it)

It writes ``gpu_check.json`` and ``gpu_check.md`` to ``--output-dir`` (default ``outputs/gpu_check``), rewritten
after every part, so a crash or a kill still leaves the parts done so far. Parts:

1. ``tests``: ``pytest -m gpu tests/gpu`` in a subprocess: eager, sdpa and flash-attention-2 (padded, and
   sentence-transformers' unpadded path) against fp32 eager, bidirectionality with a causal control, padding and
   cross-text isolation. Outcomes and the numbers each test records (``record_property``) go into the report.
2. ``train``: a Qwen2-0.5B-shaped bidirectional embedder (random weights, the real Qwen2 tokenizer), bf16, batch
   48 x 512 tokens: forward + backward (an in-batch InfoNCE over 24 pairs) tokens/s, model FLOP utilisation and
   peak memory, for sdpa and flash-attention-2, with and without activation checkpointing.
3. ``loss``: ``CachedFocalInfoNCE`` at batch 1024 (mini-batch 64) against ``FocalInfoNCE`` at 48 (anchor 64 tokens,
   positive 512): peak memory and step time.
4. ``encode``: sentences/s of ``kalm_st.build_model`` in bf16 against a stock sentence-transformers stack
   (``Transformer`` + ``Pooling(mean)`` + ``Normalize``) on the same saved weights, alternating runs.

Each part, and each configuration inside a part, is wrapped: an exception (CUDA out of memory included) is recorded
with its traceback and the rest still runs. A time budget guards the total (``--budget-s``): every part gets at most
what is left of it, enforced by a timer, and parts that no longer fit are recorded as skipped.

FLOP count (model FLOPs, the MFU convention of PaLM, Chowdhery et al. 2022, appendix B), per step over texts of
``s_i`` tokens, ``T = sum_i s_i``: ``3 * (2 * N * T + 4 * L * H * sum_i s_i^2)`` where ``N`` is the number of matmul
weights of the ``L`` transformer layers (``L * (2*d*H + 2*d*H_kv + 3*d*F)``; embeddings are a lookup and an
embedder has no LM head), ``H`` = heads x head_dim, ``H_kv`` = KV heads x head_dim, ``F`` the FFN width; the
attention term counts ``Q K^T`` and ``A V`` over the full ``s x s`` scores (bidirectional: no causal halving) and
the backward is twice the forward. Activation checkpointing re-runs the forward: hardware FLOPs (HFU) are then
``4 *`` the forward, model FLOPs (MFU) stay ``3 *``. Elementwise work (norms, RoPE, softmax, SiLU) is not counted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
PARTS = ("tests", "train", "loss", "encode")
BACKENDS = ("sdpa", "flash_attention_2")

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


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    device: str
    dtype: str
    model: dict[str, Any]
    real_tokenizer: bool
    train_batch: int
    train_seq: int
    train_warmup: int
    train_steps: int
    loss_cached_batch: int
    loss_mini_batch: int
    loss_uncached_batch: int
    loss_anchor_len: int
    loss_positive_len: int
    loss_warmup: int
    loss_steps: int
    encode_sentences: int
    encode_batch: int
    encode_rounds: int
    tests_env: dict[str, str]
    budget_s: float
    part_caps_s: dict[str, float]
    min_config_s: float  # a configuration is not started with less than this left of its part


GPU = Settings(
    mode="gpu",
    device="cuda",
    dtype="bfloat16",
    model=QWEN2_0_5B_SHAPE,
    real_tokenizer=True,
    train_batch=48,
    train_seq=512,
    train_warmup=2,
    train_steps=5,
    loss_cached_batch=1024,
    loss_mini_batch=64,
    loss_uncached_batch=48,
    loss_anchor_len=64,
    loss_positive_len=512,
    loss_warmup=1,
    loss_steps=2,
    encode_sentences=4096,
    encode_batch=256,
    encode_rounds=3,
    tests_env={"KALM_GPU_TEST_DEVICE": "cuda", "KALM_GPU_TEST_DTYPE": "bfloat16", "KALM_GPU_TEST_SIZE": "gpu"},
    budget_s=420.0,
    part_caps_s={"tests": 120.0, "train": 150.0, "loss": 90.0, "encode": 60.0},
    min_config_s=15.0,
)

# float32 on CPU: bf16 matmuls are ~100x slower on AVX2-only CPUs (ENVIRONMENT.md) and round per instruction set.
SMOKE = Settings(
    mode="cpu-smoke",
    device="cpu",
    dtype="float32",
    model={},  # kalm_st.testing.tiny_qwen_config(): 2 layers, 64-d, GQA 4/2, vocabulary 512
    real_tokenizer=False,
    train_batch=4,
    train_seq=32,
    train_warmup=1,
    train_steps=2,
    loss_cached_batch=32,
    loss_mini_batch=8,
    loss_uncached_batch=8,
    loss_anchor_len=16,
    loss_positive_len=32,
    loss_warmup=0,
    loss_steps=1,
    encode_sentences=32,
    encode_batch=16,
    encode_rounds=1,
    tests_env={"KALM_GPU_TEST_DEVICE": "cpu", "KALM_GPU_TEST_DTYPE": "float32", "KALM_GPU_TEST_SIZE": "tiny"},
    budget_s=120.0,
    part_caps_s={"tests": 90.0, "train": 30.0, "loss": 30.0, "encode": 30.0},
    min_config_s=0.5,
)


# ----------------------------------------------------------------------------------------------------- FLOPs, peaks


def flop_count(config: Any, lengths: list[int]) -> dict[str, int]:
    """Model and hardware FLOPs of one forward + backward over texts of ``lengths`` tokens (module docstring)."""
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


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str | None]:
    """``(TFLOP/s, matched table key)`` of a device name, or ``(None, None)`` when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops, key
    return None, None


# ------------------------------------------------------------------------------------------------ budget, wrapping


class BudgetExceeded(Exception):
    """A part ran past the time it was given."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the main thread after ``seconds`` (no timer outside the main thread)."""
    if seconds <= 0:
        raise BudgetExceeded("no time left")
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"ran past its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, fn: Callable[[float], dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Run ``fn(seconds)`` under a ``seconds`` timer; the record says ok/error/timeout and never raises."""
    start = time.perf_counter()
    record: dict[str, Any] = {"status": "ok", "limit_s": round(seconds, 1), "result": None, "error": None}
    try:
        with time_limit(seconds):
            record["result"] = fn(seconds)
    except BudgetExceeded as error:
        record.update(status="timeout", error=f"{name}: {error}")
    except Exception as error:  # noqa: BLE001 - the point is to record any failure and go on
        record.update(
            status="error", error=f"{type(error).__name__}: {error}", traceback=_tail(traceback.format_exc())
        )
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _config_error(error: Exception) -> dict[str, Any]:
    return {"status": "error", "error": f"{type(error).__name__}: {error}", "traceback": _tail(traceback.format_exc())}


# -------------------------------------------------------------------------------------------------- measurement


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


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
            kind = "torch.cuda.max_memory_allocated"
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
            kind = "process RSS, sampled every 1 ms"
        self.result = {
            "peak_mib": round(peak / 2**20, 1),
            "start_mib": round(self._start / 2**20, 1),
            "peak_above_start_mib": round((peak - self._start) / 2**20, 1),
            "kind": kind,
        }


def timed(fn: Callable[[], Any], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------- inputs


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


# ------------------------------------------------------------------------------------------------------ context


class Context:
    """The settings, the report being written, and the one randomly initialised checkpoint all parts load."""

    def __init__(self, settings: Settings, output_dir: Path, peak_tflops: float | None) -> None:
        self.settings = settings
        self.output_dir = output_dir
        self.peak_override = peak_tflops
        self.started = time.perf_counter()
        self._scratch = tempfile.TemporaryDirectory(prefix="kalm-gpu-check-")
        self._checkpoint: Path | None = None

    def remaining(self) -> float:
        return self.settings.budget_s - (time.perf_counter() - self.started)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.settings.dtype)

    def fa2_missing(self) -> str | None:
        if not self.settings.device.startswith("cuda"):
            return "flash-attention-2 needs a CUDA device"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed"
        return None

    def config(self):
        from kalm_st import testing

        return testing.tiny_qwen_config(**self.settings.model)

    def checkpoint(self) -> Path:
        """Build (once) and save the randomly initialised model that every part loads."""
        if self._checkpoint is None:
            from kalm_st import build_model, testing

            s = self.settings
            config = self.config()
            if s.real_tokenizer:
                tokenizer: Any = testing.qwen_tokenizer_dir()
            else:
                tokenizer = testing.train_tiny_tokenizer(trecqa_answers(200), vocab_size=500)
            folder = Path(self._scratch.name) / "model"
            model = build_model(config, tokenizer=tokenizer, dtype=s.dtype, device="cpu", seed=0)
            model.save(str(folder))
            del model
            gc.collect()
            self._checkpoint = folder
        return self._checkpoint

    def load(self, backend: str, max_seq_length: int):
        from kalm_st import load_model

        model = load_model(
            self.checkpoint(),
            device=self.settings.device,
            model_kwargs={"dtype": self.torch_dtype(), "attn_implementation": backend},
        )
        model.max_seq_length = max_seq_length
        return model

    def features(self, model, texts: list[str]) -> dict[str, Any]:
        import torch
        from sentence_transformers.util import batch_to_device

        return batch_to_device(model.preprocess(texts), torch.device(self.settings.device))

    def close(self) -> None:
        self._scratch.cleanup()


# ------------------------------------------------------------------------------------------------- part 1: tests


def part_tests(ctx: Context, seconds: float) -> dict[str, Any]:
    junit = ctx.output_dir / "gpu_tests.junit.xml"
    command = [
        sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rA", "-p", "no:cacheprovider",
        "-o", "junit_family=xunit1", f"--junitxml={junit}",
    ]  # fmt: skip
    env = {**os.environ, **ctx.settings.tests_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, seconds - 2)
        )
    except subprocess.TimeoutExpired as error:
        raise BudgetExceeded(f"pytest ran past {error.timeout:.0f} s") from error
    cases = parse_junit(junit) if junit.exists() else []
    counts = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("passed", "failed", "skipped")}
    return {
        "command": "pytest -m gpu tests/gpu",
        "env": ctx.settings.tests_env,
        "exit_code": done.returncode,
        "all_passed": done.returncode == 0 and counts["failed"] == 0,
        "counts": counts,
        "cases": cases,
        "output_tail": _tail(done.stdout + done.stderr, 40) if done.returncode not in (0,) else _tail(done.stdout, 3),
    }


def parse_junit(path: Path) -> list[dict[str, Any]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = node.get("message")
                break
        properties = {p.get("name"): float(p.get("value")) for p in case.iter("property")}
        cases.append({"test": case.get("name"), "outcome": outcome, "message": message, "properties": properties})
    return cases


# ------------------------------------------------------------------------------------------------- part 2: train


def pair_info_nce(embeddings):
    """In-batch InfoNCE of the first half (queries) against the second half (documents), temperature 0.05."""
    import torch

    half = embeddings.size(0) // 2
    logits = embeddings[:half] @ embeddings[half : 2 * half].T / 0.05
    return torch.nn.functional.cross_entropy(logits.float(), torch.arange(half, device=logits.device))


def part_train(ctx: Context, seconds: float) -> dict[str, Any]:
    import torch

    s = ctx.settings
    deadline = time.perf_counter() + seconds
    ctx.checkpoint()
    if s.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
        peak, source = peak_bf16_tflops(device_name)
    else:
        device_name, peak, source = "cpu", None, None
    if ctx.peak_override is not None:
        peak, source = ctx.peak_override, "--peak-tflops"
    runs = []
    for backend in BACKENDS:
        for checkpointing in (False, True):
            run: dict[str, Any] = {"backend": backend, "checkpointing": checkpointing}
            missing = ctx.fa2_missing() if backend == "flash_attention_2" else None
            if missing:
                run.update(status="skipped", reason=missing)
            elif deadline - time.perf_counter() < s.min_config_s:
                run.update(status="skipped", reason="time budget")
            else:
                try:
                    run.update(train_run(ctx, backend, checkpointing, peak))
                except BudgetExceeded:
                    raise
                except Exception as error:  # noqa: BLE001
                    run.update(_config_error(error))
                free_memory(s.device)
            runs.append(run)
    config = ctx.config()
    example = flop_count(config, [s.train_seq] * s.train_batch)
    return {
        "device_name": device_name,
        "peak_bf16_tflops": peak,
        "peak_source": source or "device not in the table: pass --peak-tflops for MFU",
        "dtype": s.dtype,
        "batch": s.train_batch,
        "seq_len": s.train_seq,
        "model_shape": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads", "intermediate_size", "vocab_size")},
        "flops_formula": "model FLOPs/step = 3 * (2*N*T + 4*L*H*sum_i s_i^2), N = L*(2*d*H + 2*d*H_kv + 3*d*F); "
        "HFU with checkpointing: 4 * forward",
        "flops_at_full_rows": example,
        "runs": runs,
    }  # fmt: skip


def train_run(ctx: Context, backend: str, checkpointing: bool, peak_tflops: float | None) -> dict[str, Any]:
    s = ctx.settings
    model = ctx.load(backend, s.train_seq)
    model.train()
    if checkpointing:
        backbone = model[0].auto_model
        # transformers >= 5.x renamed gradient_checkpointing_enable (which now warns) to activation_checkpointing_enable
        enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        if not any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules()):
            raise RuntimeError("activation checkpointing did not switch on")
    features = ctx.features(model, long_texts(s.train_batch, s.train_seq))
    lengths = text_lengths(features)
    flops = flop_count(model[0].auto_model.config, lengths)
    losses: list[float] = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = pair_info_nce(model(dict(features))["sentence_embedding"])
        loss.backward()
        losses.append(float(loss.detach()))

    for _ in range(s.train_warmup):
        step()
    model.zero_grad(set_to_none=True)
    with MemoryMeter(s.device) as meter:
        times = [timed(step, s.device) for _ in range(s.train_steps)]
    step_s = statistics.median(times)
    model_flops = flops["model_flops"]
    hardware_flops = flops["hardware_flops_with_checkpointing"] if checkpointing else model_flops
    achieved = model_flops / step_s / 1e12
    result = {
        "status": "ok",
        "path": input_path(features),
        "texts": len(lengths),
        "tokens_per_step": flops["tokens"],
        "min_max_len": [min(lengths), max(lengths)],
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": flops["tokens"] / step_s,
        "model_flops_per_step": model_flops,
        "hardware_flops_per_step": hardware_flops,
        "model_tflops_per_s": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "hfu": hardware_flops / step_s / 1e12 / peak_tflops if peak_tflops else None,
        "memory": meter.result,
        "loss_first_last": [losses[0], losses[-1]],
    }
    return result


# -------------------------------------------------------------------------------------------------- part 3: loss


def part_loss(ctx: Context, seconds: float) -> dict[str, Any]:
    from kalm_st.losses import CachedFocalInfoNCE, FocalInfoNCE

    s = ctx.settings
    deadline = time.perf_counter() + seconds
    model = ctx.load("sdpa", s.loss_positive_len)
    model.train()
    plan = [
        ("FocalInfoNCE", s.loss_uncached_batch, None),
        ("CachedFocalInfoNCE", s.loss_cached_batch, s.loss_mini_batch),
    ]
    runs = []
    for name, batch, mini in plan:
        run: dict[str, Any] = {"loss": name, "batch": batch, "mini_batch": mini}
        if deadline - time.perf_counter() < s.min_config_s:
            run.update(status="skipped", reason="time budget")
            runs.append(run)
            continue
        try:
            if mini is None:
                loss = FocalInfoNCE(model, temperature=0.01, gamma=0.5)
            else:
                loss = CachedFocalInfoNCE(model, mini_batch_size=mini, temperature=0.01, gamma=0.5)
            run.update(loss_run(ctx, model, loss, batch))
        except BudgetExceeded:
            raise
        except Exception as error:  # noqa: BLE001
            run.update(_config_error(error))
        free_memory(s.device)
        runs.append(run)
    del model
    return {
        "backend": "sdpa",
        "dtype": s.dtype,
        "anchor_len": s.loss_anchor_len,
        "positive_len": s.loss_positive_len,
        "columns": "(anchor, positive), in-batch negatives",
        "runs": runs,
    }


def loss_run(ctx: Context, model, loss, batch: int) -> dict[str, Any]:
    s = ctx.settings
    model.max_seq_length = s.loss_anchor_len
    anchors = ctx.features(model, long_texts(batch, s.loss_anchor_len, offset=1))
    model.max_seq_length = s.loss_positive_len
    positives = ctx.features(model, long_texts(batch, s.loss_positive_len, offset=2))
    values: list[float] = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        value = loss([dict(anchors), dict(positives)], None)
        value.backward()
        values.append(float(value.detach()))

    for _ in range(s.loss_warmup):
        step()
    model.zero_grad(set_to_none=True)
    with MemoryMeter(s.device) as meter:
        times = [timed(step, s.device) for _ in range(s.loss_steps)]
    return {
        "status": "ok",
        "tokens_per_step": sum(text_lengths(anchors)) + sum(text_lengths(positives)),
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "memory": meter.result,
        "loss_values": values,
    }


# ------------------------------------------------------------------------------------------------ part 4: encode


def part_encode(ctx: Context, seconds: float) -> dict[str, Any]:
    s = ctx.settings
    deadline = time.perf_counter() + seconds
    ctx.checkpoint()
    sentences = stsb_sentences(s.encode_sentences)
    runs = []
    for backend in BACKENDS:
        run: dict[str, Any] = {"backend": backend}
        missing = ctx.fa2_missing() if backend == "flash_attention_2" else None
        if missing:
            run.update(status="skipped", reason=missing)
        elif deadline - time.perf_counter() < s.min_config_s:
            run.update(status="skipped", reason="time budget")
        else:
            try:
                run.update(encode_run(ctx, backend, sentences))
            except BudgetExceeded:
                raise
            except Exception as error:  # noqa: BLE001
                run.update(_config_error(error))
            free_memory(s.device)
        runs.append(run)
    return {
        "dtype": s.dtype,
        "sentences": len(sentences),
        "batch_size": s.encode_batch,
        "rounds": s.encode_rounds,
        "source": "STS-B test sentences (data/stsb/test.csv), cycled",
        "runs": runs,
    }


def encode_run(ctx: Context, backend: str, sentences: list[str]) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData
    from sentence_transformers.sentence_transformer.modules import Pooling

    from kalm_st import build_model

    s = ctx.settings
    folder = str(ctx.checkpoint())
    kalm = build_model(folder, dtype=s.dtype, attn_implementation=backend, device=s.device, max_seq_length=512)
    transformer = Transformer(
        folder, max_seq_length=512, model_kwargs={"dtype": ctx.torch_dtype(), "attn_implementation": backend}
    )
    stock = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean"), Normalize()],
        device=s.device,
        model_card_data=SentenceTransformerModelCardData(local_files_only=True),
    )
    kalm.eval()
    stock.eval()
    stacks = {"kalm_st": kalm, "stock": stock}

    def encode(model, texts: list[str]):
        return model.encode(texts, batch_size=s.encode_batch, convert_to_tensor=True)

    sample = sentences[: 2 * s.encode_batch]
    with torch.inference_mode():
        same = torch.nn.functional.cosine_similarity(encode(kalm, sample).float(), encode(stock, sample).float())
        rates: dict[str, list[float]] = {name: [] for name in stacks}
        for _ in range(s.encode_rounds):  # alternate, so drift in machine load hits both alike
            for name, model in stacks.items():
                rates[name].append(len(sentences) / timed(lambda m=model: encode(m, sentences), s.device))
    result = {
        "status": "ok",
        "path": input_path(kalm.preprocess(sample[:4])),
        "modules": {name: [type(m).__name__ for m in model] for name, model in stacks.items()},
        "sentences_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "sentences_per_s_all": rates,
        "min_cosine_kalm_vs_stock": float(same.min()),
    }
    result["ratio_kalm_over_stock"] = result["sentences_per_s"]["kalm_st"] / result["sentences_per_s"]["stock"]
    del kalm, stock, stacks
    return result


# ------------------------------------------------------------------------------------------------------- report


def environment(settings: Settings) -> dict[str, Any]:
    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "packages": {
            name: version(name)
            for name in ("torch", "transformers", "sentence-transformers", "flash-attn", "accelerate", "kalm-st")
        },
        "git_commit": _git_commit(),
    }
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": torch.cuda.get_device_name(),
            "count": torch.cuda.device_count(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _driver_version(),
        }
    else:
        env["gpu"] = None
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's GPU goals, read off the parts: True / False, or None when the part did not decide it."""
    parts = report["parts"]
    cases = ((parts.get("tests") or {}).get("result") or {}).get("cases") or []

    def tests_named(prefix: str) -> list[dict[str, Any]]:
        return [c for c in cases if c["test"].startswith(prefix)]

    def all_passed(prefix: str) -> bool | None:
        ran = [c for c in tests_named(prefix) if c["outcome"] != "skipped"]
        return all(c["outcome"] == "passed" for c in ran) if ran else None

    runs = ((parts.get("train") or {}).get("result") or {}).get("runs") or []
    mfus = [r["mfu"] for r in runs if r.get("status") == "ok" and not r["checkpointing"] and r.get("mfu") is not None]
    return {
        "mfu_at_least_40_percent": (max(mfus) >= 0.40) if mfus else None,
        "best_mfu_without_checkpointing": max(mfus) if mfus else None,
        "flash_attention_2_equals_sdpa": all_passed("test_flash_attention_2_matches_sdpa"),
        "bidirectional_every_backend": all_passed("test_bidirectional_with_causal_control"),
        "matches_fp32_eager_every_backend": all_passed("test_embeddings_match_fp32_eager"),
    }


def write_report(report: dict[str, Any], output_dir: Path) -> None:
    from kalm_st.io import write_text_atomic

    output_dir.mkdir(parents=True, exist_ok=True)
    report["goals"] = goals(report)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", markdown(report))):
        write_text_atomic(output_dir / name, text)


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = env.get("gpu") or {}
    lines = [
        f"# kalm-st GPU check ({report['mode']})",
        "",
        f"- command: `{report['command']}`",
        f"- started: {report['started']}; elapsed {_fmt(report.get('elapsed_s'), '.0f')} s of a {report['budget_s']:.0f} s budget",
        f"- device: {gpu.get('name', 'CPU')}"
        + (f" ({gpu['memory_gib']} GiB, capability {gpu['capability']}, CUDA {gpu['cuda']}, driver {gpu['driver']})" if gpu else ""),
        f"- CPU: {env['cpu']} ({env['cpu_capability']}); Python {env['python']}; commit {env['git_commit']}",
        "- packages: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["packages"].items()),
        "",
        "| part | status | seconds | note |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for name in PARTS:
        part = report["parts"].get(name)
        if part is None:
            continue
        note = part.get("error") or part.get("reason") or ""
        lines.append(f"| {name} | {part['status']} | {_fmt(part.get('seconds'), '.1f')} | {note[:120]} |")
    g = report.get("goals") or {}
    lines += [
        "",
        "## Goals",
        "",
        f"- MFU >= 40 % (forward + backward, 48 x 512, no checkpointing): {_fmt(g.get('mfu_at_least_40_percent'))} "
        f"(best {_pct(g.get('best_mfu_without_checkpointing'))})",
        f"- flash-attention-2 equals sdpa: {_fmt(g.get('flash_attention_2_equals_sdpa'))}",
        f"- bidirectional on every back-end (with causal control): {_fmt(g.get('bidirectional_every_backend'))}",
        f"- every back-end matches fp32 eager (cosine >= 0.9999): {_fmt(g.get('matches_fp32_eager_every_backend'))}",
        "",
        "(None: not decided by this run, e.g. flash-attn not installed or no peak FLOP/s for the device.)",
    ]
    lines += _md_tests(report["parts"].get("tests"))
    lines += _md_train(report["parts"].get("train"))
    lines += _md_loss(report["parts"].get("loss"))
    lines += _md_encode(report["parts"].get("encode"))
    return "\n".join(lines) + "\n"


def _result(part: dict[str, Any] | None) -> dict[str, Any] | None:
    return part.get("result") if part else None


def _md_tests(part: dict[str, Any] | None) -> list[str]:
    result = _result(part)
    if not result:
        return []
    lines = [
        "",
        "## 1. Attention back-ends: `pytest -m gpu tests/gpu`",
        "",
        f"exit code {result['exit_code']}; {result['counts']}; env {result['env']}",
        "",
        "| test | outcome | recorded numbers / reason |",
        "|---|---|---|",
    ]
    for case in result["cases"]:
        numbers = ", ".join(f"{k} {v:.6g}" for k, v in case["properties"].items()) or (case["message"] or "")
        lines.append(f"| `{case['test']}` | {case['outcome']} | {numbers[:300]} |")
    if not result["all_passed"]:
        lines += ["", "```", result["output_tail"], "```"]
    return lines


def _md_train(part: dict[str, Any] | None) -> list[str]:
    result = _result(part)
    if not result:
        return []
    full = result["flops_at_full_rows"]
    lines = [
        "",
        f"## 2. Training throughput: {result['batch']} x {result['seq_len']} tokens, {result['dtype']}",
        "",
        f"Model {result['model_shape']}, random weights. Loss: in-batch InfoNCE over {result['batch'] // 2} pairs of "
        "the batch's texts. No optimizer step.",
        "",
        f"FLOPs: {result['flops_formula']}. At full rows: N = {full['matmul_params']:,} matmul weights, T = "
        f"{full['tokens']:,} tokens; 6*N*T = {3 * full['dense_forward']:.4g}, attention term = "
        f"{3 * full['attention_forward']:.4g}, model FLOPs/step = {full['model_flops']:.4g}.",
        f"Peak bf16: {_fmt(result['peak_bf16_tflops'])} TFLOP/s ({result['peak_source']}), device {result['device_name']}.",
        "",
        "| backend | checkpointing | status | input path | step s | tokens/s | model TFLOP/s | MFU | HFU | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for run in result["runs"]:
        if run["status"] != "ok":
            lines.append(
                f"| {run['backend']} | {run['checkpointing']} | {run['status']} | {run.get('reason') or run.get('error', '')[:100]} |  |  |  |  |  |  |"
            )  # fmt: skip
            continue
        lines.append(
            f"| {run['backend']} | {run['checkpointing']} | ok | {run['path']} | {run['step_s_median']:.4g} | "
            f"{run['tokens_per_s']:,.0f} | {run['model_tflops_per_s']:.4g} | {_pct(run['mfu'])} | {_pct(run['hfu'])} | "
            f"{run['memory']['peak_mib']:,.0f} |"
        )
    return lines


def _md_loss(part: dict[str, Any] | None) -> list[str]:
    result = _result(part)
    if not result:
        return []
    lines = [
        "",
        f"## 3. Cached loss memory ({result['backend']}, {result['dtype']}, anchor {result['anchor_len']} / positive "
        f"{result['positive_len']} tokens, {result['columns']})",
        "",
        "| loss | batch | mini-batch | status | step s | peak memory MiB | above weights MiB | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        if run["status"] != "ok":
            note = run.get("reason") or run.get("error", "")[:100]
            lines.append(
                f"| {run['loss']} | {run['batch']} | {run['mini_batch']} | {run['status']}: {note} |  |  |  |  |"
            )
            continue
        mem = run["memory"]
        lines.append(
            f"| {run['loss']} | {run['batch']} | {_fmt(run['mini_batch'])} | ok | {run['step_s_median']:.4g} | "
            f"{mem['peak_mib']:,.0f} | {mem['peak_above_start_mib']:,.0f} | {run['loss_values'][-1]:.4g} |"
        )
    return lines


def _md_encode(part: dict[str, Any] | None) -> list[str]:
    result = _result(part)
    if not result:
        return []
    lines = [
        "",
        f"## 4. Encode throughput ({result['dtype']}, {result['sentences']} sentences, batch {result['batch_size']}, "
        f"median of {result['rounds']} alternating rounds; {result['source']})",
        "",
        "| backend | status | input path | kalm-st sentences/s | stock sentences/s | kalm/stock | min cosine kalm vs stock |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for run in result["runs"]:
        if run["status"] != "ok":
            lines.append(
                f"| {run['backend']} | {run['status']}: {run.get('reason') or run.get('error', '')[:100]} |  |  |  |  |  |"
            )
            continue
        rate = run["sentences_per_s"]
        lines.append(
            f"| {run['backend']} | ok | {run['path']} | {rate['kalm_st']:,.1f} | {rate['stock']:,.1f} | "
            f"{run['ratio_kalm_over_stock']:.3f} | {run['min_cosine_kalm_vs_stock']:.6f} |"
        )
    return lines


# --------------------------------------------------------------------------------------------------------- main


PART_FUNCTIONS: dict[str, Callable[[Context, float], dict[str, Any]]] = {
    "tests": part_tests,
    "train": part_train,
    "loss": part_loss,
    "encode": part_encode,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every part on a tiny config on CPU")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--budget-s", type=float, help="total time budget (default 420 on a GPU, 120 for the smoke)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU when the device is not in the table"
    )
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose from {list(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = SMOKE if args.cpu_smoke else GPU
    if args.budget_s is not None:
        settings = dataclasses.replace(settings, budget_s=args.budget_s)
    import torch

    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --cpu-smoke, or on a GPU machine.")
    ctx = Context(settings, args.output_dir, args.peak_tflops)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "mode": settings.mode,
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_s": settings.budget_s,
        "settings": dataclasses.asdict(settings),
        "environment": environment(settings),
        "parts": {},
    }
    selected = [p for p in PARTS if p in args.parts.split(",")]
    try:
        for name in selected:
            left = ctx.remaining() - 2.0  # keep time to write the report
            if left < settings.min_config_s:
                report["parts"][name] = {"status": "skipped", "reason": "time budget", "seconds": 0.0}
            else:
                seconds = min(settings.part_caps_s[name], left)
                report["parts"][name] = run_part(name, lambda limit, fn=PART_FUNCTIONS[name]: fn(ctx, limit), seconds)
                free_memory(settings.device)
            report["elapsed_s"] = round(time.perf_counter() - ctx.started, 1)
            write_report(report, args.output_dir)
            print(f"{name}: {report['parts'][name]['status']} ({report['parts'][name]['seconds']} s)", file=sys.stderr)
    finally:
        ctx.close()
    report["elapsed_s"] = round(time.perf_counter() - ctx.started, 1)
    write_report(report, args.output_dir)
    print(f"report: {args.output_dir / 'gpu_check.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
