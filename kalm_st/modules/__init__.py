"""sentence-transformers modules of the KaLM recipe. Both save in the stock format (see ``kalm_st.model``)."""

from __future__ import annotations

from kalm_st.modules.bidirectional_decoder import (
    SUPPORTED_MODEL_TYPES,
    BidirectionalDecoder,
    BidirectionalQwen,
    require_bidirectional_support,
)
from kalm_st.modules.mean_pooling import MeanPooling

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BidirectionalDecoder",
    "BidirectionalQwen",
    "MeanPooling",
    "require_bidirectional_support",
]
