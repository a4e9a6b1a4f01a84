"""A SIGKILLed run resumed from its checkpoint ends with the same student and projection as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

_WORKER = r"""
import os, signal, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from datasets import Dataset
from transformers import TrainerCallback
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from kalm_st import testing
from kalm_st.losses import EmbeddingDistillation, FocalInfoNCE
from kalm_st.loss_state import LossStateCallback, load_loss_state, loss_state_holders

model_dir, out, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
torch.manual_seed(0)
model = SentenceTransformer(model_dir, device="cpu")
texts = [f"text number {i} about topic {i % 5}" for i in range(48)]
g = torch.Generator().manual_seed(1)
rows = {"anchor": texts[:16], "positive": texts[16:32], "negative_1": texts[32:],
        "label": torch.randn(16, 3, 12, generator=g).tolist()}
loss = EmbeddingDistillation(model, FocalInfoNCE(model), teacher_dim=12, weight=1.0)

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if kill_at and state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

args = SentenceTransformerTrainingArguments(
    output_dir=out, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
    save_strategy="steps", use_cpu=True, report_to="none", seed=0, data_seed=0, logging_steps=100,
    dataloader_num_workers=0,
)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss,
                                     callbacks=[LossStateCallback(loss_state_holders(loss)), Kill()])
checkpoint = None
if resume:
    checkpoint = os.path.join(out, "checkpoint-4")
    assert load_loss_state(loss_state_holders(loss), checkpoint)
trainer.train(resume_from_checkpoint=checkpoint)
model.save(os.path.join(out, "final"))
torch.save(loss.projection.state_dict(), os.path.join(out, "projection.pt"))
"""


def _start(script: Path, model_dir: Path, out: Path, resume: bool, kill_at: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), str(model_dir), str(out), "1" if resume else "0", str(kill_at)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(script: Path, model_dir: Path, out: Path, resume: bool, kill_at: int) -> subprocess.CompletedProcess:
    return _finish(_start(script, model_dir, out, resume, kill_at))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def test_kill_and_resume_keeps_the_projection(tiny_qwen_dir, tmp_path: Path) -> None:
    from kalm_st import build_model

    model_dir = tmp_path / "student"
    build_model(str(tiny_qwen_dir)).save(str(model_dir))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    # The uninterrupted run and the run to be killed are independent single-threaded processes: side by side.
    full_process = _start(script, model_dir, tmp_path / "full", resume=False, kill_at=0)
    killed = _run(script, model_dir, tmp_path / "killed", resume=False, kill_at=5)
    full = _finish(full_process)
    assert full.returncode == 0, full.stderr[-3000:]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "checkpoint-4" / "loss_projections.pt").is_file()
    resumed = _run(script, model_dir, tmp_path / "killed", resume=True, kill_at=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "projection.pt")
    b = torch.load(tmp_path / "killed" / "projection.pt")
    initial = torch.load(tmp_path / "killed" / "checkpoint-4" / "loss_projections.pt")[0]
    assert not torch.equal(a["weight"], initial["weight"])  # it trained after step 4
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    wa, wb = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "killed" / "final")
    assert wa.keys() == wb.keys() and not any("projection" in k for k in wa)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=0, msg=name)
