"""Version-guarded access to sentence-transformers internals that the losses use.

``embed_columns`` (``sentence_transformers.base.losses.merged_forward``, ST >= 6) embeds the candidate columns in
one merged forward pass, as ``MultipleNegativesRankingLoss`` does; it is not in that module's ``__all__``, so it is
imported defensively and falls back to one ``model(features)`` call per column (same embeddings, slower).
``tests/losses/test_compat.py`` pins both paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

_st_embed_columns: Callable[..., list[Tensor]] | None
try:  # sentence-transformers >= 6.0
    from sentence_transformers.base.losses.merged_forward import embed_columns as _st_embed_columns
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _st_embed_columns = None


def embed_columns(model: nn.Module, features: Iterable[dict[str, Any]]) -> list[Tensor]:
    """One ``sentence_embedding`` tensor per input column, in column order."""
    features = list(features)
    if _st_embed_columns is not None:
        return _st_embed_columns(model, features)
    return [model(f)["sentence_embedding"] for f in features]


__all__ = ["embed_columns"]
