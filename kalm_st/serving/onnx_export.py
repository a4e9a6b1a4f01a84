"""``kalm-st export MODEL --format onnx``: ``MODEL/onnx/model.onnx`` (+ ``model_int8.onnx``), checked before it is kept.

The graph (:class:`~kalm_st.serving.onnx_graph.EmbeddingGraph`) takes ``input_ids`` and ``attention_mask`` (int64,
dynamic batch and sequence axes) and returns ``last_hidden_state`` (what sentence-transformers' and
text-embeddings-inference's ONNX back-ends read) and ``sentence_embedding`` (mean-pooled and normalised as the model
does). The model's ``is_causal: false`` is honoured while tracing, so the bidirectional mask is part of the graph.

Why not ``optimum`` / ``SentenceTransformer(..., backend="onnx")``: ``optimum-onnx`` requires transformers < 4.58
and cannot be installed beside transformers 5 (checked 2026-11). ``torch.onnx.export`` can export the model.

Exporters: ``"torchscript"`` (default; ``torch.onnx.export(dynamo=False)``) traced SmolLM2-135M in 23 s here,
``"dynamo"`` (``torch.export``, torch's default since 2.9) took 295 s on the same machine with the same parity. Both
are checked the same way, so the choice is speed, not trust. The TorchScript exporter is deprecated in torch; if a
future torch drops it, use ``exporter="dynamo"``.

The check (:func:`check_parity`): the exported graph, run through :class:`~kalm_st.serving.onnx_encoder.ONNXEncoder`
(its tokenizer and prompt handling included), against the PyTorch model's ``encode`` on probe texts of varied
lengths, with and without the model's query prompt, right-padded and (decoders) left-padded: the smallest cosine
must reach 0.99999 in float32 (else nothing is written) and 0.99 in int8 (else the int8 graph is dropped);
:class:`ONNXExportError` says by how much.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np

from kalm_st.io import atomic_directory, check_output_path, write_json_atomic
from kalm_st.serving.onnx_encoder import MANIFEST_NAME, ONNXEncoder

logger = logging.getLogger(__name__)

Exporter = Literal["torchscript", "dynamo"]
DEFAULT_OPSET: dict[str, int] = {"torchscript": 17, "dynamo": 18}
MIN_COSINE: dict[str, float] = {"float32": 0.99999, "int8": 0.99}
"""Parity thresholds on the smallest probe cosine (issue 13)."""

PROBE_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar.",
    "How do I reset my card PIN?",
    "x",
    "The cat sleeps on the warm windowsill while the rain taps on the glass and the kettle starts to sing.",
    "Zwei Hunde rennen über ein verschneites Feld.",
    "What is the capital of France? Paris is the capital and most populous city of France, on the Seine.",
)
"""Varied lengths (one to ~25 tokens), punctuation, a non-English text."""


class ONNXExportError(RuntimeError):
    """An exported graph does not reproduce the PyTorch model (see :func:`export_onnx` for what was kept)."""


@dataclass
class ParityReport:
    """The smallest cosine and largest absolute difference between ONNX and PyTorch embeddings on the probes."""

    min_cosine: float
    max_abs_diff: float
    threshold: float
    batches: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.threshold


@dataclass
class ONNXExportResult:
    """What :func:`export_onnx` wrote."""

    folder: Path
    files: dict[str, Path]
    parity: dict[str, ParityReport]
    seconds: float


def _load(model_path: Path):
    import torch

    from kalm_st.model import load_model

    if not model_path.exists():
        raise FileNotFoundError(f"Model folder {str(model_path)!r} does not exist.")
    if not (model_path / "modules.json").is_file():
        raise ValueError(
            f"{model_path} is not a sentence-transformers model folder (no modules.json). For a bare decoder "
            f"checkpoint, run `kalm-st convert {model_path} DESTINATION` first."
        )
    return load_model(model_path, device="cpu", model_kwargs={"dtype": torch.float32})


def _torch_export(graph, sample: dict[str, np.ndarray], path: Path, exporter: Exporter, opset: int) -> None:
    import torch

    from kalm_st.serving.onnx_graph import INPUT_NAMES, OUTPUT_NAMES

    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    common = dict(input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches in transformers' mask code; check_parity tests what they froze.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
            axes |= {"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}
            try:
                torch.onnx.export(graph, args, str(path), dynamo=False, dynamic_axes=axes, **common)
            except (TypeError, NotImplementedError) as error:  # a torch without the TorchScript exporter
                raise ImportError(
                    f"This torch ({torch.__version__}) cannot run the TorchScript ONNX exporter ({error}); "
                    "use exporter='dynamo' (`--exporter dynamo`)."
                ) from error
        else:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
            torch.onnx.export(
                graph, args, str(path), dynamo=True, dynamic_shapes=shapes, external_data=False, **common
            )


def _quantize_int8(source: Path, target: Path, *, is_decoder: bool) -> None:
    """The int8 graph: weight-only int8 for a decoder (its activation outliers defeat per-tensor activation scales),
    dynamic int8 with per-channel weight scales for an encoder (all-MiniLM-L6-v2's smallest STS-B cosine to float32
    rose from 0.944 with one scale per tensor to 0.990, at the same speed). :mod:`kalm_st.serving.onnx_int8`."""
    from kalm_st.serving.onnx_int8 import onnxruntime_quiet_and_tidy, quantize_variant

    if is_decoder:
        quantize_variant(source, target, "weight-only-fp32-compute")
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with onnxruntime_quiet_and_tidy(target.parent):
        quantize_dynamic(
            str(source.resolve()),
            str(target.resolve()),
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=source.stat().st_size > 1_900_000_000,  # protobuf's 2 GB limit
        )


def check_parity(
    onnx_dir: Path, file_name: str, model, *, is_decoder: bool, threshold: float, padding_side: str
) -> ParityReport:
    """Compare the graph ``onnx_dir/file_name``, served by :class:`ONNXEncoder`, with the PyTorch ``model``.

    Probes: :data:`PROBE_TEXTS` in one batch and the shortest alone (a batch of one), without a prompt and with
    the model's query prompt, padded on the tokenizer's side and, for decoders, on the other side too. Refuses
    first a tokenizer whose ids differ from the model's (a serving bug, not a graph one).
    """
    prompt = model.prompts.get("query") or ""
    texts = list(PROBE_TEXTS)
    sides = [padding_side] + ([{"right": "left", "left": "right"}[padding_side]] if is_decoder else [])
    worst_cos, worst_abs, batches = 1.0, 0.0, []
    references = {
        p: (
            model.encode(texts, prompt=p, show_progress_bar=False),
            model.encode(texts[2:3], prompt=p, show_progress_bar=False),
        )
        for p in {"", prompt}
    }
    for side in sides:
        encoder = ONNXEncoder(onnx_dir, file_name=file_name, padding_side=side)
        for text in texts:
            expected = model.preprocess([text], prompt=prompt)["input_ids"][0].tolist()  # what ST feeds the model
            got = encoder.tokenize([text], prompt)["input_ids"][0].tolist()
            if got != expected:
                raise ONNXExportError(
                    f"The exported tokenizer gives {got[:12]}... for {text!r}, the model's {expected[:12]}..."
                )
        for label, p in (("no prompt", ""), ("query prompt", prompt)):
            batch_ref, single_ref = references[p]
            kwargs = {"prompt": p, "show_progress_bar": False}
            pairs = ((encoder.encode(texts, **kwargs), batch_ref), (encoder.encode(texts[2:3], **kwargs), single_ref))
            for got, reference in pairs:
                norms = np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
                worst_cos = min(worst_cos, float(np.min(np.sum(got * reference, axis=1) / norms)))
                worst_abs = max(worst_abs, float(np.abs(got - reference).max()))
            batches.append(f"{side}-padded, {label}")
        del encoder
    return ParityReport(min_cosine=worst_cos, max_abs_diff=worst_abs, threshold=threshold, batches=batches)


def export_onnx(
    model_path: str | os.PathLike[str],
    *,
    quantize: Literal["int8"] | None = None,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
    output_dir: str | os.PathLike[str] | None = None,
    int8_min_cosine: float = MIN_COSINE["int8"],
) -> ONNXExportResult:
    """Export a saved model to ONNX and check it (see the module docstring).

    Args:
        model_path: A saved sentence-transformers folder (a kalm-st model, or a verified encoder such as
            all-MiniLM-L6-v2).
        quantize: ``"int8"`` also writes ``model_int8.onnx``: weight-only int8 for decoders (``MatMulNBits``,
            8-bit weights in blocks of 32, float32 activations), onnxruntime dynamic quantization for encoders
            (int8 weights with one scale per output channel, activations with one scale per tensor at run time).
        opset: ONNX opset (default 17 for the TorchScript exporter, 18 for dynamo).
        exporter: ``"torchscript"`` or ``"dynamo"``.
        output_dir: Where the graphs go; default ``MODEL/onnx`` (the layout sentence-transformers' ONNX back-end
            reads). Elsewhere, a copy of the prompt table goes with them.
        int8_min_cosine: The int8 graph's parity floor (default 0.99). Below it the int8 graph is not kept.

    Raises:
        FileNotFoundError / ValueError: not a model folder; an architecture or module the graph cannot reproduce.
        PermissionError: the destination cannot be written.
        ONNXExportError: a parity check failed (the message has the numbers): nothing was written if the float32
            graph failed; if only the int8 graph failed, the float32 one was written and the int8 one dropped.
    """
    start = time.perf_counter()
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}.")
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter must be one of {sorted(DEFAULT_OPSET)}, got {exporter!r}.")
    source = Path(model_path)
    if not source.exists():
        raise FileNotFoundError(f"Model folder {str(source)!r} does not exist.")
    destination = Path(output_dir) if output_dir is not None else source / "onnx"
    check_output_path(destination, folder=True, name="Destination")
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"The ONNX export needs onnxruntime ({error}): pip install 'kalm-st[onnx]'.") from error
    import torch
    import transformers

    from kalm_st import __version__
    from kalm_st.serving.onnx_graph import INPUT_NAMES, OUTPUT_NAMES, EmbeddingGraph, inspect_model

    model = _load(source)
    spec = inspect_model(model, str(source))
    model.eval()
    tokenizer = model.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{source}: the ONNX encoder needs a fast tokenizer (tokenizer.json) with a padding token.")
    opset = opset or DEFAULT_OPSET[exporter]
    graph = EmbeddingGraph(model, spec).eval()
    logger.info("Exporting %s (%s) with the %s exporter, opset %d...", source, spec.architecture, exporter, opset)

    manifest = {
        "format": "kalm-st-onnx",
        "version": 1,
        "files": {"float32": "model.onnx"} | ({"int8": "model_int8.onnx"} if quantize else {}),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "architecture": spec.architecture,
        "model_type": spec.model_type,
        "bidirectional": spec.is_decoder,
        "pooling": "mean",
        "normalize": spec.normalize,
        "embedding_dimension": spec.embedding_dimension,
        "tokenizer": {
            "file": "tokenizer.json",
            "max_length": spec.max_seq_length,
            "padding_side": tokenizer.padding_side,
            "truncation_side": getattr(tokenizer, "truncation_side", "right"),
            "pad_token": tokenizer.pad_token,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "exporter": exporter,
        "opset": opset,
        "versions": {
            "kalm_st": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "date": date.today().isoformat(),
        "parity": {},
    }
    parity: dict[str, ParityReport] = {}
    thresholds = {"float32": MIN_COSINE["float32"], "int8": int8_min_cosine}
    int8_failure: str | None = None
    # Everything is written to a temporary sibling first and checked there; it replaces the destination only if
    # the float32 graph passes (atomic_directory discards it on an exception). An int8 graph that fails is dropped.
    with atomic_directory(destination) as tmp:
        sample = tokenizer(list(PROBE_TEXTS[:2]), padding=True, return_tensors="np")
        _torch_export(graph, {k: sample[k].astype(np.int64) for k in INPUT_NAMES}, tmp / "model.onnx", exporter, opset)
        if quantize:
            _quantize_int8(tmp / "model.onnx", tmp / "model_int8.onnx", is_decoder=spec.is_decoder)
        backend.save(str(tmp / "tokenizer.json"))
        if (
            destination.parent.resolve() != source.resolve()
            and (source / "config_sentence_transformers.json").is_file()
        ):
            shutil.copy(source / "config_sentence_transformers.json", tmp)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        for kind, file_name in list(manifest["files"].items()):
            report = check_parity(
                tmp, file_name, model, is_decoder=spec.is_decoder, threshold=thresholds[kind],
                padding_side=tokenizer.padding_side,
            )  # fmt: skip
            logger.info("%s parity: min cosine %.7f, max |diff| %.2e", kind, report.min_cosine, report.max_abs_diff)
            message = (
                f"The {kind} ONNX graph of {source} does not match the PyTorch model: min cosine "
                f"{report.min_cosine:.6f} < {report.threshold} (max |diff| {report.max_abs_diff:.2e}) over "
                f"{report.batches}."
            )
            if kind == "float32" and not report.passed:
                raise ONNXExportError(message + " Nothing was written.")
            if not report.passed:
                int8_failure = message
                (tmp / file_name).unlink()
                del manifest["files"][kind]
                continue
            parity[kind] = report
        manifest["parity"] = {kind: asdict(report) for kind, report in parity.items()}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    files = {kind: destination / name for kind, name in manifest["files"].items()}
    if int8_failure is not None:
        raise ONNXExportError(
            f"{int8_failure} model_int8.onnx was not kept; {files['float32']} (float32) passed and was written. "
            "int8 costs quality (decoders get weight-only int8, encoders dynamic int8; docs/serving.md). Accept a lower floor with int8_min_cosine (--int8-min-cosine) if that suits you."
        )
    return ONNXExportResult(folder=destination, files=files, parity=parity, seconds=time.perf_counter() - start)


__all__ = [
    "MIN_COSINE",
    "PROBE_TEXTS",
    "ONNXExportError",
    "ONNXExportResult",
    "ParityReport",
    "check_parity",
    "export_onnx",
]
