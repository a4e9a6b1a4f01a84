"""Memory per process of DDP vs FSDP2 (``sharding: {strategy: fsdp2}``), side by side in one run, 2 CPU processes.

The same ``kalm-st train`` stage (tiny_smoke.yaml's data and loss, Matryoshka off, 2 steps) trains a randomly
initialised ~0.2B-parameter bidirectional Qwen2 (16 layers, hidden 1024, MLP 2816) under ``torchrun
--nproc_per_node 2`` (gloo), once with DDP and once with FSDP2. Each process reports, at its last optimizer step
(weights, gradients and AdamW state all alive):

- ``state``: the bytes of the parameters, gradients and optimizer state it holds (a sharded tensor counts its local
  shard), exact;
- ``rss`` / ``peak_rss``: its resident memory then, and its peak (``ru_maxrss``), which includes loading the full
  model before sharding and the Python / torch runtime both runs share.

Goal: parameters + gradients + optimizer state per process about halved (2 processes). The last line is the ratio.

Usage (offline, ~2 min on 2 cores, ~8 GB of RAM at the DDP peak):

    python benchmarks/shard_memory.py [--layers 16] [--output shard_memory.json]

:func:`gpu_case` is the one-GPU check (FSDP2 wrapper on a 1-process NCCL group, memory and tokens/s printed), for a
driver that imports per-benchmark GPU cases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "training" / "configs" / "tiny_smoke.yaml"


def write_backbone(folder: Path, layers: int, hidden: int = 1024, intermediate: int = 2816) -> int:
    """A random Qwen2 decoder of ``layers`` layers with the tiny test tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoModel

    from kalm_st import testing

    config = testing.tiny_qwen_config()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, intermediate, layers
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 16, 4, hidden // 16
    if hasattr(config, "layer_types"):
        config.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    testing.train_tiny_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _local_bytes(tensor: Any) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(backbone: str, strategy: str, out: str) -> None:
    """One process of the torchrun launch: train 2 steps, record the memory at the last optimizer step."""
    import torch
    from transformers import TrainerCallback

    from kalm_st.recipe.build import build_stage
    from kalm_st.recipe.config import load_config

    torch.set_num_threads(1)
    record: dict[str, Any] = {}

    class Measure(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
            params = list(run.model.parameters())
            record["params"] = sum(_local_bytes(p) for p in params)
            record["grads"] = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
            optimizer = run.trainer.optimizer
            record["optimizer"] = sum(
                _local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
            )
            record["rss"] = _rss_bytes()

    output_dir = tempfile.mkdtemp(prefix="shard-memory-run-")
    overrides = [
        f"output_dir={output_dir}",
        f"model.init_from={backbone}",
        "model.max_seq_length=32",
        "matryoshka.enabled=false",
        "data.num_negatives=2",
        "args.max_steps=2",
        "args.per_device_train_batch_size=2",
        "args.save_strategy=no",
        "args.ddp_backend=gloo",
        "args.logging_steps=1",
    ]
    if strategy == "fsdp2":
        overrides.append("sharding.strategy=fsdp2")
    run = build_stage(load_config(CONFIG, overrides), callbacks=[Measure()])
    run.trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    record["state"] = record["params"] + record["grads"] + record["optimizer"]
    record["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["rank"] = int(os.environ["RANK"])
    with open(f"{out}.rank{record['rank']}.json", "w") as handle:
        json.dump(record, handle)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(backbone: Path, strategy: str, out: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, "--worker", str(backbone), strategy, str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{strategy} run failed:\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(2)]


def fsdp2_check(
    backbone: str | None = None, *, steps: int = 10, batch_size: int = 16, seq_len: int = 256, device: str = "cuda"
) -> dict[str, float]:
    """FSDP2 on one GPU: the sharded wrapper (one process group of 1) trains ``steps`` focal-InfoNCE steps; prints
    and returns peak memory and tokens/s. ``backbone``: a decoder folder (default: a random ~0.2B Qwen2 written to a
    temporary folder). ``device="cpu"`` runs the same code on gloo (a smoke test without a GPU)."""
    import torch
    import torch.distributed as dist

    from kalm_st import build_model
    from kalm_st.distributed.sharding import shard_model
    from kalm_st.losses import FocalInfoNCE
    from kalm_st.recipe.config import ShardingConfig

    cuda = device == "cuda"
    created = dist.is_initialized()
    if not created:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    try:
        with tempfile.TemporaryDirectory(prefix="shard-gpu-case-") as folder:
            if backbone is None:
                write_backbone(Path(folder), layers=16)
                backbone = folder
            model = build_model(backbone, dtype="float32", device=device, max_seq_length=seq_len)
        shard_model(model, ShardingConfig(strategy="fsdp2", activation_checkpointing=True), cuda=cuda)
        model.train()
        loss = FocalInfoNCE(model, temperature=0.05, gamma=0.5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        words = "the quick brown fox jumps over a lazy dog while it rains in the city".split()
        texts = [" ".join(words[(i + j) % len(words)] for j in range(seq_len)) for i in range(2 * batch_size)]
        features = [model.preprocess(texts[:batch_size]), model.preprocess(texts[batch_size:])]
        features = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in features]
        tokens = sum(int(f["attention_mask"].sum()) for f in features)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timings = []
        for _ in range(steps):
            start = time.perf_counter()
            value = loss([dict(f) for f in features], None)  # the model writes its outputs into the dicts
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
        steady = sorted(timings[1:] or timings)[len(timings[1:] or timings) // 2]  # median, first step excluded
        result = {
            "peak_memory_gib": (torch.cuda.max_memory_allocated() if cuda else _rss_bytes()) / 2**30,
            "tokens_per_second": tokens / steady,
            "loss": float(value.detach()),
        }
        print(
            f"FSDP2 one {device}: {result['peak_memory_gib']:.2f} GiB peak, {result['tokens_per_second']:.0f} tokens/s"
            f" (batch {batch_size} x 2 texts x {seq_len} tokens, loss {result['loss']:.3f})"
        )
        return result
    finally:
        if not created:
            dist.destroy_process_group()


def gpu_case(ctx) -> dict:
    """The GPU check's case for :func:`fsdp2_check`: FSDP2 with activation checkpointing on the check's own
    checkpoint (the Qwen2-0.5B shape on a GPU, the tiny config in the CPU smoke, on gloo)."""
    return fsdp2_check(
        str(ctx.checkpoint()),
        steps=ctx.pick(10, 2),
        batch_size=ctx.pick(16, 2),
        seq_len=ctx.pick(256, 16),
        device=ctx.device,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as folder:
        backbone = Path(folder) / "backbone"
        count = write_backbone(backbone, args.layers)
        print(f"backbone: {count / 1e6:.0f}M parameters ({args.layers} layers), 2 processes, gloo")
        results = {strategy: launch(backbone, strategy, Path(folder) / strategy) for strategy in ("ddp", "fsdp2")}
    gib = 2**30
    print(f"{'run':6} {'rank':>4} {'params':>8} {'grads':>8} {'optim':>8} {'state':>8} {'rss':>8} {'peak':>8}  GiB")
    for strategy, ranks in results.items():
        for r in ranks:
            values = [r[k] / gib for k in ("params", "grads", "optimizer", "state", "rss", "peak_rss")]
            print(f"{strategy:6} {r['rank']:>4} " + " ".join(f"{v:8.2f}" for v in values))
    state_ratio = max(r["state"] for r in results["fsdp2"]) / max(r["state"] for r in results["ddp"])
    peak_ratio = max(r["peak_rss"] for r in results["fsdp2"]) / max(r["peak_rss"] for r in results["ddp"])
    summary = {"parameters": count, "results": results, "state_ratio": state_ratio, "peak_rss_ratio": peak_ratio}
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2))
    print(f"peak RSS per process FSDP2 / DDP: {peak_ratio:.2f}")
    print(f"parameters + gradients + optimizer state per process, FSDP2 / DDP: {state_ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main()
