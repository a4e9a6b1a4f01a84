"""KaLM's Matryoshka defaults, applied through sentence-transformers' ``MatryoshkaLoss``.

``MatryoshkaLoss`` embeds once and reuses the embeddings at every dimension (``ForwardDecorator`` for plain losses,
``CachedLossDecorator`` on ``calculate_loss`` for cached ones), so every kalm-st loss works under it without extra
forward passes (``tests/losses/test_matryoshka.py`` counts them).
"""

from __future__ import annotations

from collections.abc import Sequence

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from torch import nn

from kalm_st.model import MATRYOSHKA_DIMS

MATRYOSHKA_WEIGHTS: tuple[float, ...] = (1.0, 0.3, 0.2, 0.1, 0.1)
"""KaLM-V2's Matryoshka loss weights for :data:`kalm_st.MATRYOSHKA_DIMS` [read, authors' train script]."""


def matryoshka_dims_for(embedding_dim: int) -> tuple[int, ...]:
    """KaLM's dims for an ``embedding_dim``-d model: (896, 512, 256, 128, 64) at 896; otherwise the model's own
    dimension followed by KaLM's smaller dims below it (e.g. 1024 -> (1024, 512, 256, 128, 64), 64 -> (64,))."""
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if embedding_dim == MATRYOSHKA_DIMS[0]:
        return MATRYOSHKA_DIMS
    return (embedding_dim, *(d for d in MATRYOSHKA_DIMS[1:] if d < embedding_dim))


def kalm_matryoshka(
    model: SentenceTransformer,
    loss: nn.Module,
    dims: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> MatryoshkaLoss:
    """Wrap ``loss`` in ``MatryoshkaLoss`` with KaLM's dims and weights.

    Args:
        model: The model being trained.
        loss: Any kalm-st loss (plain, cached or distillation) or sentence-transformers loss.
        dims: Matryoshka dims; default :func:`matryoshka_dims_for` the model's embedding dimension.
        weights: Loss weight per dim; default KaLM's (1, 0.3, 0.2, 0.1, 0.1), truncated to the number of dims
            (dims beyond five get 0.1).
    """
    if dims is None:
        dim = model.get_embedding_dimension()
        if dim is None:
            raise ValueError("The model does not report its embedding dimension: pass dims= explicitly.")
        dims = matryoshka_dims_for(int(dim))
    dims = tuple(int(d) for d in dims)
    if weights is None:
        weights = tuple(MATRYOSHKA_WEIGHTS[i] if i < len(MATRYOSHKA_WEIGHTS) else 0.1 for i in range(len(dims)))
    return MatryoshkaLoss(model, loss, matryoshka_dims=list(dims), matryoshka_weights=list(weights))


__all__ = ["MATRYOSHKA_DIMS", "MATRYOSHKA_WEIGHTS", "kalm_matryoshka", "matryoshka_dims_for"]
