"""Forwards over real tokens only: the padded batch's texts packed into rows, or run in length buckets.

A padded ``(batch, length)`` batch of short texts is mostly padding (STS-B sentences: 13 tokens on average, 69 at
most, so ~65 % of a batch-32 forward is padding). A bidirectional encoder's token states depend only on the tokens of
their own text and their positions, so the same states come out of:

- ``"pack"``: every text's real tokens laid end to end in rows of about ``pack_row_tokens`` tokens, each token
  attending only to the tokens of its own text (a block-diagonal boolean mask) at the positions it has alone. One
  forward; the attention costs grow with the square of the row length, hence bounded rows.
- ``"bucket"``: texts sorted by length and run in a few sub-forwards of similar lengths, each padded only to its own
  longest text.

Either way the states are scattered back into the padded ``(batch, length, hidden)`` layout, zeros at padding, so
pooling and everything after it are unchanged. All index bookkeeping is tensor operations (no loop over texts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RealTokenMode = Literal["auto", "pack", "bucket", "off"]
REAL_TOKEN_MODES: tuple[str, ...] = ("auto", "pack", "bucket", "off")

DEFAULT_PACK_ROW_TOKENS = 512
"""Longest target row of ``"pack"``: the real tokens are split into ``ceil(tokens / pack_row_tokens)`` rows of equal
target length; a row holds the texts that *start* within its target window, so it is at most ``target + longest text
- 1`` long. 512 ran faster than 256 on a 2-core CPU (``benchmarks/train_throughput.py``, docs/benchmarks.md)."""

DEFAULT_BUCKET_RATIO = 1.5
"""``"bucket"`` groups texts whose lengths lie within this factor of each other (<= 1/3 padding per group)."""

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(input_ids (R, W), attention_mask (R, W) or (R, 1, W, W) bool, position_ids (R, W)) -> states (R, W, H)``."""


@dataclass(frozen=True)
class TokenLayout:
    """Where each real token of a padded batch lives: its text, its position in that text, its flat index."""

    mask: Tensor  # (B, L) bool, True at real tokens
    lengths: Tensor  # (B,) real tokens per text
    token_text: Tensor  # (N,) text of each real token, row-major order
    token_position: Tensor  # (N,) position of each real token within its text

    @classmethod
    def of(cls, attention_mask: Tensor) -> TokenLayout:
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        token_text = torch.repeat_interleave(torch.arange(mask.shape[0], device=mask.device), lengths)
        token_position = (mask.long().cumsum(dim=1) - 1)[mask]
        return cls(mask=mask, lengths=lengths, token_text=token_text, token_position=token_position)

    @property
    def real_tokens(self) -> int:
        return int(self.token_text.numel())

    def scatter_back(self, token_states: Tensor) -> Tensor:
        """``(N, H)`` states in row-major real-token order -> ``(B, L, H)``, zeros at padding (differentiable)."""
        batch, length = self.mask.shape
        padded = token_states.new_zeros(batch, length, token_states.shape[-1])
        return padded.masked_scatter(self.mask[..., None], token_states)


def packed_forward(
    input_ids: Tensor, layout: TokenLayout, forward: Forward, pad_token_id: int, row_tokens: int
) -> Tensor:
    """Token states ``(N, H)`` from one forward over the texts packed into rows with a block-diagonal mask."""
    device = input_ids.device
    lengths = layout.lengths
    starts = lengths.cumsum(0) - lengths  # exclusive: where each text starts in the token stream
    # Equal windows of the token stream (so no short last row padded to the others' width); a row takes every text
    # that starts in its window.
    total = int(lengths.sum())
    window = -(-total // -(-total // row_tokens))  # ceil(total / number of rows)
    row = torch.unique_consecutive(starts // window, return_inverse=True)[1]
    rows = int(row.max()) + 1
    row_start = torch.full((rows,), torch.iinfo(starts.dtype).max, device=device, dtype=starts.dtype)
    row_start = row_start.scatter_reduce(0, row, starts, reduce="amin")
    offset = starts - row_start[row]
    width = int((offset + lengths).max())

    token_row = row[layout.token_text]
    token_col = offset[layout.token_text] + layout.token_position
    packed_ids = torch.full((rows, width), pad_token_id, dtype=input_ids.dtype, device=device)
    packed_ids[token_row, token_col] = input_ids[layout.mask]
    positions = torch.zeros((rows, width), dtype=torch.long, device=device)
    positions[token_row, token_col] = layout.token_position
    text_of_slot = torch.full((rows, width), -1, dtype=torch.long, device=device)
    text_of_slot[token_row, token_col] = layout.token_text
    # Attend within the same text only; the unused tail of a row attends to itself (never read, never NaN).
    block_mask = (text_of_slot[:, :, None] == text_of_slot[:, None, :])[:, None]
    states = forward(packed_ids, block_mask, positions)
    return states[token_row, token_col]


def bucket_groups(lengths: Tensor, ratio: float = DEFAULT_BUCKET_RATIO) -> list[Tensor]:
    """Text indices grouped by length (longest group first); within a group lengths differ by < ``ratio``x."""
    nonempty = torch.nonzero(lengths > 0).flatten()
    if nonempty.numel() == 0:
        return []
    order = nonempty[torch.argsort(lengths[nonempty], descending=True, stable=True)]
    sorted_lengths = lengths[order].double()
    bucket = torch.floor(torch.log(sorted_lengths) / torch.log(torch.tensor(ratio, dtype=torch.float64)))
    _, counts = torch.unique_consecutive(bucket, return_counts=True)
    return list(torch.split(order, counts.tolist()))


def bucketed_forward(
    input_ids: Tensor, layout: TokenLayout, forward: Forward, pad_token_id: int, ratio: float
) -> Tensor:
    """Token states ``(N, H)`` from one right-padded forward per length bucket."""
    device = input_ids.device
    real_ids = input_ids[layout.mask]
    starts = layout.lengths.cumsum(0) - layout.lengths
    hidden: Tensor | None = None
    pieces: list[Tensor] = []
    destinations: list[Tensor] = []
    for texts in bucket_groups(layout.lengths, ratio):
        group_lengths = layout.lengths[texts]
        width = int(group_lengths.max())
        slot_text = torch.repeat_interleave(torch.arange(texts.numel(), device=device), group_lengths)
        slot_start = group_lengths.cumsum(0) - group_lengths
        slot_col = torch.arange(slot_text.numel(), device=device) - slot_start[slot_text]
        source = starts[texts][slot_text] + slot_col  # index of each token in the row-major stream
        ids = torch.full((texts.numel(), width), pad_token_id, dtype=input_ids.dtype, device=device)
        ids[slot_text, slot_col] = real_ids[source]
        mask = torch.zeros((texts.numel(), width), dtype=torch.bool, device=device)
        mask[slot_text, slot_col] = True
        positions = torch.arange(width, device=device).expand(texts.numel(), width)
        states = forward(ids, mask, positions)
        pieces.append(states[slot_text, slot_col])
        destinations.append(source)
    if not pieces:
        raise ValueError("bucketed_forward needs at least one non-empty text")
    hidden = torch.cat(pieces)
    destination = torch.cat(destinations)
    inverse = torch.empty_like(destination)
    inverse[destination] = torch.arange(destination.numel(), device=device)
    return hidden.index_select(0, inverse)


def choose_mode(layout: TokenLayout, mode: RealTokenMode) -> Literal["pack", "bucket", "off"]:
    """``"auto"`` -> the faster of the two measured on 2-core CPUs (``benchmarks/train_throughput.py``), or
    ``"off"`` when the batch has (almost) no padding to save."""
    if mode != "auto":
        return mode
    batch, length = layout.mask.shape
    if layout.real_tokens >= 0.9 * batch * length:
        return "off"
    return "pack"
