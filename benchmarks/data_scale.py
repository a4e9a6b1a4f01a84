"""Data path at scale: wall time and peak RSS from config to the 10th training step, kalm-st vs plain ST.

Synthetic data in the layout of ``HIT-TMG/KaLM-embedding-pretrain-data`` (DATA_AND_SERVING.md §1): 25 task
sub-folders of parquet shards, ``query`` (the KaLM template + ~50 characters), ``pos`` (one ~300-character text),
``neg: []``. Texts are drawn from a pool of random word sequences, each made unique by its row number.

Variants, each measured in a fresh subprocess (its own peak RSS, ``ru_maxrss``), first with an empty ``datasets``
cache, then again with that cache in place:

- ``kalm-st``: ``data.sources: [{path: ROOT, tasks: subfolders}]``, a pretrain stage of ``builtin:tiny-qwen2``,
  focal InfoNCE (gamma 0), the task-homogeneous sampler, 10 steps of batch 32;
- ``plain-st``: what a user writes with sentence-transformers alone: ``load_dataset("parquet", data_files=...)`` per
  task, a batched ``map`` taking ``pos[0]`` as ``positive``, the same model and steps,
  ``MultipleNegativesRankingLoss`` and ``MultiDatasetBatchSamplers.PROPORTIONAL``.

Reported per run: wall seconds from process start to the end of step 10, peak RSS, and the median data time per step
(the gap between one step's end and the next one's start: fetching and collating the batch).

    python benchmarks/data_scale.py --rows 100000 1000000 5000000 --workdir /tmp/data_scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_START = time.perf_counter()
TASKS = 25
STEPS = 10
BATCH = 32


def generate(root: Path, rows: int, seed: int = 0) -> None:
    """KaLM-layout parquet: 25 sub-folders, shards of at most 200k rows, vectorised with pyarrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(
        ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(5000)]
    )

    def pool(n: int, n_words: int) -> pa.Array:
        return pa.array([" ".join(rng.choice(words, n_words)) for _ in range(n)])

    queries, docs = pool(4096, 8), pool(4096, 50)
    head = "Instruct: Given a query, retrieve documents that answer the query \n Query: "
    per_task = rows // TASKS
    shard = 200_000
    for t in range(TASKS):
        folder = root / f"source_{t:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        n_task = per_task + (rows - per_task * TASKS if t == 0 else 0)
        shards = max(1, -(-n_task // shard))
        for s in range(shards):
            n = min(shard, n_task - s * shard)
            ids = pc.cast(pa.array(np.arange(n) + s * shard + t * 10**9), pa.string())
            q = pc.binary_join_element_wise(head, queries.take(pa.array(rng.integers(0, 4096, n))), " ", ids, "")
            d = pc.binary_join_element_wise(docs.take(pa.array(rng.integers(0, 4096, n))), " ", ids, "")
            pos = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), d)
            neg = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.string()))
            pq.write_table(
                pa.table({"query": q, "pos": pos, "neg": neg}), folder / f"train-{s:05d}-of-{shards:05d}.parquet"
            )


class _Timer:
    """A TrainerCallback: time at step 10 and the gaps between steps (data loading + collation)."""

    def __init__(self, start: float) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if timer.last_end is not None:
                    timer.gaps.append(time.perf_counter() - timer.last_end)
                if state.global_step == 0 and timer.first_step is None:
                    timer.first_step = time.perf_counter() - start

            def on_step_end(self, args, state, control, **kwargs):
                timer.last_end = time.perf_counter()
                if state.global_step == STEPS:
                    timer.at_step = timer.last_end - start

        self.callback = Callback()
        self.gaps: list[float] = []
        self.last_end: float | None = None
        self.first_step: float | None = None
        self.at_step: float | None = None


class _AnonPeak:
    """Peak private (anonymous) memory, sampled from /proc/self/status every 20 ms.

    ``ru_maxrss`` also counts the file-backed pages of memory-mapped Arrow files that were read (page cache shared
    with the kernel, dropped under memory pressure); ``RssAnon`` is the memory the process itself holds.
    """

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _anon_kb() -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._anon_kb())
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._anon_kb()) / 2**20


def _child(variant: str, root: Path, out: Path, start: float) -> None:
    import statistics

    anon = _AnonPeak()
    timer = _Timer(start)
    common = {
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_drop_last": True,
        "logging_steps": 100,
        "seed": 0,
    }
    if variant == "kalm-st":
        from kalm_st.recipe.build import build_stage
        from kalm_st.recipe.config import StageConfig

        config = StageConfig.from_dict(
            {
                "stage": "pretrain",
                "output_dir": str(out / "run"),
                "model": {"init_from": "builtin:tiny-qwen2", "max_seq_length": 64, "dtype": "float32"},
                "data": {"sources": [{"path": str(root), "tasks": "subfolders"}], "num_negatives": 0},
                "loss": {"name": "focal_infonce", "kwargs": {"temperature": 0.05, "gamma": 0.0}},
                "args": common,
            },
            source="data_scale",
        )
        run = build_stage(config, callbacks=[timer.callback])
        trainer, rows = run.trainer, sum(len(d) for d in run.train_dataset.values())
    else:
        import tempfile

        from datasets import DatasetDict, load_dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.base.sampler import MultiDatasetBatchSamplers
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        from kalm_st.model import build_model
        from kalm_st.recipe.backbones import write_builtin_backbone

        def first_positive(batch):
            return {"anchor": batch["query"], "positive": [p[0] for p in batch["pos"]]}

        data = DatasetDict()
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            ds = load_dataset("parquet", data_files=str(folder / "*.parquet"), split="train")
            data[folder.name] = ds.map(first_positive, batched=True, remove_columns=ds.column_names)
        with tempfile.TemporaryDirectory() as tmp:
            write_builtin_backbone("builtin:tiny-qwen2", tmp, seed=0)
            model = build_model(tmp, max_seq_length=64, dtype="float32")
        args = SentenceTransformerTrainingArguments(
            output_dir=str(out / "run"), multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL, **common
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=data,
            loss=MultipleNegativesRankingLoss(model),
            callbacks=[timer.callback],
        )
        rows = sum(len(d) for d in data.values())
    trainer.train()
    result = {
        "variant": variant,
        "rows": rows,
        "wall_to_step10_s": timer.at_step,
        "wall_to_step1_s": timer.first_step,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_anon_gb": anon.stop(),
        "data_s_per_step_median": statistics.median(timer.gaps) if timer.gaps else None,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _measure(variant: str, root: Path, out: Path, cache: Path) -> dict:
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--root", str(root), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/data_scale"))
    parser.add_argument("--child")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.root, args.out, _START)
        return
    results = []
    for rows in args.rows:
        root = args.workdir / f"data_{rows}"
        if not root.exists():
            t0 = time.perf_counter()
            generate(root, rows)
            print(f"generated {rows} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        for variant in ("kalm-st", "plain-st"):
            cache = args.workdir / f"cache_{rows}_{variant}"
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("first", "cached"):
                load = os.getloadavg()[0]
                result = _measure(variant, root, args.workdir / f"out_{variant}", cache)
                result.update(run=run, load_1min=round(load, 2))
                results.append(result)
                print(json.dumps(result), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    print(
        "\n| rows | variant | run | to step 1 (s) | to step 10 (s) | peak RSS (GB) | peak anon (GB) | data s/step | load |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['variant']} | {r['run']} | {r['wall_to_step1_s']:.1f} | "
            f"{r['wall_to_step10_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} | "
            f"{r['data_s_per_step_median']:.4f} | {r['load_1min']} |"
        )


if __name__ == "__main__":
    main()
