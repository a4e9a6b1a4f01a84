"""The guarded sentence-transformers internal (embed_columns): present in this ST, and the fallback is equivalent."""

from __future__ import annotations

import torch

from kalm_st.losses import _compat
from tests.losses._helpers import featurize


def test_st_embed_columns_is_used_and_fallback_matches(tiny_model, columns, monkeypatch) -> None:
    assert _compat._st_embed_columns is not None  # sentence-transformers 6.2 has it
    features = featurize(tiny_model, columns)
    merged = _compat.embed_columns(tiny_model, [dict(f) for f in features])
    monkeypatch.setattr(_compat, "_st_embed_columns", None)
    separate = _compat.embed_columns(tiny_model, [dict(f) for f in features])
    assert len(merged) == len(separate) == 4
    for a, b in zip(merged, separate, strict=True):
        # unit vectors (entries ~0.1) from batches padded to other lengths: atol 1e-5 ~ 1000 float32 ulps of 0.1
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
