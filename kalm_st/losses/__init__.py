"""KaLM-Embedding-V2's losses as sentence-transformers losses (METHOD.md §3).

- :class:`FocalInfoNCE`: focal-reweighted InfoNCE over in-batch, hard and (optionally) mixed negatives;
- :class:`HardNegativeMixing`: the online hard-negative mixing option of the focal losses;
- :class:`CachedFocalInfoNCE`: the same with GradCache;
- :class:`ContrastiveDistillation`: ``L_focal + alpha * KL(teacher || student)`` in one forward pass;
- :class:`EmbeddingDistillation`: a base loss plus embedding-level distillation through a trainable projection
  (:func:`fit_projection`: its ridge-fitted start; :class:`kalm_st.loss_state.LossStateCallback` checkpoints the
  projection and keeps it identical across processes, as it does hard-negative mixing's generator);
- :class:`FalseNegativeLoggingCallback`: logs the optional false-negative mask's count (``false_negative_mask=True``);
- :func:`kalm_matryoshka`: sentence-transformers' ``MatryoshkaLoss`` with KaLM's dims and weights.

The maths lives once, in :mod:`kalm_st.losses.functional`.
"""

from __future__ import annotations

from kalm_st.losses import functional
from kalm_st.losses._citations import FOCAL_LOSS_BIBTEX, GRADCACHE_BIBTEX, KALM_V2_BIBTEX, MOCHI_BIBTEX
from kalm_st.losses.cached_focal_info_nce import CachedFocalInfoNCE
from kalm_st.losses.contrastive_distillation import ContrastiveDistillation
from kalm_st.losses.embedding_distillation import EmbeddingDistillation, distillation_losses
from kalm_st.losses.false_negative_logging import FalseNegativeLoggingCallback
from kalm_st.losses.focal_info_nce import FocalInfoNCE
from kalm_st.losses.hard_negative_mixing import HardNegativeMixing
from kalm_st.losses.matryoshka import MATRYOSHKA_DIMS, MATRYOSHKA_WEIGHTS, kalm_matryoshka, matryoshka_dims_for
from kalm_st.losses.projection_init import fit_projection, ridge_projection

__all__ = [
    "FOCAL_LOSS_BIBTEX",
    "GRADCACHE_BIBTEX",
    "KALM_V2_BIBTEX",
    "MATRYOSHKA_DIMS",
    "MATRYOSHKA_WEIGHTS",
    "MOCHI_BIBTEX",
    "CachedFocalInfoNCE",
    "ContrastiveDistillation",
    "EmbeddingDistillation",
    "FalseNegativeLoggingCallback",
    "FocalInfoNCE",
    "HardNegativeMixing",
    "distillation_losses",
    "fit_projection",
    "functional",
    "kalm_matryoshka",
    "matryoshka_dims_for",
    "ridge_projection",
]
