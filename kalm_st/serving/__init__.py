"""Serving a kalm-st model outside sentence-transformers.

- :mod:`~kalm_st.serving.runtime_files`: saves that vLLM, text-embeddings-inference and llama.cpp read the way
  sentence-transformers does (every kalm-st save runs it).
- :mod:`~kalm_st.serving.onnx_export`: ``MODEL/onnx/model.onnx`` (+ ``model_int8.onnx``), parity-checked.
- :mod:`~kalm_st.serving.onnx_int8`: int8 variants of an exported graph (weight-only int8 keeps a decoder's quality).
- :mod:`~kalm_st.serving.onnx_encoder`: :class:`ONNXEncoder`, onnxruntime + tokenizers + the model's prompts, no torch.

Names are resolved lazily, so importing the encoder never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ONNXEncoder": "kalm_st.serving.onnx_encoder",
    "ONNXExportError": "kalm_st.serving.onnx_export",
    "ONNXExportResult": "kalm_st.serving.onnx_export",
    "export_onnx": "kalm_st.serving.onnx_export",
    "write_runtime_files": "kalm_st.serving.runtime_files",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
