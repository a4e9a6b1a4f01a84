"""Bad stage configs: every error names the config file and the key, before any model or data is loaded where the
config alone shows the problem, and at the latest in ``--dry-run`` (which builds the losses and reads the data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kalm_st.cli import main
from kalm_st.recipe.config import ConfigError, load_config

from ..recipe.conftest import CONFIG_DIR, write_rows

TINY = CONFIG_DIR / "tiny_smoke.yaml"
DISTILL = CONFIG_DIR / "stage3_distill.yaml"


def _load_error(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path} (with --set {' '.join(overrides)}): ")
    return message.split("): ", 1)[1]


@pytest.mark.parametrize(
    ("path", "override", "expected"),
    [
        (TINY, "seeds=1", "unknown key seeds (allowed in the top level: args, data, loss, matryoshka, model, "),
        (TINY, "model.dtyp=float32", "unknown key model.dtyp (allowed in model: attn_implementation, dtype, "),
        (TINY, "data.taskz=1", "unknown key data.taskz (allowed in data: eval_tasks, homogeneous_ratio, "),
        (TINY, "data.tasks.STSBenchmark.pth=x", "unknown key data.tasks.STSBenchmark.pth (allowed in "),
        (TINY, "loss.nam=x", "unknown key loss.nam (allowed in loss: base, kwargs, name)"),
        (DISTILL, "loss.base.kwarg={}", "unknown key loss.base.kwarg (allowed in loss.base: base, kwargs, name)"),
        (TINY, "matryoshka.dimz=[64]", "unknown key matryoshka.dimz (allowed in matryoshka: dims, enabled, weights)"),
        (TINY, "args.max_stepz=9", "unknown key args.max_stepz (not a SentenceTransformerTrainingArguments field)"),
    ],
    ids=["top", "model", "data", "task", "loss", "loss.base", "matryoshka", "args"],
)
def test_unknown_key_at_every_level(path: Path, override: str, expected: str) -> None:
    assert _load_error(path, [override]).startswith(expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("args.max_steps='8'", "args.max_steps must be int, got str '8'."),
        ("seed=abc", "seed must be int, got str 'abc'."),
        ("model.max_seq_length=[64]", "model.max_seq_length must be int, got list [64]."),
        ("data.homogeneous_ratio=high", "data.homogeneous_ratio must be float, got str 'high'."),
        (
            "model.dtype=float33",
            "model.dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'float33'; did you mean 'float32'?",
        ),
        ("data.tasks.STSBenchmark.type=sts", "data.tasks.STSBenchmark.type must be one of 'Retrieval', "),
        ("data.task_order=random", "data.task_order must be one of 'shuffled', 'even', got 'random'."),
    ],
    ids=["args-int", "seed", "model-int", "data-float", "dtype", "task-type", "task-order"],
)
def test_wrong_types(override: str, expected: str) -> None:
    assert _load_error(TINY, [override]).startswith(expected)


def test_misspelled_loss_name_is_caught_when_loading() -> None:
    assert _load_error(TINY, ["loss.name=focal_infonc"]) == (
        "loss.name must be one of 'focal_infonce', 'cached_focal_infonce', 'contrastive_distillation', "
        "'embedding_distillation', 'multiple_negatives_ranking', 'cached_multiple_negatives_ranking', got "
        "'focal_infonc'; did you mean 'focal_infonce'?"
    )
    assert _load_error(DISTILL, ["loss.base.name=focal"]).startswith("loss.base.name must be one of 'focal_infonce'")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("args.per_device_train_batch_size=0", "args.per_device_train_batch_size must be >= 1, got 0."),
        ("args.per_device_train_batch_size=-4", "args.per_device_train_batch_size must be >= 1, got -4."),
        ("args.gradient_accumulation_steps=0", "args.gradient_accumulation_steps must be >= 1, got 0."),
        ("args.max_steps=0", "args.max_steps must be >= 1, or -1 to train args.num_train_epochs, got 0."),
        ("args.max_steps=-5", "args.max_steps must be >= 1, or -1 to train args.num_train_epochs, got -5."),
        ("args.num_train_epochs=0", "args.num_train_epochs must be > 0, got 0."),
        ("args.save_steps=0", "args.save_steps must be > 0, got 0."),
        ("args.logging_steps=-1", "args.logging_steps must be > 0, got -1."),
        ("args.learning_rate=-1e-4", "args.learning_rate must be >= 0, got -0.0001."),
        ("model.max_seq_length=0", "model.max_seq_length must be >= 1, got 0."),
        ("data.num_negatives=-1", "data.num_negatives must be >= 0 (or null for all), got -1."),
        ("data.homogeneous_ratio=0", "data.homogeneous_ratio must be in (0, 1], got 0.0."),
        ("data.tasks.STSBenchmark.max_rows=0", "data.tasks.STSBenchmark.max_rows must be >= 1 (or null), got 0."),
        ("matryoshka.dims=[64, 0]", "matryoshka.dims[1] must be >= 1, got 0."),
        (
            "matryoshka.weights=[1, -0.5, 0.2, 0.1, 0.1]",
            "matryoshka.weights[1] must be a finite number >= 0, got -0.5.",
        ),
    ],
    ids=[
        "batch-0",
        "batch-negative",
        "grad-accumulation-0",
        "max_steps-0",
        "max_steps-negative",
        "epochs-0",
        "save_steps-0",
        "logging_steps-negative",
        "learning_rate-negative",
        "max_seq_length-0",
        "num_negatives-negative",
        "homogeneous_ratio-0",
        "max_rows-0",
        "matryoshka-dim-0",
        "matryoshka-weight-negative",
    ],
)
def test_zero_or_negative_sizes_and_steps(override: str, expected: str) -> None:
    assert _load_error(TINY, [override]) == expected


def _dry_run(capsys, tmp_path: Path, overrides: list[str], config: Path = TINY) -> str:
    argv = ["train", str(config), "--dry-run", "--set", f"output_dir={tmp_path / 'out'}"]
    argv += [item for o in overrides for item in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kalm-st train: error: ")]  # not progress bars
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"kalm-st train: error: {config} (with --set "), lines[0]
    return lines[0].split("): ", 1)[1]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.kwargs.temperature=0", "loss.kwargs: temperature must be a positive finite number, got 0"),
        ("loss.kwargs.temperature=-0.1", "loss.kwargs: temperature must be a positive finite number, got -0.1"),
        ("loss.kwargs.temperature=hot", "loss.kwargs: temperature must be a positive finite number, got 'hot'"),
        ("loss.kwargs.gamma=-1", "loss.kwargs: gamma must be a finite number >= 0, got -1"),
        ("loss.kwargs.gama=1", "loss.kwargs do not fit FocalInfoNCE: FocalInfoNCE.__init__() got an unexpected "),
        (
            "loss.kwargs.hard_negative_mixing.alpah=1",
            "loss.kwargs.hard_negative_mixing: HardNegativeMixing.__init__() got an unexpected keyword argument",
        ),
        ("loss.kwargs.hard_negative_mixing.alpha=0", "loss.kwargs.hard_negative_mixing: alpha must be a positive"),
    ],
    ids=["temperature-0", "temperature-neg", "temperature-str", "gamma-neg", "kwarg", "mixing-kwarg", "mixing-alpha"],
)
def test_loss_hyperparameters_name_file_and_key(capsys, tmp_path: Path, override: str, expected: str) -> None:
    assert _dry_run(capsys, tmp_path, [override]).startswith(expected)


def test_more_negatives_asked_than_the_data_has(capsys, tmp_path: Path) -> None:
    message = _dry_run(capsys, tmp_path, ["data.num_negatives=10"])
    assert message == (
        "data.num_negatives is 10, but data.tasks.STSBenchmark (data/tiny/tiny_train.jsonl) has 3 negatives "
        "per row; lower data.num_negatives or mine more negatives."
    )


def test_missing_data_file_names_the_key(capsys, tmp_path: Path) -> None:
    message = _dry_run(capsys, tmp_path, [f"data.tasks.STSBenchmark.path={tmp_path / 'gone.jsonl'}"])
    assert message == f"data.tasks.STSBenchmark.path: Training data file not found: {tmp_path / 'gone.jsonl'}"


def test_missing_previous_stage_output(capsys, tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl")
    missing = tmp_path / "stage1" / "final"
    overrides = [f"model.init_from={missing}", f"data.tasks.STSBenchmark.path={rows}"]
    assert _dry_run(capsys, tmp_path, overrides) == (
        f"model.init_from {str(missing)!r} does not exist (a previous stage's output: run that stage first)."
    )


def test_bad_attention_backend_names_the_key(capsys, tmp_path: Path) -> None:
    assert _dry_run(capsys, tmp_path, ["model.attn_implementation=fast"]).startswith(
        'model: Specified `attn_implementation="fast"` is not supported.'
    )


def test_invalid_yaml_and_top_level(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: finetune\nmodel: {init_from: x\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: invalid YAML: "):
        load_config(bad)
    bad.write_text(json.dumps(["stage", "finetune"]))
    with pytest.raises(ConfigError, match=rf"^{bad}: the top level must be a mapping of sections, got list\.$"):
        load_config(bad)
