"""How each serving runtime reads a saved folder, re-stated from its source (read 2026-12-01, not run here).

Each function is a minimal restatement of the reader's logic, not its code: what it matches in ``modules.json``, which
keys of ``1_Pooling/config.json`` it uses and what it does when they are missing. They let the tests check a save
against every reader without installing the runtimes (none runs on this CPU-only machine).
"""

from __future__ import annotations

import json
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf8"))


def _mode_from_key(key: str) -> str:
    # vLLM's parse_pooling_type: strip "pooling_mode_", keep the part before the first "_", "lasttoken" -> LAST.
    name = key.replace("pooling_mode_", "").split("_", 1)[0]
    return "LAST" if "lasttoken" in name else name.upper()


def vllm_before_fix(folder: Path) -> dict:
    """vLLM ``get_pooling_config`` before the 2026-08-31 fix: exact legacy type strings, ``True``-valued keys only.

    Returns ``{}`` when it finds no Pooling module: vLLM then uses the architecture's default pooler (last token).
    """
    modules = _json(folder / "modules.json")
    pooling = next((m for m in modules if m["type"] == "sentence_transformers.models.Pooling"), None)
    normalize = any(m["type"] == "sentence_transformers.models.Normalize" for m in modules)
    if pooling is None:
        return {}
    config = {"use_activation": normalize}
    for key, value in _json(folder / pooling["path"] / "config.json").items():
        if value is True and _mode_from_key(key) in {"MEAN", "CLS", "LAST", "MAX"}:
            config["seq_pooling_type"] = _mode_from_key(key)
    return config


def vllm_after_fix(folder: Path) -> dict:
    """vLLM ``vllm/transformers_utils/config.py`` at commit 0036026e: legacy or v6 type strings, and ``pooling_mode``."""
    pooling_types = {
        "sentence_transformers.models.Pooling",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    }
    normalize_types = {
        "sentence_transformers.models.Normalize",
        "sentence_transformers.base.modules.normalize.Normalize",
        "sentence_transformers.sentence_transformer.modules.normalize.Normalize",
    }
    modules = _json(folder / "modules.json")
    pooling = next((m for m in modules if m["type"] in pooling_types), None)
    if pooling is None:
        return {}
    config = {"use_activation": any(m["type"] in normalize_types for m in modules)}
    for key, value in _json(folder / pooling["path"] / "config.json").items():
        name = value if key == "pooling_mode" and isinstance(value, str) else key if value is True else None
        if name is not None and _mode_from_key(name) in {"MEAN", "CLS", "LAST", "MAX"}:
            config["seq_pooling_type"] = _mode_from_key(name)
    return config


def text_embeddings_inference(folder: Path) -> dict:
    """text-embeddings-inference ``router/src/lib.rs`` at commit a28ad28f (no ``--pooling`` given).

    ``PoolConfig`` requires the booleans ``pooling_mode_cls_token`` and ``pooling_mode_mean_tokens`` (serde fails
    otherwise: the server does not start); the first ``sentence_bert_config.json`` found must hold
    ``max_seq_length``. For ``model_type == "qwen2"`` it appends ``<|endoftext|>`` (id 151643) to every input.
    """
    pool = _json(folder / "1_Pooling" / "config.json")
    for key in ("pooling_mode_cls_token", "pooling_mode_mean_tokens"):
        if not isinstance(pool.get(key), bool):
            raise ValueError(f"Failed to parse `1_Pooling/config.json`: missing field `{key}`")
    if pool["pooling_mode_cls_token"]:
        pooling = "cls"
    elif pool["pooling_mode_mean_tokens"]:
        pooling = "mean"
    elif pool.get("pooling_mode_lasttoken") is True:
        pooling = "last_token"
    else:
        raise ValueError(f"Pooling config {pool} is not supported")
    st_config = folder / "sentence_bert_config.json"
    max_input_length = None
    if st_config.is_file():
        value = _json(st_config).get("max_seq_length")
        if not isinstance(value, int):
            raise ValueError("Failed to parse `sentence_bert_config.json`: missing field `max_seq_length`")
        max_input_length = value
    return {"pooling": pooling, "max_input_length": max_input_length}


def llama_cpp_converter_before_2026_04(folder: Path) -> str | None:
    """Older ``convert_hf_to_gguf.py`` ``_try_set_pooling_type``: exact legacy Pooling type, indexes the booleans."""
    modules = _json(folder / "modules.json")
    path = next((m["path"] for m in modules if m["type"] == "sentence_transformers.models.Pooling"), None)
    if path is None:
        return None  # no pooling type written: llama.cpp then needs --pooling at run time
    pooling = _json(folder / path / "config.json")
    if pooling["pooling_mode_mean_tokens"]:  # KeyError on the compact v6 file, as in the converter
        return "MEAN"
    if pooling["pooling_mode_cls_token"]:
        return "CLS"
    if pooling["pooling_mode_lasttoken"]:
        return "LAST"
    raise NotImplementedError("Only MEAN, CLS, and LAST pooling types supported")


def llama_cpp_converter_current(folder: Path) -> tuple[str | None, bool | None]:
    """``convert_hf_to_gguf.py`` at commit 0024aa74: any ``*Pooling`` type, booleans or ``pooling_mode``; and
    ``attention.causal = false`` when ``config.json`` has ``is_causal: false``. Returns (pooling, causal)."""
    modules = _json(folder / "modules.json")
    path = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    pooling_type = None
    if path is not None:
        pooling = _json(folder / path / "config.json")
        if pooling.get("pooling_mode_mean_tokens"):
            pooling_type = "MEAN"
        elif pooling.get("pooling_mode_cls_token"):
            pooling_type = "CLS"
        elif pooling.get("pooling_mode_lasttoken"):
            pooling_type = "LAST"
        else:
            pooling_type = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}.get(pooling.get("pooling_mode"))
    causal = False if _json(folder / "config.json").get("is_causal") is False else None
    return pooling_type, causal
