"""int8 variants of an exported float32 graph, for measuring which one keeps a decoder embedder's quality.

Dynamic quantization (int8 weights, activations quantized with one scale per tensor at run time) suits encoders
(all-MiniLM-L6-v2: smallest STS-B cosine 0.990). Decoder LLMs have activation outlier channels that one scale per
tensor cannot represent (SmolLM2-135M: smallest cosine 0.47 to float32), so ``kalm-st export --quantize int8`` writes
a decoder's graph as weight-only int8 (``weight-only-fp32-compute``: 8-bit weights in blocks of 32, float32
activations; smallest cosine 0.990 on the untrained SmolLM2 and 0.989 on the quickstart-trained one, whose STS-B
Spearman it keeps (39.63 vs 39.35 float32; dynamic int8: -12.00); 2.3x smaller, not faster). The other variants
(:data:`INT8_VARIANTS`) are kept for ``benchmarks/onnx_int8.py``, which measures them side by side.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
    source, target = Path(source).resolve(), Path(target).resolve()  # absolute: no chdir, relative paths stay right
    with onnxruntime_quiet_and_tidy(target.parent):
        if variant.startswith("dynamic"):
            _quantize_dynamic(source, target, variant)
        else:
            _quantize_weight_only(source, target, variant)


@contextmanager
def onnxruntime_quiet_and_tidy(target_dir: Path) -> Iterator[None]:
    """Silence onnxruntime's per-call root-logger hint, and remove the scratch files its quantizers write into the
    working directory and beside the target (``sym_shape_infer_temp.onnx``, ``<uuid>[.data]``); the working directory
    is never changed (``chdir`` is process-wide, and a relative path would then point elsewhere)."""
    # Importing onnxruntime's weight-only quantizer calls logging.basicConfig(level=INFO) (once per process), which
    # would print a line per quantized node: import it before the root level is set, so that setting wins.
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    cwd = Path.cwd()
    before = {entry.name for entry in cwd.iterdir()} if os.access(cwd, os.R_OK) else set()
    try:
        yield
    finally:
        root.setLevel(level)
        for folder in {cwd, target_dir}:
            for scratch in folder.glob("sym_shape_infer_temp.onnx*"):
                if folder != cwd or scratch.name not in before:
                    scratch.unlink()
        if os.access(cwd, os.R_OK):
            for entry in cwd.iterdir():
                if entry.name not in before and _is_uuid_scratch(entry.name):
                    entry.unlink(missing_ok=True)


def _is_uuid_scratch(name: str) -> bool:
    """``<uuid4>`` or ``<uuid4>.data``: the external-data scratch files onnx writes beside a relative model path."""
    stem = name.removesuffix(".data")
    try:
        return str(uuid.UUID(stem)) == stem
    except ValueError:
        return False


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


__all__ = [
    "INT8_VARIANTS",
    "linear_matmuls",
    "onnxruntime_quiet_and_tidy",
    "quantize_variant",
    "sensitive_matmuls",
]
