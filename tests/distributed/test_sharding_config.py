"""The sharding and LoRA config sections: validated with the file and key named; DDP stays the default."""

from __future__ import annotations

import pytest

from kalm_st.recipe.config import ConfigError, load_config
from tests.recipe.conftest import CONFIG_DIR

SMOKE = CONFIG_DIR / "tiny_smoke.yaml"


def test_ddp_is_the_default_and_fsdp2_is_one_key() -> None:
    assert load_config(SMOKE).sharding is None
    assert load_config(SMOKE).to_dict().get("sharding") is None  # a DDP run resumes checkpoints written before
    sharding = load_config(SMOKE, ["sharding.strategy=fsdp2"]).sharding
    assert sharding is not None and sharding.strategy == "fsdp2" and sharding.reshard_after_forward
    assert sharding.mixed_precision == "auto" and not sharding.activation_checkpointing


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sharding.strategy=zero3", r"sharding.strategy must be one of 'ddp', 'fsdp2'"),
        ("args.fsdp=full_shard", r"args.fsdp: shard the model with the sharding: section"),
        ("sharding.activation_checkpointing=true", r"sharding.activation_checkpointing is for strategy fsdp2"),
        ("model.lora.rank=0", r"model.lora.rank must be >= 1"),
        ("model.lora.target_modules=[]", r"model.lora.target_modules is empty"),
        ("model.lora.save=both", r"model.lora.save must be one of 'merged', 'adapter'"),
    ],
)
def test_bad_sections_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"tiny_smoke.yaml.*{message}"):
        load_config(SMOKE, [override])


def test_the_installed_transformers_has_what_fsdp2_relies_on() -> None:
    from kalm_st.distributed.sharded_trainer import check_trainer_hooks

    check_trainer_hooks()  # raises naming what is missing on another transformers


def test_fsdp2_in_one_process_is_a_clear_error(tiny_qwen_dir, tmp_path) -> None:
    from kalm_st.recipe.build import build_stage

    config = load_config(
        SMOKE, [f"model.init_from={tiny_qwen_dir}", "sharding.strategy=fsdp2", f"output_dir={tmp_path}"]
    )
    with pytest.raises(RuntimeError, match=r"tiny_smoke.yaml.*sharding.strategy fsdp2 needs several processes"):
        build_stage(config)
    assert build_stage(config, dry_run=True).trainer is not None  # a dry run checks the stage without sharding
