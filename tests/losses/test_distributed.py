"""2-process torchrun (gloo, CPU) with gather_across_devices=True equals one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.losses._ddp_worker import columns_for, make_losses
from tests.losses._helpers import assert_same_loss_and_grads, featurize
from tests.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_two_process_gather_equals_one_process(tiny_model, tiny_qwen_dir, tmp_path) -> None:
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(REPO_ROOT / "tests" / "losses" / "_ddp_worker.py"),
        str(tiny_qwen_dir), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(out)
    for name, loss in make_losses(tiny_model, gather=False).items():
        tiny_model.zero_grad()
        value = loss(featurize(tiny_model, columns_for(name)), None)
        value.backward()
        grads = {n: p.grad for n, p in tiny_model.named_parameters()}
        assert_same_loss_and_grads(
            (distributed[name]["loss"], distributed[name]["grads"]), (value.item(), grads), name
        )
        if "masked" in distributed[name]:  # the same candidates are masked (3 of them duplicates, 1 across ranks)
            inner = getattr(loss, "loss", loss)
            assert distributed[name]["masked"] == int(inner.last_false_negative_count) >= 3, name


def test_two_processes_keep_one_projection(tmp_path) -> None:
    """EmbeddingDistillation under torchrun: the ranks start from rank 0's projection, see different rows, average
    their projection gradients (the mean of the two local ones) and end with identical projections."""
    import json
    import random

    from tests.recipe.conftest import CONFIG_DIR, write_rows

    rows = write_rows(tmp_path / "rows.jsonl", num_rows=32, num_negatives=3, with_label=False)
    rng = random.Random(0)
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    with (tmp_path / "STSBenchmark.jsonl").open("w") as handle:
        for record in records:  # teacher embeddings (2 + 3, 24): any fixed vectors serve
            record["label"] = [[rng.gauss(0, 1) for _ in range(24)] for _ in range(5)]
            handle.write(json.dumps(record) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    overrides = [
        f"output_dir={out}",
        f"data.tasks.STSBenchmark.path={tmp_path / 'STSBenchmark.jsonl'}",
        "loss.name=embedding_distillation",
        "loss.kwargs={teacher_dim: 24, weight: 1.0}",
        "loss.base={name: focal_infonce, kwargs: {temperature: 0.05}}",
        "matryoshka.enabled=false",
        "args.max_steps=3",
        "args.per_device_train_batch_size=4",
        "args.learning_rate=1.0e-2",
        "args.save_strategy=no",
        "args.ddp_backend=gloo",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(REPO_ROOT / "tests" / "losses" / "_ddp_projection_worker.py"),
        str(CONFIG_DIR / "tiny_smoke.yaml"), str(out), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert rank0["refused_without_sync"] and rank1["refused_without_sync"]
    assert not torch.equal(rank0["init"][0], rank1["init"][0])  # the ranks started apart ...
    assert len(rank0["local_grads"]) == 3
    for step in range(3):
        local0, local1 = rank0["local_grads"][step], rank1["local_grads"][step]
        assert not torch.allclose(local0[0], local1[0])  # ... and saw other rows
        synced = zip(local0, local1, rank0["synced_grads"][step], rank1["synced_grads"][step], strict=True)
        for a, b, synced0, synced1 in synced:
            torch.testing.assert_close(synced0, (a + b) / 2, rtol=1e-6, atol=1e-9)  # DDP's mean
            assert torch.equal(synced0, synced1)
    for final0, final1, init0 in zip(rank0["final"], rank1["final"], rank0["init"], strict=True):
        assert torch.equal(final0, final1)  # one projection on both ranks
        assert not torch.equal(final0, init0)  # and it trained
