"""Tokens/s and padding waste of training steps: kalm-st's task-homogeneous, length-aware batching vs ST's samplers.

Same real data (``../shared/data``: STS-B train pairs with score >= 4, TrecQA train question/correct answer, Banking77
train through example-based labelling), same model (all-MiniLM-L6-v2), same loss (MultipleNegativesRankingLoss),
same number of steps; only the batch order differs. Each step = tokenise the batch's columns (pad to the longest
in the batch) + forward + backward. Padding waste = padded positions / all positions.

    .venv/bin/python benchmarks/train_throughput.py --steps 30 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, DatasetDict, concatenate_datasets  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.sampler import DefaultBatchSampler, ProportionalBatchSampler  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from torch.utils.data import BatchSampler, ConcatDataset, RandomSampler  # noqa: E402

from kalm_st.data import label_examples  # noqa: E402
from kalm_st.sampling import TaskHomogeneousBatchSampler  # noqa: E402
from kalm_st.testing import minilm_dir  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_tasks(data_dir: Path, seed: int) -> DatasetDict:
    stsb = pd.read_csv(data_dir / "stsb" / "train.csv", header=None, names=["s1", "s2", "score"])
    stsb = stsb[stsb["score"] >= 4.0]
    trec = pd.read_csv(data_dir / "trecqa" / "train.csv")
    trec = trec[trec["label"] == 1]
    banking = pd.read_csv(data_dir / "banking77" / "train.csv").rename(columns={"category": "label"})
    labelled = label_examples(
        Dataset.from_pandas(banking, preserve_index=False), num_negatives=1, seed=seed, show_progress_bar=False
    ).select_columns(["anchor", "positive"])
    return DatasetDict(
        {
            "STSBenchmark": Dataset.from_dict({"anchor": list(stsb["s1"]), "positive": list(stsb["s2"])}),
            "TrecQARetrieval": Dataset.from_dict({"anchor": list(trec["qtext"]), "positive": list(trec["atext"])}),
            "Banking77Classification": labelled,
        }
    )


def samplers(data: DatasetDict, batch_size: int, seed: int) -> dict[str, list[list[int]]]:
    """Batches (indices into the concatenation of the tasks) of each strategy, as the trainer would build them."""
    concat = ConcatDataset(list(data.values()))
    generator = torch.Generator().manual_seed(seed)

    def children() -> list[BatchSampler]:
        return [
            DefaultBatchSampler(RandomSampler(d, generator=generator), batch_size=batch_size, drop_last=True)
            for d in data.values()
        ]

    flat = concatenate_datasets(list(data.values()))
    st_default = DefaultBatchSampler(RandomSampler(flat, generator=generator), batch_size=batch_size, drop_last=True)
    st_proportional = ProportionalBatchSampler(concat, children(), generator=generator, seed=seed)
    kalm = TaskHomogeneousBatchSampler(concat, children(), seed=seed, world_size=1)
    kalm_length = TaskHomogeneousBatchSampler(
        concat, children(), seed=seed, world_size=1, length_aware=True, length_window=16
    )
    return {
        "ST default (one shuffled dataset)": list(st_default),
        "ST proportional (per-task batches)": list(st_proportional),
        "kalm homogeneous": list(kalm),
        "kalm homogeneous + length-aware": list(kalm_length),
    }


def run(model: SentenceTransformer, flat: Dataset, batches: list[list[int]], steps: int, max_length: int) -> dict:
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every strategy sees the same weights
    real = padded = 0
    elapsed = 0.0
    for batch in batches[:steps]:
        rows = flat.select(batch)
        start = time.perf_counter()
        features = []
        for column in ("anchor", "positive"):
            tokens = model.preprocess(list(rows[column]))
            real += int(tokens["attention_mask"].sum())
            padded += tokens["attention_mask"].numel()
            features.append(tokens)
        loss = loss_fn(features, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - start
    steps_run = min(steps, len(batches))
    return {
        "steps": steps_run,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_waste": 1 - real / padded,
        "tokens_per_s": real / elapsed,
        "s_per_step": elapsed / steps_run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = load_tasks(args.data_dir, args.seed)
    flat = concatenate_datasets(list(data.values()))
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = args.max_length
    model.train()
    print(f"data: {', '.join(f'{t}={len(d)}' for t, d in data.items())}; batch {args.batch_size}, {args.steps} steps")
    # warm-up so the first strategy does not pay for allocator / kernel initialisation
    run(model, flat, [list(range(args.batch_size))] * 2, 2, args.max_length)
    results = {
        name: run(model, flat, batches, args.steps, args.max_length)
        for name, batches in samplers(data, args.batch_size, args.seed).items()
    }
    base = results["ST default (one shuffled dataset)"]
    print(f"{'strategy':38} {'tokens/s':>9} {'s/step':>7} {'pad waste':>9} {'x tokens/s':>10} {'x padded':>9}")
    for name, r in results.items():
        print(
            f"{name:38} {r['tokens_per_s']:9.0f} {r['s_per_step']:7.3f} {r['padding_waste']:9.1%} "
            f"{r['tokens_per_s'] / base['tokens_per_s']:10.2f} {r['padded_tokens'] / base['padded_tokens']:9.2f}"
        )


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------------------------------
# GPU case (benchmarks/gpu_check.py): forward + backward tokens/s and model FLOP utilisation of the real model shape
# ----------------------------------------------------------------------------------------------------------------------


def _pair_info_nce(embeddings: torch.Tensor) -> torch.Tensor:
    """In-batch InfoNCE of the first half (queries) against the second half (documents), temperature 0.05."""
    half = embeddings.size(0) // 2
    logits = embeddings[:half] @ embeddings[half : 2 * half].T / 0.05
    return torch.nn.functional.cross_entropy(logits.float(), torch.arange(half, device=logits.device))


def gpu_case(ctx) -> dict:
    """A Qwen2-0.5B-shaped embedder (random weights, the real tokenizer), bf16, 48 texts x 512 tokens: forward +
    backward tokens/s, MFU and peak memory for sdpa and flash-attention-2, with and without activation
    checkpointing (the CPU smoke: the tiny config, 4 x 32)."""
    from gpu_lib import BACKENDS, flop_count, input_path, long_texts, peak_bf16_tflops, text_lengths

    batch, seq, warmup, steps = ctx.pick((48, 512, 2, 5), (4, 32, 1, 2))
    device_name = torch.cuda.get_device_name() if not ctx.smoke else "cpu"
    peak, source = peak_bf16_tflops(device_name) if not ctx.smoke else (None, None)
    if ctx.peak_override is not None:
        peak, source = ctx.peak_override, "--peak-tflops"

    def run(backend: str, checkpointing: bool) -> dict:
        model = ctx.load(backend, seq)
        model.train()
        if checkpointing:
            backbone = model[0].auto_model
            # transformers 5 renamed gradient_checkpointing_enable (which now warns) to activation_checkpointing_enable
            enable = (
                getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})
            if not any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules()):
                raise RuntimeError("activation checkpointing did not switch on")
        features = ctx.features(model, long_texts(batch, seq))
        lengths = text_lengths(features)
        flops = flop_count(model[0].auto_model.config, lengths)
        losses: list[float] = []

        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss = _pair_info_nce(model(dict(features))["sentence_embedding"])
            loss.backward()
            losses.append(float(loss.detach()))

        times, timing = ctx.median_times(step, warmup, steps)
        step_s = timing["step_s_median"]
        hardware = flops["hardware_flops_with_checkpointing"] if checkpointing else flops["model_flops"]
        return {
            "path": input_path(features),
            "tokens_per_step": flops["tokens"],
            "min_max_len": [min(lengths), max(lengths)],
            "tokens_per_s": flops["tokens"] / step_s,
            "model_flops_per_step": flops["model_flops"],
            "hardware_flops_per_step": hardware,
            "model_tflops_per_s": flops["model_flops"] / step_s / 1e12,
            "mfu": flops["model_flops"] / step_s / 1e12 / peak if peak else None,
            "hfu": hardware / step_s / 1e12 / peak if peak else None,
            "loss_first_last": [losses[0], losses[-1]],
            **timing,
        }

    runs = ctx.each(({"backend": b, "checkpointing": c} for b in BACKENDS for c in (False, True)), run)
    full = flop_count(ctx.config(), [seq] * batch)
    mfus = [r["mfu"] for r in runs if r["status"] == "ok" and not r["checkpointing"] and r["mfu"] is not None]
    return {
        "notes": [
            f"{batch} x {seq} tokens, {ctx.dtype}, random weights; loss: in-batch InfoNCE over {batch // 2} pairs; "
            "no optimizer step.",
            f"Model FLOPs/step = 3 * (2*N*T + 4*L*H*sum_i s_i^2); at full rows N = {full['matmul_params']:,}, "
            f"T = {full['tokens']:,}: 6*N*T = {3 * full['dense_forward']:.4g}, attention term "
            f"{3 * full['attention_forward']:.4g}. HFU with checkpointing: 4 * forward.",
            f"Peak bf16: {peak} TFLOP/s ({source or 'device not in the table: pass --peak-tflops'}), {device_name}.",
        ],
        "batch": batch,
        "seq_len": seq,
        "peak_bf16_tflops": peak,
        "runs": runs,
        "goals": {"mfu_at_least_40_percent": max(mfus) >= 0.40 if mfus else None},
    }
