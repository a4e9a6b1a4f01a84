"""2-process torchrun (gloo, CPU) with gather_across_devices=True equals one process on the concatenated batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.losses._ddp_worker import columns_for, make_losses
from tests.losses._helpers import assert_same_loss_and_grads, featurize

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gather_equals_one_process(tiny_model, tiny_qwen_dir, tmp_path) -> None:
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(REPO_ROOT / "tests" / "losses" / "_ddp_worker.py"),
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
