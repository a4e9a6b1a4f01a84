"""A counter-based hash: one uint64 per row from ``(seed, row, salt)``, the same however the rows are batched,
sharded or ordered. Every seeded per-row draw of the data path (a row's positive, its ragged negatives, a query's
positive of the epoch) is ``splitmix64(...) % count``."""

from __future__ import annotations

import numpy as np


def splitmix64(seed: int, rows: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``(seed, row, salt)``: a counter-based uint64 per row, independent of batching."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 0x632BE59BD9B4E019 + salt * 0x85EBCA77C2B2AE63) & 0xFFFFFFFFFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


__all__ = ["splitmix64"]
