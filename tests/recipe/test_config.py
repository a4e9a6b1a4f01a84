"""Stage YAMLs validate into dataclasses; bad keys and types are reported with the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm_st.recipe.config import ConfigError, StageConfig, apply_overrides, load_config, parse_yaml

from .conftest import CONFIG_DIR

ALL_CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_are_found() -> None:
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"stage1_pretrain.yaml", "stage2_finetune.yaml", "stage3_distill.yaml"} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_loads_and_round_trips(path: Path) -> None:
    config = load_config(path)
    assert StageConfig.from_dict(parse_yaml(config.to_yaml())) == config


def test_paper_settings_of_stage2() -> None:
    config = load_config(CONFIG_DIR / "stage2_finetune.yaml")
    assert config.model.init_from == "outputs/stage1/final"
    assert config.args["learning_rate"] == 1e-5 and config.args["warmup_steps"] == 0.1
    assert config.args["per_device_train_batch_size"] == 48 and config.args["bf16"] is True
    assert config.args["activation_checkpointing"] is True
    assert config.loss.kwargs["temperature"] == 0.01 and config.loss.kwargs["gather_across_devices"] is True
    assert config.data.num_negatives == 7
    assert config.matryoshka.dims == (896, 512, 256, 128, 64)
    assert config.matryoshka.weights == (1.0, 0.3, 0.2, 0.1, 0.1)
    assert load_config(CONFIG_DIR / "stage1_pretrain.yaml").model.init_from == "Qwen/Qwen2-0.5B"


def test_set_overrides_are_typed() -> None:
    config = load_config(
        CONFIG_DIR / "stage2_finetune.yaml",
        ["loss.kwargs.gamma=2", "args.learning_rate=3e-5", "args.bf16=false", "model.init_from=x/y", "seed=7"],
    )
    assert config.loss.kwargs["gamma"] == 2 and isinstance(config.loss.kwargs["gamma"], int)
    assert config.args["learning_rate"] == 3e-5 and config.args["bf16"] is False
    assert config.model.init_from == "x/y" and config.seed == 7
    assert "--set" in config.source


def test_yaml_floats_without_a_dot() -> None:
    assert parse_yaml("a: 1e-5\nb: 2\nc: '1e-5'") == {"a": 1e-5, "b": 2, "c": "1e-5"}
    assert parse_yaml("s: no\nt: true\nu: off\nv: False") == {"s": "no", "t": True, "u": "off", "v": False}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf8")
    return path


GOOD = (CONFIG_DIR / "tiny_smoke.yaml").read_text(encoding="utf8")


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("  gamma: 0.5", "  gamma: 0.5\n    gama: 1", "loss.kwargs"),  # kwargs are free-form: checked by the loss
        ("  dtype: float32", "  dtype: float32\n  dtyp: float32", "model.dtyp"),
        ("  max_seq_length: 64", "  max_seq_length: sixty-four", "model.max_seq_length"),
        ("  num_negatives: 3", "  num_negatives: 3.5", "data.num_negatives"),
        ("  max_steps: 8", "  max_steps: 8\n  max_stepz: 9", "args.max_stepz"),
        ("  max_steps: 8", "  max_steps: '8'", "args.max_steps"),
        ("  use_cpu: true", "  use_cpu: 1", "args.use_cpu"),
        ("stage: finetune", "stage: finetuning", "stage"),
        ("  enabled: true", "  enabled: true\n  dims: [64, x]", "matryoshka.dims[1]"),
        ("type: STS}", "type: sts}", "data.tasks.STSBenchmark.type"),
    ],
)
def test_bad_key_or_type_names_key_and_file(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    if key == "loss.kwargs":
        load_config(path)  # unknown loss kwargs are the loss constructor's to reject (test_train_cli)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_bad_override_names_key_and_source() -> None:
    with pytest.raises(ConfigError, match=r"--set args\.max_steps=many\): args\.max_steps must be int"):
        load_config(CONFIG_DIR / "tiny_smoke.yaml", ["args.max_steps=many"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["gamma"])
    with pytest.raises(ConfigError, match=r"seed is a int"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


def test_missing_file_and_sections(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    path = _write(tmp_path, "stage: finetune\noutput_dir: out\n")
    with pytest.raises(ConfigError, match=rf"{path}: missing required key model"):
        load_config(path)
    path = _write(tmp_path, "stage: soup\noutput_dir: out\n")  # a soup is a recipe step, not a stage
    with pytest.raises(ConfigError, match="stage must be one of 'pretrain', 'finetune', 'distill', got 'soup'"):
        load_config(path)


def test_loss_names_of_the_config_are_the_loss_table() -> None:
    import typing

    from kalm_st.recipe.build import LOSSES
    from kalm_st.recipe.config import LossName

    assert set(typing.get_args(LossName)) == set(LOSSES)
