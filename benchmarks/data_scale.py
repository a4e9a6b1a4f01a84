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

``--variants``: the reader alone, per input variant (issue 22), CPU seconds and private memory per million rows,
first start (empty ``datasets`` cache) and cached start, kalm-st's stage reader (``load_sources``, what
``kalm-st train --dry-run`` runs) side by side with plain sentence-transformers loading the same rows
(``load_dataset`` + one batched Arrow ``map`` to ``anchor, positive, negative_1..k[, label]``). One parquet file
(or the same rows as JSON lines, ``--format jsonl``) per variant: kalm-st's layout plain (3 negatives), + a per-row
``instruction``, + integer ``label`` lists, + float scores truncated (7 negatives, ``num_negatives: 3``), ragged
(0..7 negatives); the KaLM layout (``query``, ``pos``, ``neg``).

    python benchmarks/data_scale.py --variants --rows 1000000 4000000 --workdir /tmp/data_scale
    python benchmarks/data_scale.py --variants --format jsonl --rows 1000000 --workdir /tmp/data_scale  # same rows
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


VARIANTS = ("plain", "instruction", "int_labels", "truncated_scores", "ragged", "kalm")


def generate_variant(path: Path, variant: str, rows: int, seed: int = 0) -> None:
    """One parquet file of ``rows`` rows of a variant, built with pyarrow (shards of 500k rows in row groups)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(list("abcdefghij"), rng.integers(2, 9))) for _ in range(3000)])
    queries = pa.array([" ".join(rng.choice(words, 6)) for _ in range(4096)])
    docs = pa.array([" ".join(rng.choice(words, 20)) for _ in range(4096)])
    k = 7 if variant in ("truncated_scores", "ragged") else 3
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    for start in range(0, rows, 500_000):
        n = min(500_000, rows - start)
        ids = pc.cast(pa.array(np.arange(start, start + n)), pa.string())

        def texts(pool: pa.Array, count: int, salt: str) -> pa.Array:
            picked = pool.take(pa.array(rng.integers(0, len(pool), count)))
            return pc.binary_join_element_wise(picked, " ", pc.cast(pa.array(np.arange(count)), pa.string()), salt, "")

        lengths = (np.arange(start, start + n) % 8) if variant == "ragged" else np.full(n, k)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        negatives = pa.ListArray.from_arrays(offsets, texts(docs, int(lengths.sum()), f"n{start}"))
        query = pc.binary_join_element_wise(texts(queries, n, "q"), ids, " ")
        positive = pc.binary_join_element_wise(texts(docs, n, "p"), ids, " ")
        if variant == "kalm":
            one = pa.array(np.arange(n + 1, dtype=np.int32))
            table = pa.table({"query": query, "pos": pa.ListArray.from_arrays(one, positive), "neg": negatives})
        else:
            table = pa.table({"anchor": query, "positive": positive, "negatives": negatives})
        if variant == "instruction":
            topics = pc.cast(pa.array(np.arange(start, start + n) % 100), pa.string())
            table = table.append_column(
                "instruction", pc.binary_join_element_wise("Find passages on topic", topics, " ")
            )
        if variant in ("int_labels", "truncated_scores"):
            values = rng.integers(0, 4, n * (k + 1)) if variant == "int_labels" else rng.random(n * (k + 1))
            step = pa.array(np.arange(n + 1, dtype=np.int32) * (k + 1))
            table = table.append_column("label", pa.ListArray.from_arrays(step, pa.array(values)))
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=100_000)
    writer.close()


def to_jsonl(parquet: Path, path: Path) -> None:
    """The same rows as JSON lines (pandas, 100k rows at a time)."""
    import pyarrow.parquet as pq

    with open(path.with_suffix(".partial"), "w", encoding="utf8") as handle:
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=100_000):
            batch.to_pandas().to_json(handle, orient="records", lines=True, force_ascii=False)
    path.with_suffix(".partial").replace(path)


def _anon_kb() -> int:
    return _AnonPeak._anon_kb()


def _variant_child(variant: str, side: str, path: Path, out: Path) -> None:
    """Load one variant's file in this process: CPU seconds and private memory added by the loading alone."""
    import datasets  # noqa: F401 - imported before the baseline, as the reader's own imports

    from kalm_st.recipe.build import load_sources, resolve_tasks  # noqa: F401

    if side == "kalm-st":  # the config is built (and its imports done) before the baseline: loading alone counts
        from kalm_st.recipe.config import StageConfig

        config = StageConfig.from_dict(
            {
                "stage": "pretrain",
                "output_dir": str(out),
                "model": {"init_from": "builtin:tiny-qwen2"},
                "data": {
                    "tasks": {variant: {"path": str(path)}},
                    "num_negatives": 3 if variant == "truncated_scores" else None,
                },
                "loss": {"name": "focal_infonce"},
                "args": {"per_device_train_batch_size": 1},
            },
            source="data_scale",
        )
    base = _anon_kb()
    anon = _AnonPeak()
    cpu = os.times()
    if side == "kalm-st":
        data, _ = load_sources(config, resolve_tasks(config, config.data.tasks))
        rows = len(data[variant])
    else:
        import pyarrow as pa
        import pyarrow.compute as pc
        from datasets import load_dataset

        k = 1 if variant == "ragged" else 3

        def to_st(batch: pa.Table) -> pa.Table:  # what a user writes: anchor, positive, negative_1..k[, label]
            query = batch.column("query" if variant == "kalm" else "anchor")
            positive = pc.list_element(batch.column("pos"), 0) if variant == "kalm" else batch.column("positive")
            negatives = batch.column("neg" if variant == "kalm" else "negatives")
            columns = {"anchor": query, "positive": positive}
            columns.update({f"negative_{j + 1}": pc.list_element(negatives, j) for j in range(k)})
            if "label" in batch.column_names:
                columns["label"] = pc.list_slice(batch.column("label"), 0, k + 1)
            return pa.table(columns)

        builder = "json" if path.suffix == ".jsonl" else "parquet"
        dataset = load_dataset(builder, data_files=str(path), split="train")
        if variant == "ragged":  # plain ST takes one negative from the rows that have one
            dataset = dataset.with_format("arrow").filter(
                lambda b: pc.greater(pc.list_value_length(b.column("negatives")), 0), batched=True
            )
        dataset = dataset.with_format("arrow").map(to_st, batched=True, remove_columns=dataset.column_names)
        rows = len(dataset)
    after = os.times()
    result = {
        "cpu_s": (after.user - cpu.user) + (after.system - cpu.system),
        "anon_gb": max(0.0, anon.stop() - base / 2**20),
        "rows_out": rows,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _variants(rows_list: list[int], workdir: Path, names: list[str], fmt: str = "parquet") -> None:
    results = []
    for rows in rows_list:
        for variant in names:
            parquet = workdir / f"variants_{rows}" / f"{variant}.parquet"
            if not parquet.exists():
                generate_variant(parquet, variant, rows)
            path = parquet.with_suffix(f".{fmt}")
            if not path.exists():
                to_jsonl(parquet, path)
            for side in ("kalm-st", "plain-st"):
                cache = workdir / f"cache_{rows}_{variant}_{fmt}_{side}"
                shutil.rmtree(cache, ignore_errors=True)
                for run in ("first", "cached"):
                    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
                    command = [sys.executable, __file__, "--variant-child", variant, "--side", side]
                    command += ["--root", str(path), "--out", str(workdir / "out")]
                    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        raise RuntimeError(f"{variant} {side} failed:\n{proc.stderr[-4000:]}")
                    result = {"rows": rows, "variant": variant, "side": side, "run": run, **json.loads(line[7:])}
                    result["load_1min"] = round(os.getloadavg()[0], 1)
                    results.append(result)
                    print(json.dumps(result), flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{fmt} files:")
    print("\n| rows | variant | run | kalm-st CPU s/M | plain ST CPU s/M | kalm-st anon GB/M | plain ST anon GB/M |")
    print("|---:|---|---|---:|---:|---:|---:|")
    by = {(r["rows"], r["variant"], r["side"], r["run"]): r for r in results}
    worst_anon, worst_ratio = 0.0, 0.0
    for rows in rows_list:
        m = rows / 1e6
        for variant in names:
            for run in ("first", "cached"):
                ours, plain = by[(rows, variant, "kalm-st", run)], by[(rows, variant, "plain-st", run)]
                kalm = by[(rows, "kalm", "kalm-st", run)]
                worst_anon = max(worst_anon, ours["anon_gb"] / m)
                worst_ratio = max(worst_ratio, ours["cpu_s"] / max(kalm["cpu_s"], 1e-9))
                print(
                    f"| {rows:,} | {variant} | {run} | {ours['cpu_s'] / m:.1f} | {plain['cpu_s'] / m:.1f} | "
                    f"{ours['anon_gb'] / m:.3f} | {plain['anon_gb'] / m:.3f} |"
                )
    print(
        f"headline: every variant at most {worst_anon:.3f} GB private memory per M rows (goal <= 0.1) and at most "
        f"{worst_ratio:.2f}x the KaLM layout's CPU time (goal <= 2x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/data_scale"))
    parser.add_argument("--variants", action="store_true", help="the reader alone, per input variant")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="these variants")
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="--variants' file format")
    parser.add_argument("--variant-child")
    parser.add_argument("--side")
    parser.add_argument("--child")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.root, args.out, _START)
        return
    if args.variant_child:
        _variant_child(args.variant_child, args.side, args.root, args.out)
        return
    if args.variants:
        _variants(args.rows, args.workdir, args.only, args.format)
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
