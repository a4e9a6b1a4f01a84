"""Mean pooling over non-padding tokens, KaLM's sentence embedding (METHOD.md §1)."""

from __future__ import annotations

from typing import Any

from sentence_transformers.sentence_transformer.modules import Pooling


class MeanPooling(Pooling):
    """``e = sum_t h_t * m_t / sum_t m_t``, the mean of the token states over the attention mask ``m``.

    A fixed-mode :class:`~sentence_transformers.sentence_transformer.modules.Pooling` (it saves as the stock module, so
    models stay loadable without kalm-st). Padding on either side is excluded by the mask. With
    ``include_prompt=False`` the instruction (prompt) tokens are excluded from the mean as well, counted from each
    text's first real token, so left padding is handled too.

    Args:
        embedding_dimension: Size of the token states (896 for Qwen2-0.5B).
        include_prompt: Whether instruction tokens count in the mean. KaLM-V2 includes them (the default).
    """

    def __init__(self, embedding_dimension: int, include_prompt: bool = True, **kwargs: Any) -> None:
        pooling_mode = kwargs.pop("pooling_mode", "mean")
        if pooling_mode not in ("mean", ("mean",), ["mean"]):
            raise ValueError(f"MeanPooling only pools with mode 'mean', got pooling_mode={pooling_mode!r}.")
        if kwargs:
            raise TypeError(f"MeanPooling got unexpected arguments: {sorted(kwargs)}")
        super().__init__(embedding_dimension, pooling_mode="mean", include_prompt=include_prompt)

    @classmethod
    def from_pooling(cls, module: Pooling) -> MeanPooling:
        """Promote a stock mean ``Pooling`` in place (it has no weights; this only changes the class)."""
        if module.pooling_mode not in ("mean", ("mean",)):
            raise ValueError(f"Cannot use a Pooling with mode {module.pooling_mode!r} as MeanPooling.")
        module.__class__ = cls
        return module
