"""FSDP2 for a kalm-st model: ``torch.distributed.fsdp.fully_shard`` on every decoder layer and on the whole
``SentenceTransformer`` (the root group holds the embeddings and the final norm).

The sharding is in place: the model object the losses hold stays the one that trains, so every loss (GradCache's
no-grad pass and cached-gradient backward included) calls the sharded model without knowing it is sharded. Each layer
is all-gathered just before it computes and freed after (``reshard_after_forward``), and its gradient is
reduce-scattered (averaged over the processes, as DDP averages) as soon as its backward is done.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from kalm_st.recipe.config import ShardingConfig

logger = logging.getLogger(__name__)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside ``model`` (through a peft wrapper if there is one)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module, "_no_split_modules", None):
            return module
    raise ValueError("sharding: the model holds no transformers backbone with _no_split_modules (decoder layers).")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone's decoder layers (its ``_no_split_modules`` classes, e.g. ``Qwen2DecoderLayer``), in order."""
    names = set(backbone_of(model)._no_split_modules)
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"sharding: no decoder layer of the classes {sorted(names)} in the model.")
    return layers


def mixed_precision_policy(setting: str, cuda: bool) -> Any:
    """``auto``: bf16 parameters and activations with fp32 gradient reduction on a GPU, none on a CPU (gloo)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if setting == "bf16" or (setting == "auto" and cuda):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory): the skeleton the final save loads
    the gathered full weights into (buffers are shared, not copied)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def shard_model(model: nn.Module, sharding: ShardingConfig, *, cuda: bool) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (a process group must be initialised); returns it."""
    from torch.distributed.fsdp import fully_shard

    if sharding.activation_checkpointing:  # transformers' own, per decoder layer; non-reentrant works under FSDP2
        backbone = backbone_of(model)
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
            backbone.activation_checkpointing_enable({"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    options = {
        "mp_policy": mixed_precision_policy(sharding.mixed_precision, cuda),
        "reshard_after_forward": sharding.reshard_after_forward,
    }
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    logger.info(
        "FSDP2: %d decoder layers sharded (%s), mixed precision %s, activation checkpointing %s",
        len(layers),
        type(layers[0]).__name__,
        options["mp_policy"],
        sharding.activation_checkpointing,
    )
    return model


__all__ = ["backbone_of", "decoder_layers", "meta_copy", "mixed_precision_policy", "shard_model"]
