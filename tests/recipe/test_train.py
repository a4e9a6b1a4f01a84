"""``kalm-st train``: every YAML dry-runs, bad input fails clearly, resume is exact, DDP runs, outputs are atomic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kalm_st.cli import main
from kalm_st.recipe.build import build_stage, last_complete_checkpoint, run_stage
from kalm_st.recipe.checkpoints import recorded_run
from kalm_st.recipe.config import ConfigError, load_config
from tests.ports import free_port

from .conftest import CONFIG_DIR, REPO_ROOT, write_rows

TINY = ["model.init_from=builtin:tiny-qwen2", "model.dtype=float32", "model.max_seq_length=32"]
TINY_ARGS = [
    "args.per_device_train_batch_size=4",
    "args.bf16=false",
    "args.use_cpu=true",
    "args.report_to=none",
    "args.activation_checkpointing=false",
]


def _tiny_overrides(config_path: Path, rows: Path, tmp_path: Path) -> list[str]:
    config = load_config(config_path)
    overrides = [*TINY, *TINY_ARGS, f"output_dir={tmp_path / 'out'}"]
    for name in config.data.tasks:
        overrides.append(f"data.tasks.{name}.path={rows}")
    return overrides


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_dry_runs(path: Path, rows_file: Path, tmp_path: Path, capsys) -> None:
    overrides = _tiny_overrides(path, rows_file, tmp_path)
    argv = ["train", str(path), "--dry-run"] + [item for o in overrides for item in ("--set", o)]
    assert main(argv) == 0, capsys.readouterr().err
    assert not (tmp_path / "out" / "final").exists()  # a dry run trains and saves nothing
    assert not (tmp_path / "out" / "resolved_config.yaml").exists()


def test_dry_run_builds_per_task_losses(rows_file: Path, tmp_path: Path) -> None:
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    from kalm_st.losses import FocalInfoNCE

    config = load_config(
        CONFIG_DIR / "stage2_finetune.yaml", _tiny_overrides(CONFIG_DIR / "stage2_finetune.yaml", rows_file, tmp_path)
    )
    run = build_stage(config)
    assert set(run.losses) == {"retrieval", "sts", "classification"}
    for task, loss in run.losses.items():
        assert isinstance(loss, MatryoshkaLoss) and tuple(loss.matryoshka_dims) == (
            64,
        )  # 896.. clamped to the 64-d model
        assert isinstance(loss.loss, FocalInfoNCE)
        assert loss.loss.in_batch_negatives is (task != "classification")
        assert loss.loss.gather_across_devices and loss.loss.hard_negative_mixing is not None
    assert run.args.learning_rate == 1e-5 and run.args.per_device_train_batch_size == 4
    assert run.args.prompts["sts"]["anchor"].startswith("Instruct: ")
    assert list(run.train_dataset["sts"].column_names) == [
        "anchor",
        "positive",
        *[f"negative_{i}" for i in range(1, 8)],
        "label",
    ]


def test_bad_loss_kwarg_names_file(rows_file: Path, tmp_path: Path, capsys) -> None:
    path = CONFIG_DIR / "tiny_smoke.yaml"
    argv = ["train", str(path), "--dry-run", "--set", "loss.kwargs.gama=1"]
    argv += [i for o in _tiny_overrides(path, rows_file, tmp_path) for i in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gama" in err and str(path) in err


def test_resume_without_checkpoint_errors(tmp_path: Path, capsys) -> None:
    argv = ["train", str(CONFIG_DIR / "tiny_smoke.yaml"), "--resume", "--set", f"output_dir={tmp_path / 'none'}"]
    assert main(argv) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_incomplete_checkpoints_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "modules.json").write_text("[]")
    (tmp_path / "checkpoint-8").mkdir()  # interrupted save: no trainer_state.json
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text("{trunc")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "missing") is None


class _Fail:
    """A TrainerCallback that raises at a step (imported lazily to keep collection light)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class Fail(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise RuntimeError("boom")

        return Fail()


def test_failed_run_leaves_no_final_model(tmp_path: Path) -> None:
    config = load_config(CONFIG_DIR / "tiny_smoke.yaml", [f"output_dir={tmp_path}", "args.save_strategy=no"])
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(config, callbacks=[_Fail(2)])
    assert not (tmp_path / "final").exists()
    assert (tmp_path / "resolved_config.yaml").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


_WORKER = """
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO)
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import TrainerCallback
from kalm_st.recipe.build import run_stage
from kalm_st.recipe.config import load_config

config_path, out, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a preempted job

# tiny_smoke.yaml mixes hard negatives: the resumed run must replay the mixes too (checkpointed generator state)
overrides = [f"output_dir={out}", "args.max_steps=6", "args.save_steps=2", "args.logging_steps=1"]
run_stage(load_config(config_path, overrides), resume=resume, callbacks=[Kill()] if kill_at else [])
"""


def _start_worker(tmp_path: Path, out: Path, resume: bool, kill_at: int) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER, encoding="utf8")
    # One thread per process: the bitwise comparison below needs the same reduction order in every run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(script),
        str(CONFIG_DIR / "tiny_smoke.yaml"),
        str(out),
        str(int(resume)),
        str(kill_at),
    ]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _worker(tmp_path: Path, out: Path, resume: bool, kill_at: int) -> subprocess.CompletedProcess:
    return _finish(_start_worker(tmp_path, out, resume, kill_at))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_kill_and_resume_gives_the_same_weights(tmp_path: Path) -> None:
    # The uninterrupted run and the run to be killed are independent single-threaded processes: run them side by side.
    full_process = _start_worker(tmp_path, tmp_path / "full", resume=False, kill_at=0)
    killed = _worker(tmp_path, tmp_path / "killed", resume=False, kill_at=5)
    full = _finish(full_process)
    assert full.returncode == 0, full.stderr[-3000:]
    assert killed.returncode == -9  # SIGKILL at step 5, after checkpoint-4
    assert not (tmp_path / "killed" / "final").exists()
    assert last_complete_checkpoint(tmp_path / "killed") == tmp_path / "killed" / "checkpoint-4"
    assert (tmp_path / "killed" / "checkpoint-4" / "hard_negative_mixing.pt").is_file()
    resumed = _worker(tmp_path, tmp_path / "killed", resume=True, kill_at=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "killed" / "final")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_torchrun_two_processes_with_cross_device_negatives(tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", num_rows=32, num_negatives=3, with_label=False)
    out = tmp_path / "ddp"
    overrides = [
        f"output_dir={out}",
        f"data.tasks.STSBenchmark.path={rows}",
        "loss.kwargs.gather_across_devices=true",
        "args.max_steps=4",
        "args.per_device_train_batch_size=4",
        "args.ddp_backend=gloo",
        "args.ddp_find_unused_parameters=false",  # saves checkpoint-4 (tiny_smoke.yaml: save_steps 4)
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(Path(sys.executable).parent / "kalm-st"),  # the installed console script, as users run it
        "train",
        str(CONFIG_DIR / "tiny_smoke.yaml"),
    ]
    cmd += [i for o in overrides for i in ("--set", o)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "final" / "modules.json").is_file()
    resolved = load_config(out / "resolved_config.yaml")  # rank 0 saved it, and it loads back
    assert resolved.loss.kwargs["gather_across_devices"] is True and resolved.args["ddp_backend"] == "gloo"
    # The checkpoint records its 2 processes; resuming it with 1 is refused (tests/reliability/test_runs.py).
    assert recorded_run(out / "checkpoint-4")["world_size"] == 2
    with pytest.raises(ConfigError, match=r"checkpoint-4 was written by a run with 2 process\(es\), this run has 1"):
        run_stage(load_config(CONFIG_DIR / "tiny_smoke.yaml", overrides), resume=True)


def test_false_negative_mask_from_the_config_logs_its_count(tmp_path: Path) -> None:
    from kalm_st.losses.false_negative_logging import FalseNegativeLoggingCallback

    overrides = [
        f"output_dir={tmp_path / 'out'}",
        "loss.kwargs.false_negative_mask=true",
        "args.max_steps=2",
        "args.logging_steps=1",
        "args.save_strategy=no",
    ]
    run = build_stage(load_config(CONFIG_DIR / "tiny_smoke.yaml", overrides))
    assert any(isinstance(c, FalseNegativeLoggingCallback) for c in run.trainer.callback_handler.callbacks)
    run.trainer.train()
    logged = [
        entry["false_negatives_masked"] for entry in run.trainer.state.log_history if "false_negatives_masked" in entry
    ]
    assert len(logged) == 2 and all(count >= 0 for count in logged)


def test_embedding_distillation_is_a_recipe_loss_with_its_projection_checkpointed(tiny_model) -> None:
    from kalm_st.loss_state import LossStateCallback, loss_state_holders
    from kalm_st.losses import EmbeddingDistillation, FocalInfoNCE
    from kalm_st.recipe.build import build_loss
    from kalm_st.recipe.config import LossConfig

    config = LossConfig(
        name="embedding_distillation",
        kwargs={"teacher_dim": 48, "weight": 0.5},
        base=LossConfig(name="focal_infonce", kwargs={"temperature": 0.05}),
    )
    loss = build_loss(tiny_model, config)
    assert isinstance(loss, EmbeddingDistillation) and isinstance(loss.base_loss, FocalInfoNCE)
    assert loss_state_holders({"task": loss}) == [loss] and LossStateCallback([loss]).holders == [loss]


def test_activation_checkpointing_turns_it_on_without_a_deprecation_warning(tmp_path: Path) -> None:
    """``args.activation_checkpointing: true`` (the quickstart's stages): the Trainer calls the model's
    ``activation_checkpointing_enable``; the backbone recomputes its layers, and transformers' FutureWarning about the
    deprecated ``gradient_checkpointing_enable`` fallback is gone."""
    import warnings

    overrides = [*TINY, *TINY_ARGS[:-1], "args.activation_checkpointing=true", "args.max_steps=1"]
    config = load_config(CONFIG_DIR / "tiny_smoke.yaml", [*overrides, f"output_dir={tmp_path / 'out'}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = build_stage(config)
        run.trainer.train()  # the Trainer switches checkpointing on as training starts
    backbone = run.model[0].auto_model
    assert backbone.is_gradient_checkpointing  # transformers' own flag: its layers recompute in the backward
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
