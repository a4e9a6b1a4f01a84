"""One record batch of any input layout -> kalm-st's training columns: the batched function that
:mod:`kalm_st.data.load` maps over each shard (``Dataset.map(batched=True)`` in Arrow format), in ``pyarrow.compute``
and numpy, no Python object per row. The policy it applies (negatives, positives, instructions) is the reader's,
described in :mod:`kalm_st.data.load`; :class:`BatchPlan` carries what it decided for one part of a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kalm_st.data.checks import Problems
from kalm_st.data.columns import POSITIVE_GROUP
from kalm_st.data.positive_groups import mix
from kalm_st.data.readers import Layout, numbers, read_rows
from kalm_st.instructions import INSTRUCTED_TEXT_PATTERN, KALM_INSTRUCTION_TEMPLATE


@dataclass(eq=False)
class BatchPlan:
    """What the batched conversion of one part needs (hashed into the cache file's fingerprint)."""

    layout: Layout
    label: str
    unit: str
    first: int
    first_row: int
    row_numbers: np.ndarray | None
    n: int
    expand: bool
    group_offset: int
    seed: int
    ragged: str
    policy: str
    bake: bool
    instruction: str
    documents: bool


def convert_batch(batch: pa.Table, indices: list[int], plan: BatchPlan) -> pa.Table:
    """One record batch of any layout -> ``anchor, positive, negative_1..n[, label][, positive_group]``."""
    local = np.asarray(indices, dtype=np.int64)
    rows = plan.row_numbers[local] if plan.row_numbers is not None else local + plan.first_row
    r = read_rows(batch, plan.layout, Problems(plan.label, plan.unit, plan.first, rows), plan.label)
    keep = np.ones(len(rows), dtype=bool)
    neg_local: list[np.ndarray] = []
    if plan.n and r.neg is not None:
        keep &= r.neg.lengths > 0
        if plan.ragged == "drop":
            keep &= r.neg.lengths >= plan.n
        safe = np.maximum(r.neg.lengths, 1).astype(np.uint64)
        for k in range(plan.n):  # a row's own first, then seeded draws from them
            drawn = (mix(plan.seed, rows, k + 1) % safe).astype(np.int64)
            neg_local.append(np.where(k < r.neg.lengths, k, drawn))
    sel = np.flatnonzero(keep)
    if plan.expand:  # one output row per positive: take[i] is its source row, picked[i] its positive
        counts = r.pos.lengths[sel]
        take = np.repeat(sel, counts)
        picked = np.arange(len(take), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    else:
        choice = mix(plan.seed, rows, 0) % np.maximum(r.pos.lengths, 1).astype(np.uint64)
        take, picked = sel, choice.astype(np.int64)[sel]
    texts = {
        "anchor": r.query.take(pa.array(take)),
        "positive": r.pos.flat.take(pa.array(r.pos.starts[take] + picked)),
    }
    for k, idx in enumerate(neg_local):
        texts[f"negative_{k + 1}"] = r.neg.flat.take(pa.array(r.neg.starts[take] + idx[take]))
    out = {column: array.cast(pa.large_string()) for column, array in texts.items()}
    if plan.bake:
        prompt = r.prompt.take(pa.array(take)) if r.prompt is not None else None
        out = _instruct(out, prompt, plan)
    if r.embeddings is not None:  # (2 + n) vectors: anchor, positive, the negatives kept
        e = r.embeddings.starts[take]
        index = np.stack([e, e + 1, *[e + 2 + idx[take] for idx in neg_local]], axis=1)
        vectors = r.embeddings.flat.take(pa.array(index.ravel()))
        offsets = pa.array(np.arange(len(take) + 1, dtype=np.int32) * index.shape[1])
        out["label"] = pa.ListArray.from_arrays(offsets, vectors)
    elif r.pos_scores is not None:
        scores = [numbers(r.pos_scores)[r.pos_scores.starts[take] + picked]]
        if r.neg_scores is not None:
            values = numbers(r.neg_scores)
            scores += [values[r.neg_scores.starts[take] + idx[take]] for idx in neg_local]
        matrix = np.stack(scores, axis=1)
        out["label"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1]).cast(
            pa.list_(pa.float64())
        )
    if plan.expand:
        out[POSITIVE_GROUP] = pa.array(local[take] + plan.group_offset, pa.int64())
    elif r.group is not None:
        out[POSITIVE_GROUP] = r.group.take(pa.array(take))
    pa.default_memory_pool().release_unused()  # the allocator would keep the freed batches as private memory
    return pa.table(out)


def _instruct(out: dict[str, pa.Array], prompt: pa.Array | None, plan: BatchPlan) -> dict[str, pa.Array]:
    """Write the template into the texts (module doc): the row's instruction, else the task's."""
    head, tail = KALM_INSTRUCTION_TEMPLATE.split("{instruction}")
    large = pa.large_string()
    prefix: Any = pa.scalar(KALM_INSTRUCTION_TEMPLATE.format(instruction=plan.instruction), large)
    if prompt is not None:
        own = pc.utf8_trim_whitespace(prompt.cast(large))
        own = pc.if_else(pc.equal(pc.fill_null(own, ""), ""), pa.scalar(plan.instruction, large), own)
        prefix = pc.binary_join_element_wise(pa.scalar(head, large), own, pa.scalar(tail, large), pa.scalar("", large))

    def instructed(texts: pa.Array) -> pa.Array:
        return pc.fill_null(pc.match_substring_regex(texts, pattern=INSTRUCTED_TEXT_PATTERN), False)

    def write(texts: pa.Array, prefixes: Any) -> pa.Array:
        if plan.policy != "keep":
            texts = pc.replace_substring_regex(
                texts, pattern=INSTRUCTED_TEXT_PATTERN, replacement="", max_replacements=1
            )
        if plan.policy == "strip":
            return texts
        joined = pc.binary_join_element_wise(prefixes, texts, pa.scalar("", large))
        return pc.if_else(instructed(texts), texts, joined) if plan.policy == "keep" else joined

    anchor = out["anchor"]
    documents_prefix = prefix
    if plan.policy == "keep":  # a query that carries its instruction: its documents get the same one
        own_prefix = pc.struct_field(
            pc.extract_regex(anchor, pattern=f"(?s)(?P<p>{INSTRUCTED_TEXT_PATTERN[4:]})"), [0]
        )
        documents_prefix = pc.if_else(instructed(anchor), own_prefix, prefix)
    result = {"anchor": write(anchor, prefix)}
    for column, texts in list(out.items())[1:]:
        result[column] = write(texts, documents_prefix) if plan.documents else texts
    return result
