"""Model soup (METHOD.md §4, stage 3a): a weighted average of the parameters of same-architecture checkpoints.

Why not ``SentenceTransformer.merge(method="linear")``: it needs mergekit (sentence-transformers' ``merge`` extra),
which pulls in peft, protobuf, sentencepiece and immutables for what is, in the linear case, one weighted mean per
tensor. The soup here is that mean, computed in float64 and cast back to each tensor's dtype, with checks that every
model has the same modules, parameter names, shapes and dtypes. The first model provides everything that is not a
parameter (tokenizer, pooling and normalisation config, prompts). ``tests/recipe/test_soup.py`` pins the result to
the exact mean and to ``SentenceTransformer.merge(method="linear")`` (mergekit is in the ``test`` extra).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def soup_weights(count: int, weights: Sequence[float] | None = None) -> list[float]:
    """The weights of a soup of ``count`` models, normalised to sum 1: the one check of a soup's settings (the
    recipe's ``soup`` step calls it when the recipe is read, the functions below when they run)."""
    if count < 2:
        raise ValueError(f"models: a soup needs at least 2 models, got {count}.")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"weights: {len(weights)} weights for {count} models.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights: must be >= 0 with a positive sum, got {list(weights)}.")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def soup_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """``sum_k w_k * state_dicts[k]`` per tensor, weights normalised to sum 1 (uniform by default).

    Non-floating tensors (e.g. integer buffers) must be equal across models and are taken from the first.
    """
    norm = soup_weights(len(state_dicts), weights)
    reference = state_dicts[0]
    for index, other in enumerate(state_dicts[1:], start=1):
        if other.keys() != reference.keys():
            missing = sorted(set(reference) ^ set(other))[:5]
            raise ValueError(f"Model {index} has different parameters than model 0 (e.g. {missing}).")
        for name, tensor in other.items():
            if tensor.shape != reference[name].shape or tensor.dtype != reference[name].dtype:
                raise ValueError(
                    f"Model {index}: {name} is {tuple(tensor.shape)} {tensor.dtype}, model 0 has "
                    f"{tuple(reference[name].shape)} {reference[name].dtype}."
                )
    souped: dict[str, torch.Tensor] = {}
    for name, tensor in reference.items():
        if not tensor.is_floating_point():
            if any(not torch.equal(sd[name], tensor) for sd in state_dicts[1:]):
                raise ValueError(f"Non-floating tensor {name} differs between models; cannot average it.")
            souped[name] = tensor.clone()
            continue
        acc = torch.zeros_like(tensor, dtype=torch.float64)
        for weight, state_dict in zip(norm, state_dicts, strict=True):
            acc += weight * state_dict[name].to(torch.float64)
        souped[name] = acc.to(tensor.dtype)
    return souped


def soup_models(models: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Average loaded sentence-transformers models in place of the first one's parameters; returns the first."""
    if len({len(m) for m in models}) != 1 or len({tuple(type(mod).__name__ for mod in m) for m in models}) != 1:
        raise ValueError("All soup ingredients must have the same module structure.")
    souped = soup_state_dicts([m.state_dict() for m in models], weights)
    models[0].load_state_dict(souped, strict=True)
    return models[0]


def soup(
    model_paths: Sequence[str | os.PathLike[str]],
    output_path: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
) -> Path:
    """Load the models, average them and save the soup (atomically, loadable with plain ``SentenceTransformer``)."""
    from kalm_st.lora import refuse_adapter_folders
    from kalm_st.model_source import resolve_model

    refuse_adapter_folders(model_paths)  # never average an adapter silently

    models = [resolve_model(path, what=f"soup: models[{i}]", device="cpu") for i, path in enumerate(model_paths)]
    result = soup_models(models, weights)
    result.save(os.fspath(output_path))
    logger.info("Souped %d models into %s", len(models), output_path)
    return Path(output_path)


__all__ = ["soup", "soup_models", "soup_state_dicts", "soup_weights"]
