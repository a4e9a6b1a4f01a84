"""A decoder LLM with its causal mask removed, as a sentence-transformers input module (METHOD.md §1)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from packaging.version import Version
from sentence_transformers.base.modules import Transformer
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from kalm_st.modules.real_tokens import (
    DEFAULT_BUCKET_RATIO,
    DEFAULT_PACK_ROW_TOKENS,
    REAL_TOKEN_MODES,
    RealTokenMode,
    TokenLayout,
    bucketed_forward,
    choose_mode,
    packed_forward,
)

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS_VERSION = "5.2.0"
# transformers < 5.2 silently ignores ``config.is_causal = False`` and runs decoders causally.
TEXT_ONLY_MODALITY: dict[str, dict[str, str]] = {
    "text": {"method": "forward", "method_output_name": "last_hidden_state"}
}
"""sentence-transformers' ``modality_config`` for plain text only. sentence-transformers 6 adds a ``"message"``
modality when the tokenizer has a chat template (the real Qwen2 tokenizer does) and then renders every input through
it, the instruction as a system message. KaLM embeds ``instruction + text`` as plain text, as vLLM,
text-embeddings-inference, llama.cpp and the ONNX encoder do, so kalm-st models pin the text modality."""

_TRANSFORMERS_SUPPORTS_IS_CAUSAL_FALSE = Version(transformers.__version__) >= Version(MIN_TRANSFORMERS_VERSION)

SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(
    {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}
)
"""Decoder families whose attention honours ``config.is_causal = False`` in transformers >= 5.2, each checked by
``tests/test_bidirectional.py`` (the first token's state moves when only the last token changes)."""


def require_bidirectional_support() -> None:
    """Raise ``ImportError`` when the installed transformers would silently run a decoder causally."""
    if not _TRANSFORMERS_SUPPORTS_IS_CAUSAL_FALSE:
        raise ImportError(
            f"kalm-st needs transformers>={MIN_TRANSFORMERS_VERSION} for bidirectional decoders: "
            f"transformers {transformers.__version__} ignores `config.is_causal = False` and would run the model "
            f"causally without any error. Upgrade with `pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'`."
        )


def check_supported_config(config: PretrainedConfig, source: str = "the backbone") -> None:
    """Raise ``ValueError`` naming the architecture when ``config`` is not a supported decoder."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    architectures = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
    # A causal-LM family that is not also a masked-LM family (BERT is both) is a decoder.
    is_decoder_config = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    hint = (
        "it is a decoder kalm-st has not verified as bidirectional"
        if is_decoder_config
        else "it is not a decoder LLM (encoder-only models are already bidirectional: use the stock "
        "sentence_transformers Transformer module)"
    )
    raise ValueError(
        f"Unsupported architecture {architectures} (model_type={model_type!r}) in {source}: {hint}. "
        f"Supported decoder model types: {sorted(SUPPORTED_MODEL_TYPES)}."
    )


class BidirectionalDecoder(Transformer):
    """A Hugging Face decoder (Qwen2 first; Qwen3, Llama, Mistral, Gemma, Phi-3) with fully bidirectional attention.

    KaLM-Embedding-V2 removes the causal mask of its Qwen2-0.5B backbone at training and inference time. In
    transformers >= 5.2 this is the persisted config flag ``config.is_causal = False``, honoured by the eager, sdpa,
    flex and flash-attention back-ends. This module sets it on the loaded config (``config_kwargs`` would silently
    drop it), refuses a transformers version that would ignore it, and refuses architectures it has not verified.

    On disk it is exactly the stock :class:`~sentence_transformers.base.modules.Transformer` (with ``"is_causal":
    false`` in ``config.json``), so a saved model loads with plain ``SentenceTransformer(path)``, still bidirectional.

    Padding: Qwen tokenizers pad on the right, which needs nothing special. For a left-padded batch the module passes
    ``position_ids = cumsum(attention_mask) - 1`` so every text gets the rotary positions it has alone (the stock
    module's default positions differ from that by < 1e-6, since RoPE is shift-invariant). A tokenizer without a
    padding token gets its end-of-sequence token as padding.

    Real tokens only (``real_tokens``, default ``"auto"``): a padded text batch (training, ``encode``, mining,
    evaluation) is not run as padded. Its texts are packed into rows with a block-diagonal bidirectional mask and
    per-text positions (``"pack"``), or run in length buckets (``"bucket"``), and the token states are put back in
    the padded layout (zeros at padding): the same embeddings, a fraction of the compute
    (:mod:`kalm_st.modules.real_tokens`). ``"off"`` runs the padded batch as the stock module does. The setting is
    runtime only and not saved, so the saved folder stays the stock format. Under flash-attention 2,
    sentence-transformers' own ``unpad_inputs`` flattening is used instead.

    Args:
        model_name_or_path: Hub id or local directory of a decoder checkpoint (``*ForCausalLM`` or base model; the
            LM head is not loaded).
        max_seq_length: Truncation length in tokens (KaLM trains and evaluates at 512).
        **kwargs: Any keyword of the stock ``Transformer`` (``model_kwargs``, ``processor_kwargs``, ...).
    """

    def __init__(self, model_name_or_path: str, *, max_seq_length: int | None = 512, **kwargs: Any) -> None:
        require_bidirectional_support()
        config_kwargs = kwargs.get("config_kwargs") or {}
        if "is_causal" in config_kwargs:
            # transformers drops unknown config kwargs; the flag is set on the loaded config below instead.
            raise ValueError(
                "Do not pass `is_causal` in `config_kwargs`: transformers drops it silently. "
                "BidirectionalDecoder sets `config.is_causal = False` itself."
            )
        model_kwargs = kwargs.get("model_kwargs") or {}
        config = AutoConfig.from_pretrained(
            model_name_or_path,
            **{k: v for k, v in model_kwargs.items() if k in ("revision", "token", "trust_remote_code")},
        )
        check_supported_config(config, source=str(model_name_or_path))
        if "modality_config" not in kwargs:
            # Plain text only: sentence-transformers 6 renders text through the tokenizer's chat template whenever
            # the tokenizer has one (Qwen2 / SmolLM2 tokenizers do), turning "Instruct: ... \n Query: " prompts into a
            # system message. KaLM embeds the plain string; the pinned config is saved with the model.
            kwargs = {**kwargs, "modality_config": dict(TEXT_ONLY_MODALITY), "module_output_name": "token_embeddings"}
        super().__init__(model_name_or_path, max_seq_length=max_seq_length, **kwargs)
        self._make_bidirectional()

    @classmethod
    def from_transformer(cls, module: Transformer) -> BidirectionalDecoder:
        """Promote an already loaded stock ``Transformer`` (e.g. from ``SentenceTransformer(path)``) in place.

        The subclass adds behaviour only, no state, so the weights and tokenizer are shared, not copied.
        """
        require_bidirectional_support()
        check_supported_config(module.auto_model.config, source=type(module.auto_model).__name__)
        if "message" in module.modality_config:
            logger.warning(
                "%s was saved with the chat-template ('message') input mode: texts are rendered through the "
                "tokenizer's chat template, unlike KaLM, which embeds plain text (models kalm-st builds are pinned "
                "to plain text). Kept as saved.",
                type(module.auto_model).__name__,
            )
        module.__class__ = cls
        module._make_bidirectional()
        return module

    def _make_bidirectional(self) -> None:
        self.auto_model.config.is_causal = False
        self.real_tokens = getattr(self, "real_tokens", "auto")
        self.pack_row_tokens = getattr(self, "pack_row_tokens", DEFAULT_PACK_ROW_TOKENS)
        self.bucket_ratio = getattr(self, "bucket_ratio", DEFAULT_BUCKET_RATIO)
        tokenizer = self.tokenizer
        if tokenizer is not None and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"The tokenizer of {type(self.auto_model).__name__} has neither a padding nor an "
                    "end-of-sequence token; set `tokenizer.pad_token` before building the model."
                )
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def is_bidirectional(self) -> bool:
        return getattr(self.auto_model.config, "is_causal", True) is False

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        input_ids = features.get("input_ids")
        if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] == 0:
            # A batch of empty texts has no tokens: transformers cannot run on it, so return no token embeddings.
            # Mean pooling then gives the zero vector, as for an empty text in a batch with non-empty ones.
            hidden = self.auto_model.config.hidden_size
            features["token_embeddings"] = torch.zeros(
                (input_ids.shape[0], 0, hidden), dtype=self.auto_model.dtype, device=input_ids.device
            )
            return features
        mode = self._real_token_mode(features, kwargs.get("is_causal"))
        if mode != "off":
            return self._real_token_forward(features, mode, **kwargs)
        attention_mask = features.get("attention_mask")
        if (
            attention_mask is not None
            and attention_mask.ndim == 2
            and "position_ids" not in features
            and not bool(attention_mask[:, 0].all())
        ):
            # Left padding: give each text the positions it has alone.
            features["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return super().forward(features, **kwargs)

    @property
    def real_tokens(self) -> RealTokenMode:
        """How padded text batches are run: ``"auto"`` (default), ``"pack"``, ``"bucket"`` or ``"off"``."""
        return self._real_tokens

    @real_tokens.setter
    def real_tokens(self, value: RealTokenMode) -> None:
        if value not in REAL_TOKEN_MODES:
            raise ValueError(f"real_tokens must be one of {list(REAL_TOKEN_MODES)}, got {value!r}")
        self._real_tokens = value

    def _real_token_mode(self, features: dict[str, Any], is_causal: bool | None = None) -> str:
        """``"pack"``/``"bucket"`` for a padded plain-text batch whose padding can be skipped exactly, else ``"off"``."""
        if self.real_tokens == "off":
            return "off"
        input_ids = features.get("input_ids")
        attention_mask = features.get("attention_mask")
        config = self.auto_model.config
        if (
            not isinstance(input_ids, torch.Tensor)
            or not isinstance(attention_mask, torch.Tensor)
            or input_ids.ndim != 2
            or attention_mask.shape != input_ids.shape
            or features.get("modality", "text") != "text"
            or "position_ids" in features  # caller's own positions (or a flattened flash-attention batch)
            or "cu_seq_lens_q" in features
            or "inputs_embeds" in features
            or getattr(config, "output_hidden_states", False)
            # a causal model, or a causal call (a control): the block mask is bidirectional
            or (is_causal if is_causal is not None else getattr(config, "is_causal", True) is not False)
        ):
            return "off"
        mask = attention_mask.bool()
        if bool(mask.all()):
            return "off"
        # Exact only when each text's tokens are contiguous (left or right padding, as tokenizers pad).
        steps = mask.to(torch.int8).diff(dim=1)
        if not bool(((steps <= 0).all(dim=1) | (steps >= 0).all(dim=1)).all()):
            return "off"
        mode = choose_mode(TokenLayout.of(attention_mask), self.real_tokens)
        if mode == "pack" and config._attn_implementation not in ("sdpa", "eager"):
            return "bucket"  # a dense block mask is for sdpa / eager; flash / flex run buckets
        return mode

    def _real_token_forward(self, features: dict[str, Any], mode: str, **kwargs: Any) -> dict[str, Any]:
        input_ids = features["input_ids"]
        layout = TokenLayout.of(features["attention_mask"])
        pad_token_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        eager = self.auto_model.config._attn_implementation == "eager"
        dtype = self.auto_model.dtype

        def forward(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if eager and mask.ndim == 4:  # eager adds the mask to the scores
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(dtype).min
                )
            sub = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            return super(BidirectionalDecoder, self).forward(sub, **kwargs)[self.module_output_name]

        if layout.real_tokens == 0:
            states = torch.zeros((0, self.auto_model.config.hidden_size), dtype=dtype, device=input_ids.device)
        elif mode == "pack":
            states = packed_forward(input_ids, layout, forward, pad_token_id, self.pack_row_tokens)
        else:
            states = bucketed_forward(input_ids, layout, forward, pad_token_id, self.bucket_ratio)
        features[self.module_output_name] = layout.scatter_back(states)
        return features


BidirectionalQwen = BidirectionalDecoder
"""The name used by the KaLM design documents; the same class serves every supported decoder."""
