"""Overhead of kalm-st's losses, side by side in one run (CPU or GPU).

1. Step time (forward + backward, no optimizer) of FocalInfoNCE, + HardNegativeMixing and ContrastiveDistillation
   relative to sentence-transformers' MultipleNegativesRankingLoss, on the same model and batch, interleaved
   round-robin so machine load hits every loss alike. Goal: <= 1.05x.
2. Peak memory of one CachedFocalInfoNCE step at batch 16 vs 1024 (each in a fresh subprocess; peak RSS sampled by a thread on CPU,
   ``torch.cuda.max_memory_allocated`` on GPU), with the uncached loss as a contrast. Goal: flat.

Usage (offline; writes JSON to stdout and, with --output, to a file):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/loss_overhead.py --output /tmp/loss_overhead.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(os.environ.get("KALM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def build(size: str, max_len: int, device: str):
    """``small``: a 4-layer, 256-d bidirectional Qwen2 with a 2,048-token byte-level BPE trained on TrecQA (CPU-sized);
    ``qwen2-0.5b``: the real Qwen2-0.5B shape with the real Qwen2 tokenizer, randomly initialised (GPU-sized)."""
    from kalm_st import build_model
    from kalm_st.testing import qwen_tokenizer_dir, tiny_qwen_config, train_tiny_tokenizer

    if size == "small":
        texts = [text for column in trecqa_columns(2000, 1) for text in column]
        tokenizer = train_tiny_tokenizer(texts, vocab_size=2000)
        config = tiny_qwen_config(
            vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
        )
    elif size == "qwen2-0.5b":
        tokenizer = qwen_tokenizer_dir()
        config = tiny_qwen_config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1e6,
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(size)
    model = build_model(config, tokenizer=tokenizer, dtype="float32", device=device, max_seq_length=max_len)
    model.train()
    return model


def trecqa_columns(num_rows: int, num_negatives: int) -> list[list[str]]:
    """(question, correct answer, wrong answers...) rows from TrecQA train, cycled to ``num_rows``."""
    groups: dict[str, dict[str, list[str]]] = {}
    with open(DATA / "trecqa" / "train.csv", newline="", encoding="utf8") as handle:
        for row in csv.DictReader(handle):
            entry = groups.setdefault(row["qtext"], {"pos": [], "neg": []})
            entry["pos" if row["label"] == "1" else "neg"].append(row["atext"])
    rows = [
        [q, g["pos"][0], *g["neg"][:num_negatives]]
        for q, g in groups.items()
        if g["pos"] and len(g["neg"]) >= num_negatives
    ]
    rows = [rows[i % len(rows)] for i in range(num_rows)]
    return [list(column) for column in zip(*rows, strict=True)]


def make_loss(name: str, model, mini_batch_size: int = 32):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from kalm_st.losses import CachedFocalInfoNCE, ContrastiveDistillation, FocalInfoNCE, HardNegativeMixing

    if name == "MultipleNegativesRankingLoss":
        return MultipleNegativesRankingLoss(model, scale=100.0)
    if name == "FocalInfoNCE":
        return FocalInfoNCE(model, temperature=0.01, gamma=0.5)
    if name == "FocalInfoNCE+mixing":
        return FocalInfoNCE(model, temperature=0.01, gamma=0.5, hard_negative_mixing=HardNegativeMixing())
    if name == "ContrastiveDistillation":
        return ContrastiveDistillation(model, FocalInfoNCE(model, temperature=0.01, gamma=0.5), alpha=1.0)
    if name == "ContrastiveDistillation+mixing":
        base = FocalInfoNCE(model, temperature=0.01, gamma=0.5, hard_negative_mixing=HardNegativeMixing())
        return ContrastiveDistillation(model, base, alpha=1.0)
    if name == "CachedFocalInfoNCE":
        return CachedFocalInfoNCE(model, mini_batch_size=mini_batch_size, temperature=0.01, gamma=0.5)
    raise ValueError(name)


def step_times(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    model = build(args.size, args.max_len, args.device)
    columns = trecqa_columns(args.batch_size, args.num_negatives)
    features = [model.preprocess(texts) for texts in columns]
    features = [{k: v.to(args.device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
    labels = torch.rand(args.batch_size, 1 + args.num_negatives, device=args.device)  # teacher scores (timing only)
    names = [
        "MultipleNegativesRankingLoss",
        "FocalInfoNCE",
        "FocalInfoNCE+mixing",
        "ContrastiveDistillation",
        "ContrastiveDistillation+mixing",
    ]
    losses = {name: make_loss(name, model) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}

    def step(name: str) -> float:
        model.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses[name]([dict(f) for f in features], labels).backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in names:  # warm-up
        step(name)
    for _ in range(args.repeats):
        for name in names:  # round-robin: machine-load drift hits every loss alike
            times[name].append(step(name))
    base = statistics.median(times[names[0]])
    loss_only = loss_only_times(losses, model, args, labels)
    return {
        "loss_only_ms": loss_only,
        "loss_only_share_of_mnrl_step": {n: t / 1000 / base for n, t in loss_only.items()},
        "batch_size": args.batch_size,
        "columns": 2 + args.num_negatives,
        "max_len": args.max_len,
        "repeats": args.repeats,
        "median_step_s": {n: statistics.median(t) for n, t in times.items()},
        "ratio_vs_mnrl": {n: statistics.median(t) / base for n, t in times.items()},
        "ratio_of_sums_vs_mnrl": {n: sum(t) / sum(times[names[0]]) for n, t in times.items()},
    }


class RssSampler:
    """Peak resident set size of this process, sampled every 2 ms from /proc/self/statm by a thread (CPU runs)."""

    def __init__(self) -> None:
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.002)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.current())


def loss_only_times(losses: dict, model, args: argparse.Namespace, labels, repeats: int = 30) -> dict[str, float]:
    """Median ms of ``compute_loss_from_embeddings`` + backward to the embeddings alone (no model), per loss."""
    import torch

    dim = model.get_embedding_dimension()
    columns = 2 + args.num_negatives
    out = {}
    for name, loss in losses.items():
        samples = []
        for _ in range(repeats + 3):
            embeddings = [
                torch.randn(args.batch_size, dim, device=args.device, requires_grad=True) for _ in range(columns)
            ]
            start = time.perf_counter()
            loss.compute_loss_from_embeddings(embeddings, labels).backward()
            samples.append(time.perf_counter() - start)
        out[name] = statistics.median(samples[3:]) * 1000
    return out


def memory_child(args: argparse.Namespace) -> None:
    """One loss step at one batch size; prints the peak memory of the step (above the pre-step level) as JSON."""
    import torch

    torch.manual_seed(0)
    model = build(args.size, args.max_len, args.device)
    columns = trecqa_columns(args.batch_size, args.num_negatives)
    features = [model.preprocess(texts) for texts in columns]
    features = [{k: v.to(args.device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
    loss = make_loss(args.loss, model, mini_batch_size=args.mini_batch_size)
    cuda = args.device.startswith("cuda")
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        sampler = RssSampler()
        before = sampler.current()
        sampler.start()
    start = time.perf_counter()
    loss(features, None).backward()
    seconds = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = sampler.stop()
    print(json.dumps({"peak_above_start_mib": (peak - before) / 2**20, "step_s": seconds}))


def memory(args: argparse.Namespace) -> list[dict]:
    results = []
    plan = [("CachedFocalInfoNCE", bs) for bs in args.memory_batch_sizes] + [
        ("FocalInfoNCE", bs) for bs in args.uncached_batch_sizes
    ]
    for loss, batch_size in plan:
        command = [
            sys.executable, __file__, "--memory-child", "--loss", loss, "--batch-size", str(batch_size),
            "--num-negatives", "1", "--max-len", str(args.max_len), "--size", args.size, "--device", args.device,
            "--mini-batch-size", str(args.mini_batch_size), "--threads", str(args.threads),
        ]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({"loss": loss, "batch_size": batch_size, "mini_batch_size": args.mini_batch_size, **record})
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["small", "qwen2-0.5b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-negatives", type=int, default=7)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--memory-batch-sizes", type=int, nargs="*", default=[16, 1024])
    parser.add_argument("--uncached-batch-sizes", type=int, nargs="*", default=[16, 128])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="CachedFocalInfoNCE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "model": args.size,
        "torch": torch.__version__,
        "step_time": step_times(args),
    }
    print(json.dumps(report["step_time"], indent=1), file=sys.stderr)
    if not args.skip_memory:
        report["cached_memory"] = memory(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf8")


# ----------------------------------------------------------------------------------------------------------------------
# GPU case (benchmarks/gpu_check.py): the cached loss's memory at the paper's batch on the real model shape
# ----------------------------------------------------------------------------------------------------------------------


def gpu_case(ctx) -> dict:
    """``CachedFocalInfoNCE`` at batch 1024 (mini-batch 64) against ``FocalInfoNCE`` at 48 (anchor 64 tokens, positive
    512), sdpa: peak memory and step time (the CPU smoke: 32 / 8 against 8, 16 and 32 tokens)."""
    from gpu_lib import long_texts, text_lengths

    cached, mini, uncached, anchor_len, positive_len, warmup, steps = ctx.pick(
        (1024, 64, 48, 64, 512, 1, 2), (32, 8, 8, 16, 32, 0, 1)
    )
    model = ctx.load("sdpa", positive_len)
    model.train()

    def run(loss: str, batch: int, mini_batch: int | None) -> dict:
        model.max_seq_length = anchor_len
        anchors = ctx.features(model, long_texts(batch, anchor_len, offset=1))
        model.max_seq_length = positive_len
        positives = ctx.features(model, long_texts(batch, positive_len, offset=2))
        module = make_loss(loss, model, mini_batch_size=mini_batch or 1)
        values: list[float] = []

        def step() -> None:
            model.zero_grad(set_to_none=True)
            value = module([dict(anchors), dict(positives)], None)
            value.backward()
            values.append(float(value.detach()))

        _, timing = ctx.median_times(step, warmup, steps)
        model.zero_grad(set_to_none=True)
        tokens = sum(text_lengths(anchors)) + sum(text_lengths(positives))
        return {"tokens_per_step": tokens, "loss_values": values, **timing}

    plan = [
        {"loss": "FocalInfoNCE", "batch": uncached, "mini_batch": None},
        {"loss": "CachedFocalInfoNCE", "batch": cached, "mini_batch": mini},
    ]
    return {
        "notes": [f"sdpa, {ctx.dtype}, anchor {anchor_len} / positive {positive_len} tokens, in-batch negatives"],
        "runs": ctx.each(plan, run),
    }


if __name__ == "__main__":
    main()
