"""``kalm-st export MODEL --format onnx [--quantize int8] [--opset N]``: a parity-checked ONNX export."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX (MODEL/onnx/model.onnx, optionally int8), checked against PyTorch",
        description="Export a saved model to MODEL/onnx/model.onnx (inputs input_ids, attention_mask; outputs "
        "last_hidden_state, sentence_embedding; dynamic batch and sequence axes; bidirectional attention baked in). "
        "The export checks its own parity with the PyTorch model on padded probe batches before it keeps the files. "
        "Serve the result without torch with kalm_st.serving.ONNXEncoder.",
    )
    parser.add_argument("model", help="a saved kalm-st (or sentence-transformers) model folder")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (only onnx)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="also write model_int8.onnx")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 18 with --exporter dynamo)")
    parser.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch.onnx exporter: torchscript (default, ~10x faster here) or dynamo (torch.export)",
    )
    parser.add_argument("--output", default=None, help="output folder (default MODEL/onnx)")
    parser.add_argument(
        "--int8-min-cosine",
        type=float,
        default=0.99,
        help="parity floor of the int8 graph vs PyTorch (default 0.99); below it model_int8.onnx is not kept",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from kalm_st.serving.onnx_export import ONNXExportError, export_onnx

    try:
        result = export_onnx(
            args.model,
            quantize=args.quantize,
            opset=args.opset,
            exporter=args.exporter,
            output_dir=args.output,
            int8_min_cosine=args.int8_min_cosine,
        )
    except ONNXExportError as error:
        print(f"kalm-st export: parity check failed: {error}", file=sys.stderr)  # noqa: T201
        return 1
    for kind, path in result.files.items():
        report = result.parity[kind]
        size = path.stat().st_size / 2**20
        print(  # noqa: T201
            f"Wrote {path} ({kind}, {size:.1f} MiB): min cosine to PyTorch {report.min_cosine:.7f} "
            f"(>= {report.threshold}), max |diff| {report.max_abs_diff:.1e}"
        )
    print(  # noqa: T201
        f"Done in {result.seconds:.0f} s. Serve it with: from kalm_st.serving import ONNXEncoder; "
        f"ONNXEncoder({args.model!r}{', quantized=True' if args.quantize else ''}).encode_query([...])"
    )
    return 0
