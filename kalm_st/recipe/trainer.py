"""The Trainer kalm-st trains with: sentence-transformers' own, minus the automatic model card's bookkeeping.

kalm-st writes its own card into every final model folder (:func:`kalm_st.evaluation.card.write_model_card`: stages,
data, instruction table, base model), so sentence-transformers' model-card callback would only compute widget examples
(encoding training rows, with a "Computing widget examples" bar) for a card that is replaced. ``add_model_card_callback``
is the extension point sentence-transformers documents for removing that callback.
"""

from __future__ import annotations

from typing import Any

from sentence_transformers import SentenceTransformerTrainer


class KaLMTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` without the automatic model card's callback (kalm-st writes the card)."""

    def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
        """Add nothing: the final folder gets kalm-st's card, not the automatic one this callback feeds."""


__all__ = ["KaLMTrainer"]
