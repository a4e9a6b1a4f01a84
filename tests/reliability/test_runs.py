"""Faults during a run: kills, a full disk, an unwritable output folder, damaged checkpoints, resuming a different
run. Each is detected and named; nothing half-written is ever used.

The kill and full-disk cases run in one subprocess (a SIGKILL and a file size limit cannot be undone in-process);
everything else trains in-process on copies of one tiny 6-step run (checkpoints at steps 2, 4, 6).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kalm_st.cli import main
from kalm_st.recipe.build import last_complete_checkpoint, run_stage
from kalm_st.recipe.checkpoints import recorded_run
from kalm_st.recipe.config import ConfigError, load_config

from ..recipe.conftest import CONFIG_DIR, REPO_ROOT

TINY = CONFIG_DIR / "tiny_smoke.yaml"
RUN = ["args.max_steps=6", "args.save_steps=2"]


def _config(out: Path, *extra: str):
    return load_config(TINY, [f"output_dir={out}", *RUN, *extra])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:  # bitwise: the same computation, resumed (threads are the same in one process)
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny runs train fastest on one thread (more only contend, on a shared CI machine too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step run: ``checkpoint-2/4/6`` and ``final``."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_stage(_config(out))
    return out


@pytest.fixture
def interrupted(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run without its final model: what a run killed after its last checkpoint leaves."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# SIGKILL during the final save, and a full disk: one subprocess
# ----------------------------------------------------------------------------------------------------------------------

_WORKER = """
import os, resource, signal, sys
from pathlib import Path
from transformers import TrainerCallback
import kalm_st.model
from kalm_st.recipe.build import run_stage
from kalm_st.recipe.config import load_config

config_path, root = sys.argv[1], Path(sys.argv[2])
run = ["args.max_steps=6", "args.save_steps=2"]
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)


class FileSizeLimit(TrainerCallback):
    # After checkpoint-2, no file may grow past `limit` bytes: writes fail as on a full disk (EFBIG, not ENOSPC).
    def __init__(self, limit):
        self.limit = limit

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, hard))


# 64 KB: the model's weights (430 KB) fail; 600 KB: the weights fit, the optimizer state (880 KB) fails.
for name, limit in (("disk-weights", 65536), ("disk-optimizer", 600000)):
    try:
        run_stage(load_config(config_path, [f"output_dir={root / name}", *run]), callbacks=[FileSizeLimit(limit)])
        message = "no error"
    except OSError as error:
        message = str(error)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    (root / f"{name}.txt").write_text(message)

real_make_portable = kalm_st.model.make_portable


def make_portable_then_die(path):
    if Path(path).name.startswith(".final.tmp-"):  # the final model's files are written, not yet moved in
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a preempted job
    real_make_portable(path)


kalm_st.model.make_portable = make_portable_then_die
run_stage(load_config(config_path, [f"output_dir={root / 'killed'}", *run]))
"""


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faulty")
    script = root / "worker.py"
    script.write_text(_WORKER, encoding="utf8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(TINY), str(root)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-3000:]  # the last scenario ends in SIGKILL
    return root


def test_sigkill_during_the_final_save(faulty_runs: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "killed"
    shutil.copytree(faulty_runs / "killed", out)
    assert not (out / "final").exists()  # the final model appears whole or not at all
    leftovers = [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".final.tmp-")  # the killed save's temporary folder
    with caplog.at_level(logging.INFO, logger="kalm_st"):
        final = run_stage(_config(out), resume=True)
    assert f"Removing {leftovers[0]}, left by an interrupted save." in caplog.text
    assert f"Resuming from {out / 'checkpoint-6'}" in caplog.text  # the run had finished training
    assert not list(out.glob(".*.tmp-*"))
    _assert_same_weights(final, out / "checkpoint-6")
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(final), device="cpu").encode(["a text"]).shape == (1, 64)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("disk-weights", "SafetensorError: Error while serializing: I/O error: File too large (os error 27)"),
        ("disk-optimizer", "RuntimeError: [enforce fail at inline_container.cc"),
    ],
    ids=["weights-file", "optimizer-file"],
)
def test_full_disk_during_a_checkpoint(faulty_runs: Path, tmp_path: Path, name: str, reason: str) -> None:
    out = faulty_runs / name
    message = (faulty_runs / f"{name}.txt").read_text()
    config = _config(out)
    assert message.startswith(f"{config.source}: writing to output_dir {str(out)!r} failed ({reason}"), message
    assert message.endswith(
        f"the disk is full or a file size limit is set. The last complete checkpoint is {out / 'checkpoint-2'} "
        "(incomplete ones are skipped); free space, then rerun with --resume."
    )
    assert not (out / "final").exists()
    copy = tmp_path / name
    shutil.copytree(out, copy)
    assert last_complete_checkpoint(copy) == copy / "checkpoint-2"  # the half-written checkpoint-4 is skipped
    final = run_stage(_config(copy), resume=True)  # space freed: the run finishes
    assert (final / "modules.json").is_file() and (copy / "checkpoint-6" / "trainer_state.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_is_skipped_and_the_previous_one_used(
    finished_run: Path, interrupted: Path, caplog
) -> None:
    _truncate(interrupted / "checkpoint-6" / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="kalm_st"):
        final = run_stage(_config(interrupted), resume=True)
    assert (
        f"Skipping checkpoint {interrupted / 'checkpoint-6'}: model.safetensors: SafetensorError: Error while "
        "deserializing header: incomplete metadata, file not fully covered"
    ) in caplog.text
    assert f"Resuming from {interrupted / 'checkpoint-4'}" in caplog.text
    _assert_same_weights(final, finished_run / "final")  # steps 5-6 redone exactly


@pytest.mark.parametrize(
    ("file", "damage", "reason"),
    [
        ("optimizer.pt", "truncate", "optimizer.pt: BadZipFile: File is not a zip file"),
        ("optimizer.pt", "flip", "optimizer.pt: checksum mismatch in "),
        ("scheduler.pt", "empty", "scheduler.pt: empty file"),
        ("trainer_state.json", "truncate", "no readable trainer_state.json (an interrupted save)"),
        ("config.json", "truncate", "config.json: JSONDecodeError: "),
        ("hard_negative_mixing.pt", "truncate", "hard_negative_mixing.pt: BadZipFile: File is not a zip file"),
    ],
    ids=[
        "optimizer-truncated",
        "optimizer-overwritten",
        "scheduler-empty",
        "trainer_state-truncated",
        "config-truncated",
        "mixing-state-truncated",
    ],
)
def test_damaged_checkpoint_file_is_named(interrupted: Path, caplog, file: str, damage: str, reason: str) -> None:
    path = interrupted / "checkpoint-6" / file
    if damage == "truncate":
        _truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # overwrite 64 bytes in the middle: the archive still opens, its CRC check fails
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kalm_st"):
        assert last_complete_checkpoint(interrupted) == interrupted / "checkpoint-4"
    assert f"Skipping checkpoint {interrupted / 'checkpoint-6'}: {reason}" in caplog.text


def test_no_usable_checkpoint_is_a_clear_error(interrupted: Path) -> None:
    for step in (2, 4, 6):
        _truncate(interrupted / f"checkpoint-{step}" / "model.safetensors")
    with pytest.raises(FileNotFoundError) as info:
        run_stage(_config(interrupted), resume=True)
    damaged = "model.safetensors: SafetensorError: Error while deserializing header: incomplete metadata, file not"
    assert str(info.value) == (
        f"--resume: no complete checkpoint-N folder in {str(interrupted)!r} to resume from (run without --resume to "
        f"start fresh); checkpoint-6: {damaged} fully covered; checkpoint-4: {damaged} fully covered; "
        f"checkpoint-2: {damaged} fully covered."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Resuming a different run
# ----------------------------------------------------------------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused(interrupted: Path) -> None:
    config = _config(interrupted, "args.learning_rate=2e-4", "loss.kwargs.gamma=2")
    with pytest.raises(ConfigError) as info:
        run_stage(config, resume=True)
    assert str(info.value) == (
        f"--resume: the config ({config.source}) differs from the one {interrupted / 'checkpoint-6'} was trained "
        "with: args.learning_rate: 0.0001 -> 0.0002; loss.kwargs.gamma: 0.5 -> 2. Resume with the same config (only "
        "the save, logging and length settings may change), or train into a new output_dir."
    )
    assert not (interrupted / "final").exists()


def test_resume_may_train_longer(interrupted: Path) -> None:
    final = run_stage(_config(interrupted, "args.max_steps=8"), resume=True)
    assert (interrupted / "checkpoint-8").is_dir() and (final / "modules.json").is_file()


def test_resume_with_another_world_size_is_refused(interrupted: Path, monkeypatch) -> None:
    assert recorded_run(interrupted / "checkpoint-6")["world_size"] == 1  # what the single-process run recorded
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets in each process
    with pytest.raises(ConfigError) as info:
        run_stage(_config(interrupted), resume=True)
    assert str(info.value) == (
        f"--resume: {interrupted / 'checkpoint-6'} was written by a run with 1 process(es), this run has 2: the "
        "batches and the per-process random states depend on it. Resume with 1 process(es) (torchrun "
        "--nproc_per_node 1), or train into a new output_dir."
    )


def test_fresh_run_into_a_folder_with_checkpoints_warns(interrupted: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kalm_st"):
        run_stage(_config(interrupted, "args.max_steps=1", "args.save_strategy=no"))
    assert f"{interrupted} already holds checkpoints of an earlier run; this run starts fresh" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Output folders that cannot be written
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder no file can be created in. root ignores permission bits, so as root the folder is made immutable
    (``chattr +i``, honoured for root too); as another user ``chmod 555`` does it."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_dir_fails_before_loading_anything(read_only_dir: Path, capsys) -> None:
    argv = ["train", str(TINY), "--set", f"output_dir={read_only_dir}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"  # chattr +i / chmod 555
    assert err == (
        f"kalm-st train: error: {TINY} (with --set output_dir={read_only_dir}): output_dir {str(read_only_dir)!r} "
        f"is not writable ({reason})\n"
    )  # one line, before any data or model was loaded (no progress bars)
    assert list(read_only_dir.iterdir()) == []


def test_output_dir_below_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    assert main(["train", str(TINY), "--set", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err == (
        f"kalm-st train: error: {TINY} (with --set output_dir={out}): output_dir {str(out)!r} is not writable "
        "(Not a directory)\n"
    )
