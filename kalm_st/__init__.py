"""kalm-st: the KaLM-Embedding-V2 recipe as a sentence-transformers plugin.

Bidirectional decoder embedders (:func:`build_model`), KaLM's losses (:mod:`kalm_st.losses`), data curation
(:mod:`kalm_st.data`), the multi-stage training recipe (:mod:`kalm_st.recipe`) and MTEB evaluation
(:mod:`kalm_st.evaluation`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from kalm_st.instructions import KALM_INSTRUCTION_TEMPLATE, TASK_INSTRUCTIONS, build_prompts, format_instruction

if TYPE_CHECKING:
    from kalm_st.model import MATRYOSHKA_DIMS, KaLMSentenceTransformer, build_model, load_model, make_portable

# Resolved on first use, so that torch-free parts (kalm_st.serving.onnx_encoder) import without torch.
_LAZY: dict[str, str] = {
    name: "kalm_st.model"
    for name in ("MATRYOSHKA_DIMS", "KaLMSentenceTransformer", "build_model", "load_model", "make_portable")
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KALM_INSTRUCTION_TEMPLATE",
    "MATRYOSHKA_DIMS",
    "TASK_INSTRUCTIONS",
    "KaLMSentenceTransformer",
    "__version__",
    "build_model",
    "build_prompts",
    "format_instruction",
    "load_model",
    "make_portable",
]
