"""int8 variants of an exported float32 graph, for measuring which one keeps a decoder embedder's quality.

``kalm-st export --quantize int8`` uses onnxruntime's dynamic quantization (:func:`kalm_st.serving.onnx_export`):
int8 weights and activations quantized with one scale per tensor at run time. Decoder LLMs have activation outlier
channels that one scale per tensor cannot represent (SmolLM2-135M: smallest cosine 0.47 to float32). The variants
here keep more in float32 (:data:`INT8_VARIANTS`); ``benchmarks/onnx_int8.py`` measures them side by side.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

INT8_VARIANTS: dict[str, str] = {
    "dynamic-all": "dynamic, all ops (per-channel weights, per-tensor activations)",
    "dynamic-linear": "dynamic, linear layers only (no attention-score MatMuls, no embedding Gather)",
    "dynamic-linear-keep-edges": "dynamic, linear layers only, first/last layer + every down_proj fp32",
    "weight-only-fp32-compute": "weight-only int8 (MatMulNBits, block 32), fp32 compute",
    "weight-only-int8-compute": "weight-only int8 (MatMulNBits, block 32), int8 compute",
}
"""Variant key -> what it does."""

_LAYER = re.compile(r"layers\.(\d+)[./]")


def linear_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMul nodes whose second input is a stored weight (the linear layers), not the attention
    products of two activations, which dynamic quantization would quantize on both sides."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def sensitive_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMul nodes of the first and last decoder layer and of every ``down_proj``.

    Layer indices and projection names come from the node names the exporter derives from the PyTorch module path
    (``/layers.3/mlp/down_proj/MatMul``).
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    matmuls = [node.name for node in graph.node if node.op_type == "MatMul"]
    layers = [int(match.group(1)) for name in matmuls if (match := _LAYER.search(name))]
    if not layers:
        raise ValueError(f"{model_path}: no MatMul node names with a layer index (layers.N); cannot pick layers.")
    edges = {min(layers), max(layers)}
    return [
        name
        for name in matmuls
        if "down_proj" in name or ((match := _LAYER.search(name)) and int(match.group(1)) in edges)
    ]


def quantize_variant(source: Path, target: Path, variant: str) -> None:
    """Write the ``variant`` (a key of :data:`INT8_VARIANTS`) int8 graph of the float32 graph ``source``."""
    if variant not in INT8_VARIANTS:
        raise ValueError(f"unknown int8 variant {variant!r}; known: {sorted(INT8_VARIANTS)}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs a pre-processing hint on the root logger per call
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="kalm-st-int8-") as scratch:
            os.chdir(scratch)  # onnxruntime writes scratch files into the working directory
            if variant.startswith("dynamic"):
                _quantize_dynamic(Path(source).resolve(), Path(target).resolve(), variant)
            else:
                _quantize_weight_only(Path(source).resolve(), Path(target).resolve(), variant)
    finally:
        os.chdir(cwd)
        root.setLevel(level)


def _quantize_dynamic(source: Path, target: Path, variant: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kwargs: dict = {}
    if variant != "dynamic-all":
        excluded = set(sensitive_matmuls(source)) if variant == "dynamic-linear-keep-edges" else set()
        kwargs["op_types_to_quantize"] = ["MatMul"]
        kwargs["nodes_to_quantize"] = [name for name in linear_matmuls(source) if name not in excluded]
        if not kwargs["nodes_to_quantize"]:  # an empty list means "all nodes" to onnxruntime
            shutil.copyfile(source, target)
            return
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, **kwargs)


def _quantize_weight_only(source: Path, target: Path, variant: str) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=32,
        is_symmetric=True,
        accuracy_level=4 if variant == "weight-only-int8-compute" else 0,
        op_types_to_quantize=("MatMul",),
        bits=8,
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


__all__ = ["INT8_VARIANTS", "linear_matmuls", "quantize_variant", "sensitive_matmuls"]
