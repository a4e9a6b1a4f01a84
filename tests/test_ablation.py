"""The ablation's arm configs differ only in the switch each one names (benchmarks/ablation/*.yaml)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ablation_benchmark", ROOT / "benchmarks" / "ablation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_arm_changes_exactly_its_switch(ablation: ModuleType) -> None:
    arms = ablation.load_arms()
    assert list(arms) == list(ablation.ARM_NAMES)
    first = arms["arm1_infonce"]
    assert first.base is None and first.switch is None
    assert first.gamma == 0 and first.hard_negative_mixing is None and first.distillation is None
    for name, arm in arms.items():
        if arm.base is None:
            continue
        assert ablation.arm_differences(arm, arms[arm.base]) == [arm.switch], name


def test_arms_form_one_chain_turning_on_each_switch_once(ablation: ModuleType) -> None:
    arms = list(ablation.load_arms().values())
    assert [a.base for a in arms[1:]] == [a.name for a in arms[:-1]]
    assert [a.switch for a in arms[1:]] == list(ablation.SWITCHES)


def test_arm_files_hold_no_training_settings(ablation: ModuleType) -> None:
    allowed = {f.name for f in dataclasses.fields(ablation.ArmConfig)}
    # embedding_distillation: optional, for benchmarks/distillation.py; the ablation's arms leave it out
    assert allowed == {"name", "description", "base", "switch", *ablation.SWITCHES, "embedding_distillation"}
    for name in ablation.ARM_NAMES:
        assert set(ablation.load_yaml(ablation.CONFIG_DIR / f"{name}.yaml")) == allowed - {"embedding_distillation"}


def test_config_diff_touches_only_metadata_and_the_switch(ablation: ModuleType) -> None:
    arms = ablation.load_arms()
    changed: list[str] = []
    for line in ablation.config_diff():
        if line.startswith(("+++", "---", "@@")):
            continue
        if line.startswith(("+", "-")):
            changed.append(line[1:].split(":", 1)[0])
    metadata = {"name", "description", "base", "switch"}
    switches = {a.switch for a in arms.values() if a.switch}
    assert set(changed) <= metadata | switches
    assert switches <= set(changed)


def test_a_second_change_is_detected(ablation: ModuleType) -> None:
    arms = ablation.load_arms()
    tampered = dataclasses.replace(arms["arm3_focal_mixing"], gamma=1.0)
    assert ablation.arm_differences(tampered, arms["arm2_focal"]) == ["gamma", "hard_negative_mixing"]
    with pytest.raises(ValueError, match="unknown keys"):
        ablation.ArmConfig.from_dict({**dataclasses.asdict(arms["arm2_focal"]), "learning_rate": 1e-4})


def test_common_config_is_valid(ablation: ModuleType) -> None:
    common = ablation.load_common()
    for mode in ("quick", "full"):
        config = common.modes[mode]
        assert set(config.max_steps) == set(ablation.STUDENTS) == set(config.eval)
        assert len(config.soup_seeds) >= 2
    assert len(common.modes["full"].seeds) >= 3
    assert len(common.modes["quick"].seeds) == 1
