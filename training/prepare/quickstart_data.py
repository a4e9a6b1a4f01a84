"""Write the quickstart's data files (``data/quickstart/``) from the bundled STS-B, TrecQA and Banking77 copies.

The files are committed; this script documents and reproduces them (deterministic, seed 0):

    python training/prepare/quickstart_data.py          # rewrites data/quickstart/ (byte-identical)

Every file is in a format kalm-st reads (``kalm_st.data.load``; mteb's local task layout for ``eval/``):

| file | rows | what |
|---|---|---|
| ``stage1_sts.jsonl`` | 640 | weak pairs: distinct STS-B train pairs scored >= 3 |
| ``stage1_trecqa.jsonl`` | 348 | weak pairs: TrecQA train (question, correct answer), all of them |
| ``curate_sts.jsonl`` + ``corpus_sts.jsonl`` | 96 / corpus | STS-B train pairs scored >= 4, to filter and mine negatives for; the corpus is every sentence of 192 sampled train pairs |
| ``curate_trecqa.jsonl`` + ``corpus_trecqa.jsonl`` | 16 questions / corpus | TrecQA train (question, correct answer); the corpus is every candidate answer of those questions (real retrieved negatives) |
| ``banking77_sample.csv`` | 128 | a class-balanced Banking77 train sample (16 intents x 8 texts), to label example-based |
| ``eval/stsb/test.csv`` | 200 | held-out STS-B test pairs (mteb's STSBenchmark on local files; the whole test takes 3 min more per evaluation on an AVX2-only CPU, past the quickstart's budget: docs/quickstart.md reports it separately) |
| ``eval/trecqa/test.csv`` | 20 questions | held-out TrecQA test questions with their candidates (TrecQAReranking) |
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "data"
TARGET = ROOT / "data" / "quickstart"
STS_TASK, TRECQA_TASK = "STSBenchmark", "TrecQARetrieval"


def _csv(path: Path, header: bool = True) -> list:
    with path.open(encoding="utf8", newline="") as handle:
        return list(csv.DictReader(handle)) if header else list(csv.reader(handle))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _trecqa_rows(split: str) -> list[dict[str, str]]:
    return _csv(SOURCE / "trecqa" / f"{split}.csv")


def _trecqa(split: str) -> dict[str, dict[str, list[str]]]:
    """question -> {"pos": [...], "neg": [...]} in file order."""
    out: dict[str, dict[str, list[str]]] = {}
    for row in _trecqa_rows(split):
        entry = out.setdefault(row["qtext"], {"pos": [], "neg": []})
        entry["pos" if row["label"] == "1" else "neg"].append(row["atext"])
    return out


def stage1() -> None:
    rng = random.Random(0)
    pairs = [r for r in _csv(SOURCE / "stsb" / "train.csv", header=False) if float(r[2]) >= 3.0]
    rng.shuffle(pairs)
    # STS-B train repeats a few (sentence1, sentence2) pairs; a repeat in one batch is a false in-batch negative
    distinct = list({(a, p): None for a, p, _ in pairs})
    _jsonl(TARGET / "stage1_sts.jsonl", [{"task": STS_TASK, "anchor": a, "positive": p} for a, p in distinct[:640]])
    qa = [{"task": TRECQA_TASK, "anchor": q, "positive": p} for q, e in _trecqa("train").items() for p in e["pos"]]
    rng.shuffle(qa)
    _jsonl(TARGET / "stage1_trecqa.jsonl", qa[:512])


def curation() -> None:
    rng = random.Random(0)
    pairs = _csv(SOURCE / "stsb" / "train.csv", header=False)
    rng.shuffle(pairs)
    strong = [r for r in pairs if float(r[2]) >= 4.0][:96]
    corpus = sorted({t for r in pairs[:192] for t in r[:2]} | {r[1] for r in strong})
    _jsonl(TARGET / "curate_sts.jsonl", [{"task": STS_TASK, "anchor": r[0], "positive": r[1]} for r in strong])
    _jsonl(TARGET / "corpus_sts.jsonl", [{"text": t} for t in corpus])
    questions = list(_trecqa("train").items())[:16]
    rows = [{"task": TRECQA_TASK, "anchor": q, "positive": p} for q, e in questions for p in e["pos"]]
    _jsonl(TARGET / "curate_trecqa.jsonl", rows)
    _jsonl(
        TARGET / "corpus_trecqa.jsonl",
        [{"text": t} for t in sorted({t for _, e in questions for t in e["pos"] + e["neg"]})],
    )

    rows = _csv(SOURCE / "banking77" / "train.csv")
    classes = sorted({r["category"] for r in rows})
    rng.shuffle(classes)
    chosen = set(classes[:16])
    per_class: dict[str, list[str]] = {}
    for r in rows:
        if r["category"] in chosen and len(per_class.setdefault(r["category"], [])) < 8:
            per_class[r["category"]].append(r["text"])
    with (TARGET / "banking77_sample.csv").open("w", encoding="utf8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([text, label] for label, texts in per_class.items() for text in texts)


def evaluation() -> None:
    sts = _csv(SOURCE / "stsb" / "test.csv", header=False)[:200]
    (TARGET / "eval" / "stsb").mkdir(parents=True, exist_ok=True)
    with (TARGET / "eval" / "stsb" / "test.csv").open("w", encoding="utf8", newline="") as handle:
        csv.writer(handle).writerows(sts)
    answered = [q for q, e in _trecqa("test").items() if e["pos"] and e["neg"]][:20]
    keep = set(answered)
    (TARGET / "eval" / "trecqa").mkdir(parents=True, exist_ok=True)
    with (TARGET / "eval" / "trecqa" / "test.csv").open("w", encoding="utf8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["qtext", "label", "atext"])
        writer.writeheader()
        writer.writerows(r for r in _trecqa_rows("test") if r["qtext"] in keep)


if __name__ == "__main__":
    stage1()
    curation()
    evaluation()
    print(f"wrote {TARGET}")
