"""Turn a decoder checkpoint, or a sentence-transformers folder over one (the released KaLM layout), into a
portable kalm-st model folder that plain ``SentenceTransformer(path)`` loads without ``trust_remote_code``."""

from __future__ import annotations

import logging
import os

import torch

from kalm_st.model import KaLMSentenceTransformer, build_model, local_model_folder
from kalm_st.model_source import decoder_settings

logger = logging.getLogger(__name__)


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = "auto",
    max_seq_length: int | None = None,
    keep_prompts: bool = False,
) -> KaLMSentenceTransformer:
    """Convert ``source`` into a portable kalm-st model saved (atomically) at ``destination``.

    Args:
        source: A decoder checkpoint folder (``config.json`` + weights + tokenizer) or a sentence-transformers folder
            whose first module wraps one (the released KaLM-V2 layout: Transformer, Pooling(mean), Normalize). Any
            ``auto_map`` remote code is ignored: the weights are loaded into transformers' own class for the
            ``model_type``, made bidirectional with ``config.is_causal = False``.
        destination: Output folder.
        dtype: Weights dtype of the output (``"auto"``: bfloat16 on a GPU, float32 on CPU).
        max_seq_length: Override of the truncation length (default: the source's, else 512).
        keep_prompts: Keep the source's prompt table instead of installing the kalm-st instruction table.
    """
    source_path = local_model_folder(source, "Source")
    if source_path is None:
        raise FileNotFoundError(
            f"Source {os.fspath(source)!r} is a Hub id; convert reads a local folder (download it)."
        )
    settings = decoder_settings(source_path)
    model = build_model(
        settings["backbone"],
        max_seq_length=max_seq_length or settings["max_seq_length"],
        dtype=dtype,
        include_prompt=settings.get("include_prompt", True),
        prompts=settings.get("source_prompts") if keep_prompts else None,
    )
    config = model[0].auto_model.config
    if getattr(config, "auto_map", None):
        # The remote code is what forced trust_remote_code; transformers' own class now does the job.
        logger.info("Dropping auto_map %s from the converted config.", config.auto_map)
        config.auto_map = None
        del config.auto_map
    model.save(os.fspath(destination))
    return model
