"""Turn a decoder checkpoint, or a sentence-transformers folder over one (the released KaLM layout), into a
portable kalm-st model folder that plain ``SentenceTransformer(path)`` loads without ``trust_remote_code``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kalm_st.model import DEFAULT_MAX_SEQ_LENGTH, KaLMSentenceTransformer, build_model

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any] | list[Any]:
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _inspect_sentence_transformers_folder(source: Path) -> dict[str, Any]:
    """Settings of an ST folder whose first module wraps a decoder: backbone folder, max length, pooling, prompts."""
    modules = _read_json(source / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{source / 'modules.json'} lists no modules.")
    first = modules[0]
    backbone = source / first.get("path", "")
    settings: dict[str, Any] = {"backbone": backbone, "max_seq_length": DEFAULT_MAX_SEQ_LENGTH}
    st_config = backbone / "sentence_bert_config.json"
    if st_config.exists():
        settings["max_seq_length"] = _read_json(st_config).get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
    for entry in modules[1:]:
        kind = entry["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = _read_json(source / entry["path"] / "config.json")
            mode = pooling.get("pooling_mode") or next(
                (
                    k.removeprefix("pooling_mode_").removesuffix("_tokens")
                    for k, v in pooling.items()
                    if v is True and k.startswith("pooling_mode_")
                ),
                None,
            )
            if mode not in ("mean", "mean_tokens"):
                raise ValueError(
                    f"{source / entry['path'] / 'config.json'}: pooling mode {mode!r} is not mean pooling; "
                    "kalm-st models mean-pool (KaLM-V2)."
                )
            settings["include_prompt"] = pooling.get("include_prompt", True)
        elif kind not in ("Normalize",):
            raise ValueError(
                f"{source / 'modules.json'}: module {entry['type']!r} has no kalm-st equivalent "
                "(expected a decoder Transformer, mean Pooling and Normalize)."
            )
    st_model_config = source / "config_sentence_transformers.json"
    if st_model_config.exists():
        prompts = _read_json(st_model_config).get("prompts")
        if prompts:
            settings["source_prompts"] = prompts
    return settings


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
    source_path = Path(source)
    if not source_path.exists():
        raise FileNotFoundError(f"Source {os.fspath(source)!r} does not exist.")
    if (source_path / "modules.json").exists():
        settings = _inspect_sentence_transformers_folder(source_path)
    elif (source_path / "config.json").exists():
        settings = {"backbone": source_path, "max_seq_length": DEFAULT_MAX_SEQ_LENGTH}
    else:
        raise FileNotFoundError(f"{source_path} has neither modules.json nor config.json: not a model folder.")
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
