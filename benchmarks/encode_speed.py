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


# ----------------------------------------------------------------------------------------------------------------------
# GPU case (benchmarks/gpu_check.py): the same comparison in bf16 on the GPU, per attention back-end
# ----------------------------------------------------------------------------------------------------------------------


def gpu_case(ctx) -> dict:
    """sentences/s of ``kalm_st.build_model`` in bf16 against a stock sentence-transformers stack (``Transformer`` +
    ``Pooling(mean)`` + ``Normalize``) on the same saved weights, alternating runs, per attention back-end."""
    from gpu_lib import BACKENDS, input_path, stsb_sentences
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData
    from sentence_transformers.sentence_transformer.modules import Pooling

    count, batch_size, rounds = ctx.pick((4096, 256, 3), (32, 16, 1))
    sentences = stsb_sentences(count)

    def run(backend: str) -> dict:
        folder = str(ctx.checkpoint())
        kalm = build_model(folder, dtype=ctx.dtype, attn_implementation=backend, device=ctx.device, max_seq_length=512)
        transformer = Transformer(
            folder, max_seq_length=512, model_kwargs={"dtype": ctx.torch_dtype(), "attn_implementation": backend}
        )
        stock = SentenceTransformer(
            modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean"), Normalize()],
            device=ctx.device,
            model_card_data=SentenceTransformerModelCardData(local_files_only=True),
        )
        stacks = {"kalm_st": kalm.eval(), "stock": stock.eval()}
        sample = sentences[: 2 * batch_size]
        with torch.inference_mode():
            encoded = [
                m.encode(sample, batch_size=batch_size, convert_to_tensor=True).float() for m in stacks.values()
            ]
            rates: dict[str, list[float]] = {name: [] for name in stacks}
            for _ in range(rounds):  # alternate, so drift in machine load hits both alike
                for name, model in stacks.items():
                    seconds = ctx.timed(lambda m=model: m.encode(sentences, batch_size=batch_size))
                    rates[name].append(len(sentences) / seconds)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        return {
            "path": input_path(kalm.preprocess(sample[:4])),
            "modules": {name: [type(m).__name__ for m in model] for name, model in stacks.items()},
            "sentences_per_s": medians,
            "ratio_kalm_over_stock": medians["kalm_st"] / medians["stock"],
            "min_cosine_kalm_vs_stock": float(torch.nn.functional.cosine_similarity(*encoded).min()),
        }

    return {
        "notes": [
            f"{ctx.dtype}, {len(sentences)} STS-B test sentences (data/stsb/test.csv), batch {batch_size}, "
            f"median of {rounds} alternating rounds"
        ],  # fmt: skip
        "runs": ctx.each(({"backend": b} for b in BACKENDS), run),
    }
