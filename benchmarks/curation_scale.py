"""Curation at scale: mining hard negatives against a 200k-document corpus, kalm-st vs sentence-transformers' miner.

Synthetic data: ``--docs`` distinct documents (25-60 random words, made unique by their row number) and ``--queries``
(anchor, positive) pairs whose positive is one of the documents. Model: ``builtin:tiny-qwen2`` (a random 2-layer
Qwen2 with the real Qwen2 tokenizer; mining speed and memory do not depend on its quality), max_seq_length 64.
KaLM's settings: ranks 50-100, 7 negatives, random sampling.

Each variant runs in a fresh subprocess (its own peak RSS, ``ru_maxrss``), in one run:

- ``st``: ``sentence_transformers.util.mine_hard_negatives`` (in-memory lists and tensors; no resume);
- ``kalm-st``: :func:`kalm_st.data.mine_hard_negatives`, embeddings in an on-disk store (chunks of 8192 texts);
- ``kalm-st cached``: the same call again: every embedding read from the store, nothing encoded;
- ``kill + resume``: a fresh store, SIGKILL once ``--kill-at`` chunk parts are on disk, then the same call again;
  reported: the texts the resumed run encoded, its wall time, and whether its rows equal the uninterrupted run's.

    python benchmarks/curation_scale.py --docs 200000 --queries 20000 --workdir /tmp/curation_scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_START = time.perf_counter()
MAX_SEQ_LENGTH = 64
BATCH = 128


def generate(root: Path, n_docs: int, n_queries: int, seed: int = 0) -> None:
    """``corpus.parquet`` (``text``) and ``pairs.parquet`` (``anchor``, ``positive``), vectorised."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array(
        ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(5000)]
    )

    def texts(n: int, low: int, high: int, tag: str) -> pa.Array:
        pool = pa.array([" ".join(rng.choice(words, rng.integers(low, high))) for _ in range(min(n, 4096))])
        picked = pool.take(pa.array(rng.integers(0, len(pool), n)))
        numbers = pc.cast(pa.array(np.arange(n)), pa.string())
        return pc.binary_join_element_wise(picked, pc.binary_join_element_wise(pa.scalar(tag), numbers, ""), " ")

    corpus = texts(n_docs, 25, 60, "doc")
    anchors = texts(n_queries, 6, 16, "question")
    positives = corpus.take(pa.array(rng.choice(n_docs, n_queries, replace=False)))
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": corpus}), root / "corpus.parquet")
    pq.write_table(pa.table({"anchor": anchors, "positive": positives}), root / "pairs.parquet")


def worker(variant: str, root: Path, cache: Path, out: Path) -> None:
    """One variant in this process; writes its wall time, peak RSS and a digest of the mined rows to ``out``."""
    import hashlib
    import logging

    import pyarrow.parquet as pq
    from datasets import Dataset

    from kalm_st.model import build_model
    from kalm_st.recipe.backbones import write_builtin_backbone

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = root / "tiny-qwen2"
    if not (model_dir / "config.json").is_file():
        write_builtin_backbone("builtin:tiny-qwen2", model_dir)
    model = build_model(str(model_dir), max_seq_length=MAX_SEQ_LENGTH, dtype="float32")
    pairs = Dataset(pq.read_table(root / "pairs.parquet"))
    corpus_table = pq.read_table(root / "corpus.parquet")
    begin = time.perf_counter()
    common = {"range_min": 50, "range_max": 100, "num_negatives": 7, "batch_size": BATCH}
    if variant == "st":
        from sentence_transformers.util import mine_hard_negatives

        mined = mine_hard_negatives(
            pairs, model, corpus=corpus_table.column("text").to_pylist(), output_format="n-tuple",
            sampling_strategy="random", query_prompt="", corpus_prompt="", use_faiss=False, verbose=False, **common,
        )  # fmt: skip
    else:
        from kalm_st.data import mine_hard_negatives

        mined = mine_hard_negatives(
            pairs, model, corpus=corpus_table.column("text"), query_prompt="", corpus_prompt="", cache_folder=cache,
            use_faiss=False, seed=0, **common,
        )  # fmt: skip
    seconds = time.perf_counter() - begin
    digest = hashlib.sha256(json.dumps(sorted(map(json.dumps, mined.to_list()))).encode()).hexdigest()[:16]
    result = {
        "variant": variant,
        "rows": len(mined),
        "mine_seconds": round(seconds, 1),
        "wall_seconds": round(time.perf_counter() - _START, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "digest": digest,
    }
    out.write_text(json.dumps(result))


def _run(variant: str, root: Path, cache: Path, name: str, kill_at: int | None = None) -> dict:
    out = root / f"{name}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", variant, "--workdir", str(root), "--cache", str(cache), "--out",
               str(out)]  # fmt: skip
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if kill_at is not None:
        while len(list(cache.rglob("part-*.keys.npy"))) < kill_at:
            if process.poll() is not None:
                raise RuntimeError(f"{name}: ended before {kill_at} parts were written (see {root / name}.log)")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        log.close()
        return {"variant": variant, "killed_after_parts": kill_at}
    process.wait()
    log.close()
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed, see {root / name}.log")
    result = {"name": name, **json.loads(out.read_text())}
    encoded = [line for line in (root / f"{name}.log").read_text().splitlines() if "encode_cached:" in line]
    result["encoded_texts"] = (
        sum(int(line.split(", ")[-1].split(" to encode")[0]) for line in encoded) if encoded else None
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--kill-at", type=int, default=10, help="SIGKILL after this many embedding parts")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curation_scale"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.workdir, args.cache, args.out)
        return
    root = args.workdir
    shutil.rmtree(root, ignore_errors=True)
    generate(root, args.docs, args.queries)
    results = [
        _run("st", root, root / "unused", "st"),
        _run("kalm-st", root, root / "store", "kalm-st"),
        _run("kalm-st", root, root / "store", "kalm-st cached"),
    ]
    _run("kalm-st", root, root / "store-killed", "killed", kill_at=args.kill_at)
    resumed = _run("kalm-st", root, root / "store-killed", "kill + resume")
    resumed["same_rows_as_uninterrupted"] = resumed["digest"] == results[1]["digest"]
    results.append(resumed)
    print(f"\n{args.docs} documents, {args.queries} queries, tiny-qwen2, ranks 50-100, 7 negatives")  # noqa: T201
    print(f"{'variant':<16}{'rows':>8}{'mine s':>9}{'wall s':>9}{'peak RSS GB':>13}{'encoded':>10}")  # noqa: T201
    for r in results:
        encoded = "-" if r.get("encoded_texts") is None else r["encoded_texts"]
        print(  # noqa: T201
            f"{r['name']:<16}{r['rows']:>8}{r['mine_seconds']:>9}{r['wall_seconds']:>9}{r['peak_rss_gb']:>13}"
            f"{encoded!s:>10}"
        )
    print(f"resumed rows identical to the uninterrupted run: {resumed['same_rows_as_uninterrupted']}")  # noqa: T201
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
