"""The stage's final save: one portable folder whatever trained it (DDP, FSDP2, LoRA).

Under FSDP2 the full weights are gathered once, to rank 0's CPU memory; with LoRA the adapters are merged into the
weights (:mod:`kalm_st.lora`), so ``final/`` loads with plain ``SentenceTransformer`` and no kalm-st or peft import.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kalm_st.recipe.config import StageConfig

logger = logging.getLogger(__name__)


def save_final_model(trainer: Any, model: Any, path: str | os.PathLike[str], config: StageConfig) -> None:
    """Write ``path`` on rank 0 (a collective under FSDP2: every rank calls it)."""
    from kalm_st.distributed.sharded_trainer import ShardedTrainer

    if isinstance(trainer, ShardedTrainer):
        plain = trainer.unsharded_model()
    else:
        plain = model if trainer.is_world_process_zero() else None
    if plain is not None:
        lora = config.model.lora if config.model is not None else None
        if lora is not None:
            from kalm_st.lora import save_lora_model

            save_lora_model(plain, path, adapter=lora.save == "adapter")
        else:
            plain.save(str(path))  # KaLMSentenceTransformer.save is atomic and portable
        logger.info("Final model written to %s", path)
    trainer.accelerator.wait_for_everyone()


__all__ = ["save_final_model"]
