"""LoRA (``model.lora``): only the adapters train; the merged save is the adapted model in the portable format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")  # the lora extra (in the test extra)

from kalm_st.recipe.build import build_stage  # noqa: E402
from kalm_st.recipe.config import ConfigError, load_config  # noqa: E402
from tests.recipe.conftest import CONFIG_DIR  # noqa: E402

TEXTS = ["A man is playing a guitar.", "Paris is the capital of France.", "Two dogs run across a snowy field."]


def _config(tiny_qwen_dir: Path, out: Path, *extra: str):
    return load_config(
        CONFIG_DIR / "tiny_smoke.yaml",
        [
            f"output_dir={out}",
            f"model.init_from={tiny_qwen_dir}",
            "model.lora={rank: 4, alpha: 8.0, target_modules: [q_proj, v_proj]}",
            "args.max_steps=3",
            "args.per_device_train_batch_size=4",
            "args.learning_rate=1.0e-2",
            "args.save_strategy=no",
            *extra,
        ],
    )


def test_only_adapters_train_and_the_merged_save_is_the_adapted_model(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from kalm_st.distributed.final_save import save_final_model

    config = _config(tiny_qwen_dir, tmp_path / "run")
    run = build_stage(config)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    run.trainer.train()
    after = dict(run.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)  # every base weight is frozen ...
    assert any("lora_B" in n for n in changed)  # ... and B, which starts at zero, moved
    run.model.eval()
    adapted = run.model.encode(TEXTS, convert_to_tensor=True)
    layer = run.model[0].auto_model.base_model.model.layers[0].self_attn.q_proj  # W + alpha/r * B A, by hand
    expected_q = layer.base_layer.weight + (8.0 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected_q = expected_q.detach().clone()

    final = tmp_path / "run" / "final"
    save_final_model(run.trainer, run.model, final, config)
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in name for name in weights)
    torch.testing.assert_close(weights["layers.0.self_attn.q_proj.weight"], expected_q, rtol=1e-6, atol=1e-7)
    plain = SentenceTransformer(str(final), device="cpu")
    merged = plain.encode(TEXTS, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(merged.double(), adapted.double(), dim=-1)
    assert cosine.min().item() >= 0.99999, cosine
    base = load_file(tiny_qwen_dir / "model.safetensors")
    assert not torch.equal(weights["layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(weights["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"], rtol=0,
                               atol=0)  # fmt: skip


def test_adapter_alone_on_request_and_soup_refuses_it(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    from kalm_st.lora import save_lora_model
    from kalm_st.recipe.soup import soup

    run = build_stage(_config(tiny_qwen_dir, tmp_path / "run", "model.lora.save=adapter", "args.max_steps=1"))
    save_lora_model(run.model, tmp_path / "adapter", adapter=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="hold\\(s\\) a LoRA adapter, not merged weights"):
        soup([tmp_path / "adapter", tmp_path / "adapter"], tmp_path / "soup")


def test_unknown_target_module_is_named(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_qwen_dir, tmp_path / "run", "model.lora.target_modules=[qkv_proj]")
    with pytest.raises(ConfigError, match=r"model.lora.target_modules \['qkv_proj'\] are not modules of Qwen2Model"):
        build_stage(config)
