"""FSDP2 (``sharding: {strategy: fsdp2}``) trains what DDP trains: 2 processes (torchrun, gloo, CPU), tiny Qwen2.

Each loss of kalm-st runs a real ``kalm-st train`` stage twice in one process group, under DDP (the reference: its
equality to one process on the whole batch is pinned by tests/losses/test_distributed.py) and under FSDP2; the logged
losses and the weight updates must agree within the suite's float32 tolerance, and the FSDP2 run's final folder holds
the same weights. The kill-and-resume test runs ``kalm-st train`` under FSDP2, kills it with SIGKILL after a
checkpoint, resumes it and compares with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.losses._helpers import LOSS_ATOL, LOSS_RTOL
from tests.ports import free_port
from tests.recipe.conftest import CONFIG_DIR, write_rows

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _torchrun(script: str, *arguments: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / script), *arguments,
    ]  # fmt: skip
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _teacher_rows(tmp_path: Path) -> Path:
    """Rows with teacher embeddings (anchor, positive, 3 negatives; 24-d): any fixed vectors serve."""
    rows = write_rows(tmp_path / "rows.jsonl", num_rows=32, num_negatives=3, with_label=False)
    rng = random.Random(0)
    path = tmp_path / "teacher.jsonl"
    with path.open("w") as handle:
        for line in rows.read_text().splitlines():
            record = json.loads(line)
            record["label"] = [[rng.gauss(0, 1) for _ in range(24)] for _ in range(5)]
            handle.write(json.dumps(record) + "\n")
    return path


def _with_dropout(model_dir: Path, folder: Path) -> Path:
    """A copy of the tiny decoder with attention dropout 0.1."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_fsdp2_trains_what_ddp_trains(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    common = [
        f"model.init_from={tiny_qwen_dir}",
        "matryoshka.enabled=false",
        "args.max_steps=2",
        "args.per_device_train_batch_size=4",
        "args.learning_rate=1.0e-3",
        "args.save_strategy=no",
        "args.logging_steps=1",
        "args.ddp_backend=gloo",
    ]
    focal = "{temperature: 0.05, gamma: 0.5, gather_across_devices: true"
    mixing = "hard_negative_mixing: {alpha: 2.0, seed: 0}"
    cases = {
        # 2 micro-batches per step: FSDP2 defers its reduce-scatter to the last one, as DDP's no_sync does
        "focal_gather": [f"loss.kwargs={focal}}}", "args.gradient_accumulation_steps=2"],
        # activation checkpointing recomputes each layer in the backward: the same gradients
        "mixing_matryoshka": [
            f"loss.kwargs={focal}, {mixing}}}",
            "matryoshka.enabled=true",
            "fsdp2:sharding.activation_checkpointing=true",
        ],  # fmt: skip
        # attention dropout on: GradCache must replay each mini-batch's dropout masks under the sharded parameters
        "cached_gradcache": [
            f"model.init_from={_with_dropout(tiny_qwen_dir, tmp_path / 'dropout')}",
            "loss.name=cached_focal_infonce",
            f"loss.kwargs={focal}, mini_batch_size: 2, {mixing}}}",
        ],
        "embedding_distillation": [
            f"data.tasks.STSBenchmark.path={_teacher_rows(tmp_path)}",
            "loss.name=embedding_distillation",
            "loss.kwargs={teacher_dim: 24, weight: 1.0}",
            f"loss.base={{name: focal_infonce, kwargs: {focal}}}}}",
        ],
        "lora": [f"loss.kwargs={focal}}}", "model.lora={rank: 4, alpha: 8.0, target_modules: [q_proj, v_proj]}"],
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "config": str(CONFIG_DIR / "tiny_smoke.yaml"),
        "out": str(tmp_path),
        "cases": {name: [*common, *overrides] for name, overrides in cases.items()},
    }))  # fmt: skip
    result = _torchrun("_equivalence_worker.py", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    assert results.keys() == cases.keys()
    for name, runs in results.items():
        ddp, fsdp = runs["ddp"], runs["fsdp2"]
        assert len(ddp["losses"]) == len(fsdp["losses"]) == 2, name
        torch.testing.assert_close(fsdp["losses"], ddp["losses"], rtol=LOSS_RTOL, atol=LOSS_ATOL, msg=name)
        torch.testing.assert_close(fsdp["initial"], ddp["initial"], rtol=0, atol=0)  # the same start
        updates = {run: {k: run_["weights"][k] - run_["initial"][k] for k in run_["initial"]}
                   for run, run_ in (("ddp", ddp), ("fsdp2", fsdp))}  # fmt: skip
        assert max(u.abs().max().item() for u in updates["ddp"].values()) > 1e-4, name  # it trained
        # Adam normalises each entry's step, so a rounding difference in a near-zero gradient (another reduction
        # order) can move that entry's step by a fraction of a full step (observed: <= 5e-5 of the largest); a real
        # difference (a missed gradient reduction, a wrong shard) moves entries by whole steps.
        step = max(u.abs().max().item() for u in updates["ddp"].values())
        for key, update in updates["ddp"].items():
            torch.testing.assert_close(updates["fsdp2"][key], update, rtol=1e-4, atol=1e-3 * step, msg=f"{name} {key}")
        assert len(fsdp["projections"]) == len(ddp["projections"]) == (2 if name == "embedding_distillation" else 0)
        for a, b in zip(fsdp["projections"], ddp["projections"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # the first case's FSDP2 run wrote its final model through the stage's save: the gathered full weights
    from sentence_transformers import SentenceTransformer

    final = SentenceTransformer(str(tmp_path / "focal_gather" / "final"), device="cpu")
    saved = final.state_dict()
    for key, value in results["focal_gather"]["fsdp2"]["weights"].items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)
    # the LoRA run's final folder: the gathered adapters merged, W + alpha/r B A (by hand), no adapter left
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "lora" / "final" / "model.safetensors")
    lora = results["lora"]["fsdp2"]["weights"]
    prefix = "0.model.base_model.model.layers.0.self_attn.q_proj."
    by_hand = (
        lora[prefix + "base_layer.weight"]
        + 2.0 * lora[prefix + "lora_B.default.weight"] @ lora[prefix + "lora_A.default.weight"]
    )
    assert not any("lora" in key for key in merged)
    torch.testing.assert_close(merged["layers.0.self_attn.q_proj.weight"], by_hand, rtol=1e-6, atol=1e-7)


def _start(tmp_path: Path, out: Path, resume: bool, kill_at: int, tiny_qwen_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    overrides = [
        f"output_dir={out}",
        f"model.init_from={tiny_qwen_dir}",
        "args.max_steps=6",
        "args.save_steps=2",
        "args.logging_steps=1",
        "args.per_device_train_batch_size=4",
        "args.learning_rate=1.0e-3",
        "args.ddp_backend=gloo",
        "sharding.strategy=fsdp2",
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / "_resume_worker.py"), str(CONFIG_DIR / "tiny_smoke.yaml"),
        str(int(resume)), str(kill_at), *overrides,
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_fsdp2_kill_and_resume_gives_the_same_weights(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    """tiny_smoke.yaml (focal InfoNCE, hard-negative mixing, Matryoshka) under FSDP2, checkpoints every 2 steps:
    SIGKILL at step 5, resume from checkpoint-4 (model and optimizer shards, scheduler, RNG, mixing state)."""
    from safetensors.torch import load_file

    from kalm_st.recipe.checkpoints import last_complete_checkpoint

    full_process = _start(tmp_path, tmp_path / "full", resume=False, kill_at=0, tiny_qwen_dir=tiny_qwen_dir)
    killed = _finish(_start(tmp_path, tmp_path / "killed", resume=False, kill_at=5, tiny_qwen_dir=tiny_qwen_dir))
    full = _finish(full_process)
    assert full.returncode == 0, full.stderr[-3000:]
    assert killed.returncode != 0  # torchrun reports its children's SIGKILL
    assert "Signal 9 (SIGKILL)" in killed.stderr
    assert not (tmp_path / "killed" / "final").exists()
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "killed") == checkpoint
    assert (checkpoint / "model_shards" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    resumed = _finish(_start(tmp_path, tmp_path / "killed", resume=True, kill_at=0, tiny_qwen_dir=tiny_qwen_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    a, b = (
        load_file(tmp_path / "full" / "final" / "model.safetensors"),
        load_file(tmp_path / "killed" / "final" / "model.safetensors"),
    )
    start = load_file(tiny_qwen_dir / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], start[k]) for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    # the final folder is the portable one: plain sentence-transformers loads it, kalm-st not imported
    check = (
        "import sys; from sentence_transformers import SentenceTransformer; "
        f"m = SentenceTransformer({str(tmp_path / 'full' / 'final')!r}, device='cpu'); "
        "assert m.encode(['a text']).shape == (1, 64); assert 'kalm_st' not in sys.modules"
    )
    loaded = subprocess.run([sys.executable, "-c", check], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
