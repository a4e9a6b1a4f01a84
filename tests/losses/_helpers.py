"""Helpers for the loss tests (imported by the test modules): tokenised columns for the tiny model and real rows from ../shared/data."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

ANCHORS = [
    "A man is playing a guitar.",
    "How do I reset my card PIN?",
    "Two dogs run across a snowy field.",
    "The cat sleeps on the warm windowsill.",
    "What is the capital of France?",
    "I was charged twice for the same transaction.",
]
POSITIVES = [
    "Someone plays the guitar.",
    "Steps to change the PIN of my card.",
    "Dogs are running through the snow.",
    "A cat naps by the window.",
    "Paris is the capital of France.",
    "A duplicate charge appeared on my account.",
]
NEGATIVES_1 = [
    "A woman is slicing an onion in the kitchen.",
    "Children are playing football in the park.",
    "The cat sleeps on the warm windowsill.",
    "How do I reset my card PIN?",
    "A man is playing a guitar.",
    "Two dogs run across a snowy field.",
]
NEGATIVES_2 = [
    "What is the capital of Spain?",
    "My card was declined at the shop.",
    "Birds fly over the frozen lake.",
    "A dog sleeps on the sofa.",
    "Berlin is a large city.",
    "I want to close my account.",
]


def duplicate_columns() -> list[list[str]]:
    """(anchor, positive, negative_1, negative_2) whose negatives repeat positives, for the false-negative mask: row 1's
    and row 4's negative_1 are row 0's positive (row 4 is on the other process of a 2-process split of the 6 rows),
    row 3's negative_2 is its own positive. In-batch, 3 candidates are duplicates of a row's positive; own-only, 1."""
    negatives_1, negatives_2 = list(NEGATIVES_1), list(NEGATIVES_2)
    negatives_1[1], negatives_1[4], negatives_2[3] = POSITIVES[0], POSITIVES[0], POSITIVES[3]
    return [ANCHORS, POSITIVES, negatives_1, negatives_2]


def featurize(model, columns: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """One tokenised feature dict per column, as the trainer's collator builds them."""
    return [model.preprocess(texts) for texts in columns]


def params_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-4, 1e-5


def assert_same_loss_and_grads(
    actual: tuple[torch.Tensor | float, dict[str, torch.Tensor]],
    expected: tuple[torch.Tensor | float, dict[str, torch.Tensor]],
    msg: str = "",
) -> None:
    """Loss and parameter gradients of two float32 computations of the same maths that differ only in the order of
    their reductions (loss chunks, mini-batch re-embedding, merged vs separate forward passes, processes). That order,
    and so the rounding, changes with the CPU's kernels (AVX2 / AVX-512 / AMX) and the thread count.

    - Loss: ``rtol=1e-5`` (~100 float32 ulps; a Matryoshka loss of ~108 has ulp 7.6e-6, and the cached and plain
      losses were seen 2 ulps apart on AVX2) plus ``atol=1e-6`` for losses near 0. Observed: <= 3e-7 relative.
    - Gradients: ``rtol=1e-4`` plus ``atol = 1e-5 * max |expected gradient|``: the rounding errors of a backward pass
      scale with the magnitudes flowing through it, not with each entry. Observed: <= 1.5e-7 * max |g| beyond rtol.
    A real difference in the maths (a dropped candidate, a missed weight) moves both by orders of magnitude more.
    """
    (loss_a, grads_a), (loss_b, grads_b) = actual, expected
    loss_a, loss_b = torch.as_tensor(loss_a, dtype=torch.float64), torch.as_tensor(loss_b, dtype=torch.float64)
    torch.testing.assert_close(loss_a, loss_b, rtol=LOSS_RTOL, atol=LOSS_ATOL, msg=f"{msg} loss")
    assert grads_a.keys() == grads_b.keys() and grads_b, msg
    atol = GRAD_ATOL_SCALE * max(g.abs().max().item() for g in grads_b.values())
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=GRAD_RTOL, atol=atol, msg=f"{msg} {name}")


def trecqa_rows(shared_data_dir: Path, num_rows: int, num_negatives: int = 2) -> list[dict[str, str]]:
    """(anchor=question, positive=correct answer, negative_1..n=wrong answers a retriever returned) from TrecQA."""
    by_question: dict[str, dict[str, list[str]]] = {}
    with open(shared_data_dir / "trecqa" / "train.csv", newline="", encoding="utf8") as handle:
        for row in csv.DictReader(handle):
            entry = by_question.setdefault(row["qtext"], {"pos": [], "neg": []})
            entry["pos" if row["label"] == "1" else "neg"].append(row["atext"])
    rows = []
    for question, entry in by_question.items():
        if entry["pos"] and len(entry["neg"]) >= num_negatives:
            row = {"anchor": question, "positive": entry["pos"][0]}
            row.update({f"negative_{k + 1}": entry["neg"][k] for k in range(num_negatives)})
            rows.append(row)
        if len(rows) == num_rows:
            break
    return rows


def stsb_pairs(shared_data_dir: Path, num_rows: int) -> list[dict[str, str]]:
    """STS-B train pairs with score >= 4 as (anchor, positive)."""
    rows = []
    with open(shared_data_dir / "stsb" / "train.csv", newline="", encoding="utf8") as handle:
        for sentence1, sentence2, score in csv.reader(handle):
            if float(score) >= 4.0:
                rows.append({"anchor": sentence1, "positive": sentence2})
            if len(rows) == num_rows:
                break
    return rows
