"""Which int8 ONNX graph keeps a decoder embedder's quality? Variants side by side, on an untrained and a trained model.

Every variant starts from the same float32 graph (``kalm-st export``) and is compared with the PyTorch float32 model on
the same STS-B test sentences, plain and with the query prompt (smallest and mean cosine), with its size and its speed
relative to the float32 graph (same thread count, alternating rounds, median):

- ``dynamic, all ops`` : what ``kalm-st export --quantize int8`` wrote before: onnxruntime ``quantize_dynamic``,
  per-channel int8 weights, activations quantized per tensor at run time, every supported op (MatMul and Gather);
- ``dynamic, MatMul only`` : the same on the linear layers only (the embedding table stays float32);
- ``dynamic, MatMul only, first/last layers + down_proj fp32`` : also keeps the layers where decoder activation
  outliers concentrate in float32;
- ``weight-only int8 (MatMulNBits), fp32 compute`` : int8 weights with one scale per block of 32 input channels,
  dequantized on the fly, activations never quantized (``accuracy_level`` 0: float32 arithmetic);
- ``weight-only int8 (MatMulNBits), int8 compute`` : the same weights, activations quantized block-wise
  (``accuracy_level`` 4).

Models: SmolLM2-135M-Instruct made bidirectional (untrained as an embedder) and the same model after ``--train-steps``
steps of in-batch-negatives contrastive training (sentence-transformers' ``MultipleNegativesRankingLoss``, scale 20) on
TrecQA question/answer pairs, batch ``--train-batch``, AdamW lr ``--train-lr``: a small stand-in for a kalm-st-trained decoder.

    python benchmarks/onnx_int8.py                       # both models, 64 sentences, 3 rounds
    python benchmarks/onnx_int8.py --train-steps 0       # untrained only
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kalm_st import build_model, load_model  # noqa: E402
from kalm_st.recipe.backbones import convert_smollm2  # noqa: E402
from kalm_st.serving import ONNXEncoder, export_onnx  # noqa: E402
from kalm_st.serving.onnx_int8 import INT8_VARIANTS, quantize_variant  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("KALM_ST_CACHE", Path.home() / ".cache" / "kalm_st")) / "onnx_int8"


def _csv_rows(name: str) -> list[list[str]]:
    for folder in (REPO / "data", REPO.parent / "shared" / "data"):
        path = folder / name
        if path.exists():
            with path.open(encoding="utf8") as handle:
                return list(csv.reader(handle))
    raise FileNotFoundError(f"{name} not found in data/ or ../shared/data/")


def _sentences(count: int) -> list[str]:
    return list(dict.fromkeys(text for row in _csv_rows("stsb/test.csv") for text in row[:2]))[:count]


def _train(model, steps: int, batch: int, lr: float) -> None:
    """In-batch-negatives training on TrecQA (question, correct answer) pairs, one question per batch row."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows = _csv_rows("trecqa/train.csv")[1:]
    pairs = list({q: (q, a) for q, label, a in rows if label == "1"}.values())
    loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        chunk = pairs[step * batch : (step + 1) * batch]
        queries = model.preprocess([q for q, _ in chunk], prompt=model.prompts["query"])
        answers = model.preprocess([a for _, a in chunk])
        value = loss([dict(queries), dict(answers)], torch.tensor([]))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  train step {step + 1}/{steps}: loss {value.item():.3f}", flush=True)
    model.eval()


def _prepare(cache: Path, train_steps: int, train_batch: int, lr: float) -> dict[str, Path]:
    folders = {"untrained": cache / "smollm2-135m-bidirectional"}
    if not (folders["untrained"] / "modules.json").is_file():
        build_model(convert_smollm2(cache / "smollm2-135m-instruct"), dtype="float32", device="cpu").save(
            str(folders["untrained"])
        )
    if train_steps:
        trained = cache / f"smollm2-135m-trained-{train_steps}x{train_batch}-lr{lr:g}"
        if not (trained / "modules.json").is_file():
            model = load_model(folders["untrained"], device="cpu")
            _train(model, train_steps, train_batch, lr)
            model.save(str(trained))
        folders[f"trained ({train_steps} steps x {train_batch})"] = trained
    for folder in folders.values():
        if not (folder / "onnx" / "model.onnx").is_file():
            export_onnx(folder)
    return folders


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(label: str, folder: Path, texts: list[str], rounds: int, threads: int) -> list[dict]:
    import onnxruntime

    model = load_model(folder, device="cpu")
    reference = np.concatenate([model.encode_document(texts), model.encode_query(texts)])
    onnx_dir = folder / "onnx"
    files = {"float32": "model.onnx"}
    for variant in INT8_VARIANTS:
        file_name = f"model_int8_{variant}.onnx"
        if not (onnx_dir / file_name).is_file():
            quantize_variant(onnx_dir / "model.onnx", onnx_dir / file_name, variant)
        files[variant] = file_name

    def options() -> onnxruntime.SessionOptions:
        session_options = onnxruntime.SessionOptions()
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return session_options

    encoders = {
        key: ONNXEncoder(folder, file_name=name, intra_op_num_threads=threads, session_options=options())
        for key, name in files.items()
    }
    seconds: dict[str, list[float]] = {key: [] for key in encoders}
    embeddings: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for key, encoder in encoders.items():
            start = time.perf_counter()
            embeddings[key] = np.concatenate([encoder.encode_document(texts), encoder.encode_query(texts)])
            seconds[key].append(time.perf_counter() - start)
    base = statistics.median(seconds["float32"])
    rows = []
    for key in encoders:
        cos = _cosines(embeddings[key].astype(np.float64), reference.astype(np.float64))
        rows.append(
            {
                "model": label,
                "variant": key,
                "cos min": float(cos.min()),
                "cos mean": float(cos.mean()),
                "speed vs fp32": base / statistics.median(seconds[key]),
                "MiB": (onnx_dir / files[key]).stat().st_size / 2**20,
            }
        )
        print(f"  {label:28s} {key:48s} min {rows[-1]['cos min']:.4f} mean {rows[-1]['cos mean']:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-lr", type=float, default=2e-5)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    texts = _sentences(args.sentences)
    rows: list[dict] = []
    for label, folder in _prepare(args.cache, args.train_steps, args.train_batch, args.train_lr).items():
        rows += run(label, folder, texts, args.rounds, args.threads)
    print("\n| model | variant | min cosine | mean cosine | speed vs ORT fp32 | MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['variant']} | {row['cos min']:.4f} | {row['cos mean']:.4f} "
            f"| {row['speed vs fp32']:.2f}x | {row['MiB']:.0f} |"
        )
    best = max(
        (row for row in rows if row["variant"] != "float32"),
        key=lambda row: min(r["cos min"] for r in rows if r["variant"] == row["variant"]),
    )
    worst_of_best = min(r["cos min"] for r in rows if r["variant"] == best["variant"])
    print(
        f"headline: best int8 variant {best['variant']!r}: smallest cosine to PyTorch fp32 {worst_of_best:.4f} "
        f"over {len({r['model'] for r in rows})} models ({2 * len(texts)} texts each)"
    )


if __name__ == "__main__":
    main()
