"""What an ONNX export traces: the model's backbone, its mean pooling and its normalisation, as one torch module.

Only models whose whole pipeline the graph reproduces are accepted (:func:`inspect_model`): a sentence-transformers
``Transformer`` over a kalm-st decoder (bidirectional, ``is_causal: false``) or a verified encoder, then ``Pooling``
in mean mode over all tokens (``include_prompt=True``, KaLM's choice), then optionally ``Normalize``, with the
plain-text modality. Anything else is refused by name rather than exported into a graph that embeds differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from torch import Tensor, nn

from kalm_st.modules.bidirectional_decoder import SUPPORTED_MODEL_TYPES

VERIFIED_ENCODER_TYPES: frozenset[str] = frozenset({"bert"})
"""Encoder-only families exported and parity-checked here (all-MiniLM-L6-v2, ``benchmarks/onnx_speed.py``)."""

INPUT_NAMES: tuple[str, str] = ("input_ids", "attention_mask")
OUTPUT_NAMES: tuple[str, str] = ("last_hidden_state", "sentence_embedding")


@dataclass(frozen=True)
class GraphSpec:
    """What :class:`EmbeddingGraph` computes for a model."""

    model_type: str
    architecture: str
    is_decoder: bool
    normalize: bool
    embedding_dimension: int
    max_seq_length: int | None


def inspect_model(model: SentenceTransformer, source: str) -> GraphSpec:
    """Check that ``model`` is exportable as one graph and describe it; ``ValueError`` naming what is not.

    Args:
        model: The loaded model.
        source: The model folder, named in the errors.
    """
    modules = list(model)
    if not modules or not isinstance(modules[0], Transformer):
        first = type(modules[0]).__name__ if modules else "nothing"
        raise ValueError(f"{source}: the first module is {first}, not a sentence-transformers Transformer.")
    transformer = modules[0]
    config = transformer.auto_model.config
    model_type = getattr(config, "model_type", None)
    architecture = (getattr(config, "architectures", None) or [type(transformer.auto_model).__name__])[0]
    is_decoder = model_type in SUPPORTED_MODEL_TYPES
    if not is_decoder and model_type not in VERIFIED_ENCODER_TYPES:
        raise ValueError(
            f"Unsupported architecture {architecture} (model_type={model_type!r}) in {source}: the ONNX export "
            f"supports the kalm-st decoders {sorted(SUPPORTED_MODEL_TYPES)} and the encoders "
            f"{sorted(VERIFIED_ENCODER_TYPES)}."
        )
    if is_decoder and getattr(config, "is_causal", True) is not False:
        raise ValueError(
            f"{source}/config.json: {architecture} is causal (no 'is_causal': false); kalm-st exports bidirectional "
            "embedders. Make it one first: `kalm-st convert SOURCE DESTINATION`."
        )
    if "message" in transformer.modality_config:
        raise ValueError(
            f"{source}/sentence_bert_config.json: the Transformer renders text through the tokenizer's chat "
            "template ('message' modality); the ONNX encoder embeds plain text, as vLLM and TEI do. Set "
            '"modality_config" to {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}.'
        )
    for key in ("processing_kwargs", "query_length", "document_length", "query_expansion"):
        if getattr(transformer, key, None):
            raise ValueError(
                f"{source}/sentence_bert_config.json: {key!r} is set; the ONNX encoder does not apply it."
            )
    if getattr(transformer, "do_lower_case", False):
        raise ValueError(f"{source}: do_lower_case=True is not reproduced by the ONNX encoder.")

    rest = modules[1:]
    if not rest or not isinstance(rest[0], Pooling):
        raise ValueError(f"{source}/modules.json: expected a Pooling module after the Transformer.")
    pooling = rest[0]
    if pooling.pooling_mode not in ("mean", ("mean",)):
        raise ValueError(
            f"{source}: the Pooling module's pooling_mode {pooling.pooling_mode!r}; the ONNX export "
            "supports mean pooling (KaLM's)."
        )
    if not pooling.include_prompt:
        raise ValueError(
            f"{source}: the Pooling module has include_prompt=false (prompt tokens excluded from the "
            "mean) is not supported by the ONNX export."
        )
    extras = rest[1:]
    unsupported = [(i, m) for i, m in enumerate(extras, start=2) if not isinstance(m, Normalize)]
    if unsupported or len(extras) > 1:
        index, module = unsupported[0] if unsupported else (3, extras[1])
        raise ValueError(
            f"{source}/modules.json: module {index} ({type(module).__name__}) cannot be exported; supported: "
            "Transformer, Pooling(mean), optional Normalize."
        )
    normalize = bool(extras)
    return GraphSpec(
        model_type=str(model_type),
        architecture=architecture,
        is_decoder=is_decoder,
        normalize=normalize,
        embedding_dimension=pooling.get_embedding_dimension(),
        max_seq_length=model.max_seq_length,
    )


class EmbeddingGraph(nn.Module):
    """``(input_ids, attention_mask) -> (last_hidden_state, sentence_embedding)`` for one inspected model.

    ``sentence_embedding = normalize(sum_t h_t m_t / max(sum_t m_t, 1e-9))``, as sentence-transformers' ``Pooling``
    (mean) and ``Normalize`` compute it. Decoders get ``position_ids = cumsum(mask) - 1`` (what
    :class:`~kalm_st.modules.BidirectionalDecoder` passes for left padding; for right padding it equals the default
    positions of every real token), so the graph is exact for either padding side. Encoders keep their own absolute
    positions and ``token_type_ids = 0``, as sentence-transformers runs them for single texts.

    The attention is whatever the backbone's config says when the graph is traced: with ``is_causal: false`` the
    bidirectional mask is baked in.
    """

    def __init__(self, model: SentenceTransformer, spec: GraphSpec) -> None:
        super().__init__()
        self.backbone = model[0].auto_model
        self.spec = spec

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        kwargs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.spec.is_decoder:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(**kwargs).last_hidden_state  # (batch, seq, dim)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        embedding = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (batch, dim)
        if self.spec.normalize:
            embedding = torch.nn.functional.normalize(embedding, p=2, dim=1)
        return hidden, embedding


__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "VERIFIED_ENCODER_TYPES", "EmbeddingGraph", "GraphSpec", "inspect_model"]
