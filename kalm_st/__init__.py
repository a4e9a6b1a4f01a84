"""kalm-st: the KaLM-Embedding-V2 recipe as a sentence-transformers plugin.

Bidirectional decoder embedders (:func:`build_model`), KaLM's losses (:mod:`kalm_st.losses`), data curation
(:mod:`kalm_st.data`), the multi-stage training recipe (:mod:`kalm_st.recipe`) and MTEB evaluation
(:mod:`kalm_st.evaluation`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from kalm_st.instructions import KALM_INSTRUCTION_TEMPLATE, TASK_INSTRUCTIONS, build_prompts, format_instruction
from kalm_st.model import MATRYOSHKA_DIMS, KaLMSentenceTransformer, build_model, load_model, make_portable

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
