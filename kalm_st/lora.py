"""LoRA on the backbone through ``peft`` (the ``lora`` extra): ``model.lora: {rank, alpha, target_modules}``.

:func:`apply_lora` wraps the backbone of a kalm-st model in a ``peft`` ``PeftModel``: every backbone weight is frozen
and only the low-rank adapters train (the optimizer and, under FSDP2, the sharded gradients hold only them).
:func:`save_lora_model` writes the final model: by default the adapters merged into the weights (``W + alpha/r B A``),
the same portable folder as full fine-tuning; with ``model.lora.save: adapter`` the adapter alone (peft's
``adapter_config.json`` and ``adapter_model.safetensors``). A soup never averages an adapter folder silently:
:func:`refuse_adapter_folders` names it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kalm_st.io import atomic_directory
from kalm_st.recipe.config import ConfigError, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError("model.lora needs peft: pip install 'kalm-st[lora]'.") from error


def apply_lora(model: Any, lora: LoraConfig, *, seed: int = 0, source: str = "<config>") -> Any:
    """Wrap ``model[0]``'s backbone in LoRA adapters in place (only they train); returns ``model``.

    The adapters' random start is drawn from ``seed`` (the global RNG is left as it was), so every process of a
    run starts from the same adapters: FSDP2 shards each process's own copy, it broadcasts nothing.
    """
    import torch

    require_peft()
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    module = model[0]
    backbone = module.auto_model
    names = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    missing = [target for target in lora.target_modules if target not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if type(m).__name__ == "Linear"})
        raise ConfigError(
            f"{source}: model.lora.target_modules {missing} are not modules of {type(backbone).__name__} "
            f"(its linear layers: {', '.join(linear)})."
        )
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.model = get_peft_model(backbone, config)
    return model


def has_lora(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model[0].auto_model, PeftModel)


def merge_lora(model: Any) -> Any:
    """Merge the adapters into the backbone's weights in place (``merge_and_unload``); returns ``model``."""
    if has_lora(model):
        model[0].model = model[0].auto_model.merge_and_unload()
    return model


def save_lora_model(model: Any, path: str | os.PathLike[str], *, adapter: bool = False) -> Path:
    """The final save of a LoRA run: merged into the portable folder (default), or the adapter alone."""
    if adapter:
        with atomic_directory(path) as tmp:
            model[0].auto_model.save_pretrained(str(tmp))
        return Path(path)
    merge_lora(model).save(str(path))
    return Path(path)


def refuse_adapter_folders(paths: Sequence[str | os.PathLike[str]], what: str = "soup.models") -> None:
    """A soup averages full weights: an adapter alone (or a model saved with unmerged adapters) is refused, named."""
    adapters = [os.fspath(p) for p in paths if (Path(p) / ADAPTER_CONFIG).is_file()]
    if adapters:
        raise ValueError(
            f"{what}: {', '.join(adapters)} hold(s) a LoRA adapter, not merged weights; a soup averages full models. "
            "Train with model.lora.save: merged (the default) and soup the merged folders."
        )


__all__ = ["apply_lora", "has_lora", "merge_lora", "refuse_adapter_folders", "require_peft", "save_lora_model"]
