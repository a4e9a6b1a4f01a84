"""Encoding throughput of a kalm-st model vs the stock sentence-transformers stack over the same weights.

Both sides encode the same real sentences (STS-B test) with the same weights: the kalm-st side is
``kalm_st.load_model`` (BidirectionalDecoder + MeanPooling + Normalize, KaLMSentenceTransformer), the stock side is
plain ``SentenceTransformer`` on the same saved folder (Transformer + Pooling + Normalize). Runs alternate
(kalm, stock, kalm, stock, ...) so machine noise hits both alike; the figure of merit is the ratio of medians.

    python benchmarks/encode_speed.py                 # fp32 and bf16, 'small' random Qwen2, 512 sentences
    python benchmarks/encode_speed.py --size qwen2-0.5b --sentences 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from kalm_st import build_model, load_model, testing  # noqa: E402

SIZES = {
    "small": dict(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2
    ),
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
}


def _sentences(count: int) -> list[str]:
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo / "data" / "stsb" / "test.csv", repo.parent / "shared" / "data" / "stsb" / "test.csv"):
        if candidate.exists():
            import csv

            with candidate.open(encoding="utf8") as handle:
                rows = list(csv.reader(handle))
            return [text for row in rows for text in row[:2]][:count]
    raise FileNotFoundError("STS-B test.csv not found in data/ or ../shared/data/")


def _throughput(model: SentenceTransformer, sentences: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    model.encode(sentences, batch_size=batch_size)
    return len(sentences) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sentences = _sentences(args.sentences)
    config = testing.tiny_qwen_config(vocab_size=151_936, **SIZES[args.size])
    print(f"threads={torch.get_num_threads()} size={args.size} sentences={len(sentences)} batch={args.batch_size}")
    print(f"{'dtype':>9} {'kalm-st s/s':>12} {'stock s/s':>10} {'ratio':>6}")
    for dtype in args.dtypes:
        with tempfile.TemporaryDirectory() as folder:
            build_model(config, tokenizer=testing.qwen_tokenizer_dir(), dtype=dtype, device="cpu").save(folder)
            kalm = load_model(folder, device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
            stock = SentenceTransformer(folder, device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
            assert type(stock[0]).__name__ == "Transformer" and type(kalm[0]).__name__ == "BidirectionalDecoder"
            _throughput(kalm, sentences[:64], args.batch_size)  # warm-up both
            _throughput(stock, sentences[:64], args.batch_size)
            kalm_runs, stock_runs = [], []
            for _ in range(args.rounds):
                kalm_runs.append(_throughput(kalm, sentences, args.batch_size))
                stock_runs.append(_throughput(stock, sentences, args.batch_size))
            k, s = statistics.median(kalm_runs), statistics.median(stock_runs)
            print(f"{dtype:>9} {k:12.1f} {s:10.1f} {k / s:6.3f}")


if __name__ == "__main__":
    main()
