"""``build_model`` and the sentence-transformers model class whose saves load anywhere without kalm-st."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kalm_st.instructions import build_prompts
from kalm_st.io import atomic_directory, damaged_files, write_json_atomic
from kalm_st.modules.bidirectional_decoder import (
    MIN_TRANSFORMERS_VERSION,
    BidirectionalDecoder,
    check_supported_config,
    require_bidirectional_support,
)
from kalm_st.modules.mean_pooling import MeanPooling
from kalm_st.precision import use_bf16
from kalm_st.serving.runtime_files import write_runtime_files

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "Qwen/Qwen2-0.5B"
DEFAULT_MAX_SEQ_LENGTH = 512
MATRYOSHKA_DIMS: tuple[int, ...] = (896, 512, 256, 128, 64)
"""KaLM-V2's Matryoshka dimensions for the 896-d Qwen2-0.5B [read, authors' train script]."""

# Written into config_sentence_transformers.json after every save: sentence-transformers checks it at load time and
# raises a clear ImportError on a transformers that would run the model causally (it drops the key itself on save).
MODEL_REQUIREMENTS: dict[str, dict[str, str]] = {
    "transformers": {
        "specifier": f">={MIN_TRANSFORMERS_VERSION}",
        "reason": "config.is_causal=False (bidirectional attention) is silently ignored before transformers 5.2",
    }
}


def _stock_class_ref(module: torch.nn.Module) -> tuple[str, str]:
    """``(modules.json type, class name)`` of the nearest sentence-transformers ancestor of ``module``'s class."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("sentence_transformers."):
            return f"{cls.__module__}.{cls.__name__}", cls.__name__
    raise TypeError(
        f"{type(module).__name__} does not derive from a sentence-transformers module; cannot save it portably."
    )


def make_portable(path: str | os.PathLike[str]) -> None:
    """Rewrite a saved model folder so plain ``SentenceTransformer(path)`` loads it without ``trust_remote_code``.

    kalm-st modules subclass stock ones and add behaviour only, so each is recorded under its stock ancestor (and
    its stock folder name); the transformers floor goes into ``config_sentence_transformers.json``. Then
    :func:`kalm_st.serving.runtime_files.write_runtime_files` writes what vLLM, text-embeddings-inference and
    llama.cpp need to read the folder as sentence-transformers does (legacy module paths, the dual-format pooling
    file, ``max_seq_length``, ``use_bidirectional_attention``).
    """
    folder = Path(path)
    modules_path = folder / "modules.json"
    modules = json.loads(modules_path.read_text(encoding="utf8"))
    for entry in modules:
        if entry["type"].startswith("sentence_transformers."):
            continue
        module_cls = _import_class(entry["type"])
        stock_type, stock_name = _stock_class_ref(module_cls.__new__(module_cls))
        entry["type"] = stock_type
        if entry["path"] and entry["path"] == f"{entry['idx']}_{module_cls.__name__}":
            new_path = f"{entry['idx']}_{stock_name}"
            (folder / entry["path"]).rename(folder / new_path)
            entry["path"] = new_path
    modules_path.write_text(json.dumps(modules, indent=2), encoding="utf8")
    config_path = folder / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text(encoding="utf8")) if config_path.exists() else {}
    config["requirements"] = MODEL_REQUIREMENTS
    write_json_atomic(config_path, config)
    write_runtime_files(folder)


def _import_class(class_ref: str) -> type:
    import importlib

    module_name, _, class_name = class_ref.rpartition(".")
    if not module_name.startswith("kalm_st."):
        raise ValueError(f"Refusing to import non-kalm-st class {class_ref!r} while making a model portable.")
    return getattr(importlib.import_module(module_name), class_name)


class KaLMSentenceTransformer(SentenceTransformer):
    """A :class:`~sentence_transformers.SentenceTransformer` with kalm-st's module classes and portable saves.

    - ``save`` (and so ``save_pretrained``, Trainer checkpoints and ``push_to_hub``) writes the stock format
      atomically: plain ``SentenceTransformer(path)`` loads the folder in an interpreter that never imports kalm-st,
      with no ``trust_remote_code``, and gives the same embeddings.
    - Loading a folder with this class gives kalm-st's classes back: a stock ``Transformer`` over a supported
      decoder with ``is_causal: false`` becomes :class:`~kalm_st.modules.BidirectionalDecoder`, a mean ``Pooling``
      becomes :class:`~kalm_st.modules.MeanPooling`.
    - ``encode`` rejects ``None``, ``bytes`` and non-string items with a ``TypeError`` naming the index (the stock
      class fails deep inside the tokenizer). An empty text embeds as the zero vector (cosine 0 to every text),
      alone or in a batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for module in self._modules.values():
            if type(module) is Transformer and getattr(module.auto_model.config, "is_causal", True) is False:
                BidirectionalDecoder.from_transformer(module)
            elif type(module) is Pooling and module.pooling_mode in ("mean", ("mean",)):
                MeanPooling.from_pooling(module)

    def save(
        self,
        path: str,
        model_name: str | None = None,
        create_model_card: bool = True,
        train_datasets: list[str] | None = None,
        safe_serialization: bool = True,
    ) -> None:
        if path is None:
            return
        with atomic_directory(path) as tmp:
            super().save(
                str(tmp),
                model_name=model_name,
                create_model_card=create_model_card,
                train_datasets=train_datasets,
                safe_serialization=safe_serialization,
            )
            make_portable(tmp)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Any = None, **kwargs: Any) -> None:
        """Recompute each backbone layer's activations in the backward (``args.activation_checkpointing``).

        transformers 5's Trainer calls this name and warns when a model only has the deprecated
        ``gradient_checkpointing_enable`` (sentence-transformers 6.2's); each transformers model inside gets its own
        ``activation_checkpointing_enable``, as sentence-transformers' method does with the old name.
        """
        for module in self.modules():
            if module is self or not hasattr(module, "activation_checkpointing_enable"):
                continue
            if getattr(module, "supports_gradient_checkpointing", True) is False:
                continue
            module.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def encode(self, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        _check_text_inputs(inputs if inputs is not None else kwargs.get("sentences"))
        return super().encode(inputs, *args, **kwargs)


def _check_text_inputs(inputs: Any) -> None:
    if isinstance(inputs, str):
        return
    if inputs is None or isinstance(inputs, (bytes, bytearray)):
        hint = ": decode it first, e.g. data.decode('utf-8')" if inputs is not None else ""
        raise TypeError(f"encode() expects a string or a list of strings, got {type(inputs).__name__}{hint}")
    if isinstance(inputs, (list, tuple)):
        for index, item in enumerate(inputs):
            if not isinstance(item, str):
                raise TypeError(f"encode() expects strings, but item {index} is {type(item).__name__}: {item!r:.80}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``"auto"``/None: bfloat16 on a GPU (KaLM trains in bf16), float32 weights on CPU.

    bf16 *compute* on a CPU comes from autocast, and only where the CPU has bf16 in hardware (``args.bf16: auto``,
    :mod:`kalm_st.precision`). An explicit ``bfloat16`` is honoured, with a warning on a CPU where it is slow.
    """
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'.")
        dtype = getattr(torch, dtype)
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        use_bf16(True, cuda=False, what="dtype=bfloat16")  # honoured; warns on a CPU where bf16 is slow
    return dtype


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_hub_model(repo_id: str, what: str) -> None:
    """A Hub id that is not cached needs the Hub: probe it once (5 s) so an unreachable Hub is one line here instead
    of transformers' retries (about 40 s) and traceback. Skipped behind a proxy, which the probe cannot follow."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=5).close()
    except OSError as error:
        raise OSError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and the Hub ({endpoint.geturl()}) cannot be "
            f"reached ({error.strerror or type(error).__name__}): check the network, or give a local folder."
        ) from None


def local_model_folder(value: str | os.PathLike[str], what: str = "Model") -> Path | None:
    """The local model folder ``value`` names, or None for a Hub id (the Hub online). Anything else raises, naming
    ``what`` and the value: a missing path, a file, a folder that is neither a sentence-transformers model nor a
    transformers checkpoint (with a hint when it holds a stage's ``final/`` model)."""
    from huggingface_hub import constants

    text = os.fspath(value)
    path = Path(text)
    if path.is_file():
        raise NotADirectoryError(f"{what} {text!r} is a file; give the model's folder.")
    if path.is_dir():
        if (path / "modules.json").is_file() or (path / "config.json").is_file():
            return path
        hint = ""
        if (path / "final" / "modules.json").is_file():
            hint = f" (it holds a model in {str(path / 'final')!r}: a stage's output folder; give that)"
        raise FileNotFoundError(f"{what} {text!r} has neither modules.json nor config.json: not a model folder{hint}.")
    if _HUB_ID.match(text) and not constants.HF_HUB_OFFLINE:
        _check_hub_model(text, what)
        return None
    offline = " (and the Hub is offline: HF_HUB_OFFLINE is set)" if _HUB_ID.match(text) else ""
    hint = " (a previous stage's output: run that stage first)" if path.name == "final" else ""
    raise FileNotFoundError(f"{what} {text!r} does not exist{offline}{hint}.")


def build_model(
    backbone: str | os.PathLike[str] | PretrainedConfig = DEFAULT_BACKBONE,
    *,
    tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    dtype: torch.dtype | str | None = "auto",
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = None,
    truncate_dim: int | None = None,
    include_prompt: bool = True,
    prompts: Mapping[str, str] | None = None,
    device: str | None = None,
    seed: int | None = 0,
    model_card_data: SentenceTransformerModelCardData | None = None,
) -> KaLMSentenceTransformer:
    """A KaLM embedder: bidirectional decoder + mean pooling + L2 normalisation (METHOD.md §1).

    Args:
        backbone: Hub id or local folder of a decoder checkpoint (default Qwen/Qwen2-0.5B), or a transformers config
            for a randomly initialised model (then ``tokenizer`` is required).
        tokenizer: Tokenizer (or its folder) when ``backbone`` is a config; ignored otherwise.
        max_seq_length: Truncation length (KaLM: 512).
        dtype: Weights dtype; ``"auto"`` is bfloat16 on a GPU and float32 on CPU.
        attn_implementation: transformers attention back-end (default: transformers' choice, sdpa).
        truncate_dim: Matryoshka dimension the model's ``encode`` truncates to (KaLM dims: 896, 512, 256, 128, 64).
        include_prompt: Whether instruction tokens count in the mean (KaLM: yes).
        prompts: Prompt table; default the whole KaLM instruction table (:func:`kalm_st.instructions.build_prompts`).
        device: Torch device; default sentence-transformers' choice.
        seed: Seed of the random initialisation when ``backbone`` is a config.
        model_card_data: Model card metadata; default one that never calls the Hub.

    Returns:
        A :class:`KaLMSentenceTransformer`. Its saves load with plain ``SentenceTransformer(path)``.
    """
    require_bidirectional_support()
    torch_dtype = resolve_dtype(dtype)
    model_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    if model_card_data is None:
        model_card_data = SentenceTransformerModelCardData(local_files_only=True)

    with tempfile.TemporaryDirectory(prefix="kalm-st-init-") as scratch:
        if isinstance(backbone, PretrainedConfig):
            if tokenizer is None:
                raise ValueError("build_model(config) needs `tokenizer=` (a tokenizer or its folder).")
            check_supported_config(backbone, source="the given config")
            if seed is not None:
                torch.manual_seed(seed)
            # is_main_process: under torchrun every rank materialises its own copy (transformers would skip
            # the write on ranks > 0 and the load below would fail).
            AutoModel.from_config(backbone, dtype=torch_dtype).save_pretrained(scratch, is_main_process=True)
            if not isinstance(tokenizer, PreTrainedTokenizerBase):
                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            tokenizer.save_pretrained(scratch)
            source = scratch
        else:
            source = os.fspath(backbone)
            local_model_folder(source, "Backbone")
        transformer = BidirectionalDecoder(
            source,
            max_seq_length=max_seq_length,
            model_kwargs=model_kwargs,
        )  # pinned to plain-text input (no chat template): see BidirectionalDecoder
        pooling = MeanPooling(transformer.get_embedding_dimension(), include_prompt=include_prompt)
        model = KaLMSentenceTransformer(
            modules=[transformer, pooling, Normalize()],
            prompts=dict(build_prompts() if prompts is None else prompts),
            truncate_dim=truncate_dim,
            device=device,
            model_card_data=model_card_data,
        )
    return model


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> KaLMSentenceTransformer:
    """Load a saved model with kalm-st's classes (plain ``SentenceTransformer(path)`` works too).

    A local folder is checked first: one that is not a model, or holds a damaged file (truncated weights, unparsable
    JSON; :func:`kalm_st.io.damaged_files`), is refused with the file named, not with a deep loader error.
    """
    folder = local_model_folder(path, "Model")
    if folder is not None:
        damaged = damaged_files(folder)
        if damaged:
            raise ValueError(f"Model folder {os.fspath(path)!r} is damaged: {'; '.join(damaged)}.")
    kwargs.setdefault("model_card_data", SentenceTransformerModelCardData(local_files_only=True))
    return KaLMSentenceTransformer(os.fspath(path), **kwargs)
