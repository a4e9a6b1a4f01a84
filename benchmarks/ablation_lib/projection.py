"""A least-squares start for ``EmbeddingDistillation``'s projection (``projection_init`` of an arm), cached per task.

The fit is the library's (:func:`kalm_st.losses.ridge_projection`, the recipe's ``projection_init: ridge``); this
module adds the benchmark's cache, so every seed of an arm starts from the same fit.

The loss maps the student's embedding ``e`` into the teacher's space as ``W e + b`` and trains ``W, b`` with the
student. From a random ``W`` the first steps pull the pretrained student towards a random linear image of the
teacher's space, and at the student's learning rate (2e-5) ``W`` itself hardly moves in a few hundred steps. So the
projection starts at the ridge-regression fit of the teacher's embeddings on the *starting* student's, over a fixed
sample of training texts; the distillation term then trains only what a linear map cannot already explain:

    W^T = (Xc^T Xc + lambda I)^-1 Xc^T Yc,   b = mean(Y) - W mean(X),   lambda = ridge * trace(Xc^T Xc) / d_student

with ``X`` the student's embeddings (rows), ``Y`` the teacher's, ``c`` = centred. The fit depends only on the
starting model and the data, so it is computed once per (student, task) and cached; every seed starts from it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kalm_st.losses.projection_init import ridge_projection

if TYPE_CHECKING:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from kalm_st.losses import EmbeddingDistillation

logger = logging.getLogger("ablation")


def init_projection(
    loss: EmbeddingDistillation,
    model: SentenceTransformer,
    dataset: Dataset,
    prompts: Mapping[str, str] | None,
    rows: int,
    ridge: float,
    seed: int,
    cache: Path | None,
) -> dict[str, float]:
    """Set ``loss.projection`` to the ridge fit over ``rows`` rows (every column) of ``dataset``; returns the fit's
    mean cosine to the teacher before (random ``W``) and after, on the fitting texts (a sanity check, not a score)."""
    import numpy as np
    import torch

    if cache is not None and cache.is_file():
        state = torch.load(cache, weights_only=True)
    else:
        columns = [c for c in dataset.column_names if c != "label"]
        picked = sorted(random.Random(seed).sample(range(len(dataset)), min(rows, len(dataset))))
        subset = dataset.select(picked)
        labels = subset.with_format("numpy")["label"]  # (rows, C, d_t), or a list of per-row arrays
        teacher = torch.from_numpy(np.stack([np.asarray(row, dtype=np.float32) for row in labels]))
        student = []
        model.eval()
        for column in columns:
            prompt = (prompts or {}).get(column) or None
            student.append(
                model.encode(list(subset[column]), prompt=prompt, batch_size=64, convert_to_tensor=True).float().cpu()
            )
        x = torch.cat(student)  # (rows * C, d_s), column after column
        y = teacher.transpose(0, 1).reshape(-1, teacher.size(-1))  # the same order
        weight, bias = ridge_projection(x, y, ridge)
        before = torch.nn.functional.cosine_similarity(x @ loss.projection.weight.detach().T.cpu(), y).mean()
        after = torch.nn.functional.cosine_similarity((x.double() @ weight.T + bias).float(), y).mean()
        state = {"weight": weight.float(), "bias": bias.float(), "cos_before": before, "cos_after": after}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, cache)
    with torch.no_grad():
        loss.projection.weight.copy_(state["weight"])
        if loss.projection.bias is not None:
            loss.projection.bias.copy_(state["bias"])
    info = {"cos_random_init": float(state["cos_before"]), "cos_ridge_init": float(state["cos_after"])}
    logger.info("projection init (%s rows, ridge %s): %s", rows, ridge, info)
    return info


__all__ = ["init_projection", "ridge_projection"]
