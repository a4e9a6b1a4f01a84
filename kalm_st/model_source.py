"""One way to turn a string into a model, with one set of errors: every place that reads a model name from a config,
a recipe step or the command line (a stage's ``model.init_from``, a step's ``model`` or ``teacher``, ``kalm-st eval``,
``kalm-st push``, a soup's ingredients, ``kalm-st convert``) calls :func:`resolve_model`.

A value is, in this order:

- ``builtin:NAME``: an offline model from an installed wheel (:mod:`kalm_st.recipe.backbones`);
- a local folder: a sentence-transformers model (``modules.json``), the released KaLM layout (a sentence-transformers
  folder over a decoder with remote code in ``auto_map``: rebuilt bidirectional in memory, as ``kalm-st convert``
  does on disk), or a decoder checkpoint (``config.json``: made bidirectional by :func:`kalm_st.build_model`);
- a Hub id (``ORG/NAME``, when the Hub is online): a decoder backbone or a ready embedder, as the caller says.

Errors name where the value came from (``what``, e.g. ``stage.yaml: model.init_from``) and the value; a folder that is
not a model but holds one in ``final/`` (a stage's or a step's output folder) gets a hint to that folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from kalm_st.io import read_json
from kalm_st.model import DEFAULT_MAX_SEQ_LENGTH, local_model_folder
from kalm_st.recipe.backbones import BUILTIN_PREFIX


def decoder_settings(folder: Path) -> dict[str, Any]:
    """What :func:`kalm_st.build_model` needs to rebuild a model folder bidirectionally: the decoder's folder, the
    truncation length, and, for a sentence-transformers folder over a decoder, its pooling's ``include_prompt`` and
    its prompts. Refuses a folder whose modules kalm-st has no equivalent for (pooling other than mean, ...)."""
    if not (folder / "modules.json").exists():
        return {"backbone": folder, "max_seq_length": DEFAULT_MAX_SEQ_LENGTH}
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{folder / 'modules.json'} lists no modules.")
    backbone = folder / modules[0].get("path", "")
    settings: dict[str, Any] = {"backbone": backbone, "max_seq_length": DEFAULT_MAX_SEQ_LENGTH}
    st_config = backbone / "sentence_bert_config.json"
    if st_config.exists():
        settings["max_seq_length"] = read_json(st_config).get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
    for entry in modules[1:]:
        kind = entry["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = read_json(folder / entry["path"] / "config.json")
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
                    f"{folder / entry['path'] / 'config.json'}: pooling mode {mode!r} is not mean pooling; "
                    "kalm-st models mean-pool (KaLM-V2)."
                )
            settings["include_prompt"] = pooling.get("include_prompt", True)
        elif kind not in ("Normalize",):
            raise ValueError(
                f"{folder / 'modules.json'}: module {entry['type']!r} has no kalm-st equivalent "
                "(expected a decoder Transformer, mean Pooling and Normalize)."
            )
    st_model_config = folder / "config_sentence_transformers.json"
    if st_model_config.exists():
        prompts = read_json(st_model_config).get("prompts")
        if prompts:
            settings["source_prompts"] = prompts
    return settings


def is_released_layout(folder: Path) -> bool:
    """A sentence-transformers folder whose decoder needs remote code (``auto_map``, the released KaLM-V2 models):
    loaded as it is, transformers would run its own class causally; it is rebuilt bidirectional instead."""
    try:
        first = read_json(folder / "modules.json")[0]
        return "auto_map" in read_json(folder / first.get("path", "") / "config.json")
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return False


def builtin_folder(name: str, builtin_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """A ``builtin:NAME`` model as a folder: a wheel's own folder, or a backbone written once (atomically) under
    ``builtin_dir``."""
    from kalm_st.io import atomic_directory
    from kalm_st.recipe.backbones import BUILTIN_BACKBONES, BUILTIN_MODELS, builtin_model_dir, write_builtin_backbone

    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_BACKBONES + BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + b for b in BUILTIN_BACKBONES + BUILTIN_MODELS)
        raise ValueError(f"{name!r} is not a built-in model (known: {known}).")
    ready = builtin_model_dir(name)
    if ready is not None:
        return ready
    folder = Path(builtin_dir) / key
    if not (folder / "config.json").is_file():
        with atomic_directory(folder) as tmp:
            write_builtin_backbone(name, tmp, seed=seed)
    return folder


def resolve_model(
    value: str | os.PathLike[str],
    *,
    what: str = "model",
    hub: Literal["backbone", "embedder"] = "backbone",
    builtin_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    max_seq_length: int | None = None,
    device: str | None = None,
) -> Any:
    """The model ``value`` names (module docstring), as a :class:`~kalm_st.model.KaLMSentenceTransformer`.

    Args:
        value: ``builtin:NAME``, a folder, or a Hub id.
        what: Where the value came from, for errors (``stage.yaml: model.init_from``, ``step 'mine': model``).
        hub: What a Hub id is: a decoder ``backbone`` made bidirectional, or a ready sentence-transformers
            ``embedder`` (a teacher, a model to evaluate).
        builtin_dir: Where a built-in backbone is written once (default: a temporary folder, removed after loading).
        seed: Seed of a built-in backbone's random weights.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``; None: the loader's default.
        attn_implementation: transformers attention back-end (default: transformers' choice).
        max_seq_length: Truncation length (default: the model's own, 512 for a bare decoder).
        device: Torch device (default: sentence-transformers' choice).
    """
    from kalm_st.model import build_model, load_model, resolve_dtype

    text = os.fspath(value)
    build: dict[str, Any] = {"attn_implementation": attn_implementation, "device": device, "seed": seed}
    if dtype is not None:
        build["dtype"] = dtype
    if text.startswith(BUILTIN_PREFIX):
        scratch = tempfile.TemporaryDirectory(prefix="kalm-st-builtin-") if builtin_dir is None else None
        try:
            try:
                folder = builtin_folder(text, builtin_dir or scratch.name, seed)  # type: ignore[union-attr]
            except ValueError as error:
                raise ValueError(f"{what}: {error}") from error
            return resolve_model(folder, what=what, dtype=dtype, attn_implementation=attn_implementation,
                                 max_seq_length=max_seq_length, device=device)  # fmt: skip
        finally:
            if scratch is not None:
                scratch.cleanup()
    path = local_model_folder(text, what)
    if path is not None and (path / "modules.json").is_file() and not is_released_layout(path):
        model_kwargs: dict[str, Any] = {}
        if dtype is not None:
            model_kwargs["dtype"] = resolve_dtype(dtype)
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        model = load_model(path, model_kwargs=model_kwargs, device=device)
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        return model
    if path is not None:
        settings = decoder_settings(path)
        return build_model(
            settings["backbone"],
            max_seq_length=max_seq_length or settings["max_seq_length"],
            include_prompt=settings.get("include_prompt", True),
            **build,
        )
    if hub == "embedder":
        model = load_model(text, device=device, **({"model_kwargs": {"dtype": resolve_dtype(dtype)}} if dtype else {}))
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        return model
    return build_model(text, max_seq_length=max_seq_length or DEFAULT_MAX_SEQ_LENGTH, **build)


__all__ = ["builtin_folder", "decoder_settings", "is_released_layout", "resolve_model"]
