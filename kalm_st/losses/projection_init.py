"""A least-squares start for :class:`~kalm_st.losses.EmbeddingDistillation`'s projection (``projection_init="ridge"``).

The loss maps the student's embedding ``e`` into the teacher's space as ``W e + b`` and trains ``W, b`` with the
student. From a random ``W`` the first steps pull a pretrained student towards a random linear image of the
teacher's space, and at a fine-tuning learning rate ``W`` itself hardly moves in a few hundred steps. Started at the
ridge-regression fit of the teacher's embeddings on the *starting* student's, over a fixed sample of training texts,
the distillation term trains only what a linear map cannot already explain:

    W^T = (Xc^T Xc + lambda I)^-1 Xc^T Yc,   b = mean(Y) - W mean(X),   lambda = ridge * trace(Xc^T Xc) / d_student

with ``X`` the student's embeddings (rows), ``Y`` the teacher's, ``c`` = centred. ``benchmarks/distillation.py``
measured this start (``docs/distillation.md``); the recipe runs it for a loss built with ``projection_init: ridge``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from kalm_st.losses.embedding_distillation import EmbeddingDistillation

logger = logging.getLogger(__name__)


def ridge_projection(student: Tensor, teacher: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """``(weight (d_t, d_s), bias (d_t,))`` minimising ``||X W^T + b - Y||^2 + lambda ||W||^2`` (float64 solve)."""
    x, y = student.double(), teacher.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc  # (d_s, d_s)
    spread = torch.trace(gram)
    if spread <= 1e-12 * max(float((x * x).sum()), 1e-300):
        raise ValueError(
            "ridge_projection: the student's embeddings of the fitting texts are all the same (texts cut to their "
            "prompt by max_seq_length?); nothing to fit"
        )
    lam = ridge * spread / gram.size(0)
    solution = torch.linalg.solve(gram + lam * torch.eye(gram.size(0), dtype=gram.dtype), xc.T @ yc)  # (d_s, d_t)
    weight = solution.T.contiguous()
    return weight, y_mean - weight @ x_mean


def fit_projection(
    loss: EmbeddingDistillation,
    dataset: Any,
    prompts: Mapping[str, str] | None = None,
    *,
    rows: int | None = None,
    ridge: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Set ``loss.projection`` to the ridge fit over ``rows`` rows of ``dataset`` (every text column: anchor,
    positive, negatives, against the teacher embeddings of its ``label``, ``(2 + n, d_t)`` per row).

    ``rows`` and ``ridge`` default to the loss's ``projection_init_rows`` / ``projection_ridge``; ``prompts``
    (column -> prompt) are the student's training prompts. Returns the mean cosine to the teacher on the fitting
    texts with the projection before and after (a sanity check, not a score).
    """
    rows = loss.projection_init_rows if rows is None else int(rows)
    ridge = loss.projection_ridge if ridge is None else float(ridge)
    if "label" not in dataset.column_names:
        raise ValueError(
            f"fit_projection needs teacher embeddings in a 'label' column (kalm-st teacher-embed); have "
            f"{dataset.column_names}"
        )
    columns = [c for c in dataset.column_names if c != "label" and c != "positive_group"]
    picked = sorted(random.Random(seed).sample(range(len(dataset)), min(rows, len(dataset))))
    subset = dataset.select(picked)
    labels = subset.with_format("numpy")["label"]  # (rows, C, d_t), or per-row arrays
    teacher = torch.from_numpy(np.stack([np.asarray(row, dtype=np.float32) for row in labels]))
    if teacher.ndim != 3 or teacher.size(1) != len(columns) or teacher.size(2) != loss.teacher_dim:
        raise ValueError(
            f"fit_projection: 'label' has shape {tuple(teacher.shape[1:])} per row; expected ({len(columns)}, "
            f"{loss.teacher_dim}): teacher embeddings of {columns}"
        )
    model = loss.model
    was_training = model.training
    model.eval()
    student = [
        model.encode(
            list(subset[column]), prompt=(prompts or {}).get(column) or None, batch_size=batch_size,
            convert_to_tensor=True, show_progress_bar=False,
        ).float().cpu()
        for column in columns
    ]  # fmt: skip
    model.train(was_training)
    x = torch.cat(student)  # (rows * C, d_s), column after column
    y = teacher.transpose(0, 1).reshape(-1, teacher.size(-1))  # the same order
    weight, bias = ridge_projection(x, y, ridge)
    before = torch.nn.functional.cosine_similarity(loss.projection(x.to(loss.projection.weight)).detach().cpu(), y)
    with torch.no_grad():
        loss.projection.weight.copy_(weight)
        if loss.projection.bias is not None:
            loss.projection.bias.copy_(bias)
    after = torch.nn.functional.cosine_similarity(loss.projection(x.to(loss.projection.weight)).detach().cpu(), y)
    info = {"cos_before": float(before.mean()), "cos_after": float(after.mean()), "rows": len(picked)}
    logger.info("EmbeddingDistillation projection: ridge fit over %d rows (ridge %s): %s", len(picked), ridge, info)
    return info


__all__ = ["fit_projection", "ridge_projection"]
