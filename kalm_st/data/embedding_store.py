"""Embeddings of texts cached on disk, memory-mapped, chunk by chunk: curation at any corpus size, resumable.

One store folder per (model, prompt, normalisation): ``{root}/{model fingerprint}/{prompt digest}/``. It holds
append-only parts, each written atomically after one chunk of texts is encoded:

- ``part-000000.emb.npy``: ``(k, d)`` float32 embeddings (read memory-mapped);
- ``part-000000.keys.npy``: ``(k, 2)`` uint64 128-bit keys of the texts (written last: a part exists once its keys
  do, so a kill mid-chunk loses only that chunk).

:func:`encode_cached` looks every requested text up by key, encodes only the missing ones (in chunks, each a new
part) and returns a ``(N, d)`` matrix of the requested texts in order: in memory when it is small, else a
memory-mapped file beside the parts. A second step that encodes the same texts with the same model and prompt (the
recipe's ``filter`` then ``mine`` of the same corpus) reads them instead of encoding again; a killed step resumes
after its last finished chunk. A different model (other weights) or prompt is another folder, never a stale hit.

Keys are two independent 64-bit SipHash-2-4 digests of each text's UTF-8 bytes (``pandas.util.hash_array``, a C
loop over an Arrow chunk), so no per-row Python object outlives a chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kalm_st.io import save_numpy_atomic, write_text_atomic

logger = logging.getLogger(__name__)

_HASH_KEYS = ("kalm-st:text-k:0", "kalm-st:text-k:1")  # SipHash keys: exactly 16 bytes each
_KEY_CHUNK = 1 << 20
IN_MEMORY_BYTES = 1 << 30
"""Result matrices up to this size stay in memory; larger ones are memory-mapped files in the store folder."""


def as_arrow_strings(texts: Any) -> pa.Array:
    """Texts as one Arrow ``large_string`` array (64-bit offsets: a corpus may hold more than 2 GB of text), from a
    list, a numpy array or an Arrow (chunked) array."""
    if isinstance(texts, pa.ChunkedArray | pa.Array):
        if texts.type != pa.large_string():
            texts = texts.cast(pa.large_string())
        if isinstance(texts, pa.ChunkedArray):
            return texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
        return texts
    return pa.array(texts if isinstance(texts, list) else list(texts), type=pa.large_string())


def text_keys(texts: Any) -> np.ndarray:
    """``(N, 2)`` uint64 keys of the texts: equal texts, equal keys (two independent SipHash-2-4 digests)."""
    from pandas.util import hash_array

    array = as_arrow_strings(texts)
    out = np.empty((len(array), 2), dtype=np.uint64)
    for start in range(0, len(array), _KEY_CHUNK):
        values = array.slice(start, _KEY_CHUNK).to_numpy(zero_copy_only=False)  # one chunk of str objects at a time
        for column, hash_key in enumerate(_HASH_KEYS):
            out[start : start + len(values), column] = hash_array(values, hash_key=hash_key, categorize=False)
    return out


def lookup(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row of each key in ``table`` (``-1`` if absent), vectorised via a sorted view of the 128-bit keys."""
    if len(table) == 0 or len(keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    dtype = np.dtype([("a", np.uint64), ("b", np.uint64)])
    table_v = np.ascontiguousarray(table).view(dtype).ravel()
    keys_v = np.ascontiguousarray(keys).view(dtype).ravel()
    order = np.argsort(table_v, kind="stable")
    position = np.searchsorted(table_v[order], keys_v).clip(max=len(table) - 1)
    rows = order[position]
    return np.where(table_v[rows] == keys_v, rows, -1).astype(np.int64)


def model_fingerprint(model: Any, name: str | None = None) -> str:
    """``name`` (default: where the weights came from) + a checksum of the weights (float64 sum of every
    parameter) + the embedding dimension: the same model folder retrained is another fingerprint."""
    import torch

    if name is None:
        first = model[0] if hasattr(model, "__getitem__") else model
        config = getattr(getattr(first, "auto_model", None), "config", None)
        name = str(getattr(config, "_name_or_path", None) or type(model).__name__)
    with torch.no_grad():
        sums = [float(p.detach().double().sum()) for p in model.parameters()]
    dimension = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
    digest = hashlib.sha256(json.dumps([name, dimension, sums]).encode()).hexdigest()[:16]
    return f"{name}:{digest}"


class EmbeddingStore:
    """The parts of one (model, prompt, normalisation) store folder; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts = sorted(p.name.removesuffix(".keys.npy") for p in self.folder.glob("part-*.keys.npy"))

    @classmethod
    def for_model(
        cls, root: str | os.PathLike[str], model: Any, prompt: str, *, normalize: bool, model_name: str | None = None
    ) -> EmbeddingStore:
        fingerprint = model_fingerprint(model, model_name)
        digest = hashlib.sha256(json.dumps([fingerprint, prompt, normalize]).encode()).hexdigest()[:24]
        store = cls(Path(root) / digest)
        info = store.folder / "store.json"
        if not info.is_file():
            write_text_atomic(
                info, json.dumps({"model": fingerprint, "prompt": prompt, "normalize": normalize}, indent=1)
            )
        return store

    def keys(self) -> np.ndarray:
        """Keys of every stored text, in part order (``(M, 2)``)."""
        parts = [np.load(self.folder / f"{part}.keys.npy") for part in self.parts]
        return np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.uint64)

    def add(self, keys: np.ndarray, embeddings: np.ndarray) -> None:
        """One finished chunk as a new part (embeddings first, keys last: the keys file commits the part)."""
        name = f"part-{len(self.parts):06d}"
        save_numpy_atomic(self.folder / f"{name}.emb.npy", np.asarray(embeddings, dtype=np.float32))
        save_numpy_atomic(self.folder / f"{name}.keys.npy", keys)
        self.parts.append(name)

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = embedding of stored row rows[i]`` (rows index :meth:`keys`), one memory-mapped part at a time."""
        start = 0
        for part in self.parts:
            embeddings = np.load(self.folder / f"{part}.emb.npy", mmap_mode="r")
            end = start + len(embeddings)
            inside = np.flatnonzero((rows >= start) & (rows < end))
            if len(inside):
                out[inside] = embeddings[rows[inside] - start]
            start = end


def _encoder_pool(model: Any, devices: Sequence[str] | None) -> Any:
    """sentence-transformers' multi-process pool over ``devices`` (default: every visible GPU when there are
    several), or None to encode in this process."""
    import torch

    if devices is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(count)] if count > 1 else []
    return model.start_multi_process_pool(list(devices)) if len(devices) > 1 else None


def encode_cached(
    model: Any,
    texts: Any,
    root: str | os.PathLike[str] | None,
    *,
    role: str = "document",
    prompt: str | None = None,
    normalize: bool = True,
    batch_size: int = 32,
    chunk_size: int = 8192,
    devices: Sequence[str] | None = None,
    max_chunks: int | None = None,
    model_name: str | None = None,
    show_progress_bar: bool = True,
) -> np.ndarray:
    """Embeddings ``(N, d)`` float32 of ``texts`` (in order) with ``model``, cached under ``root``.

    ``role`` ``"query"`` or ``"document"`` and ``prompt`` as in ``encode_query`` / ``encode_document``: ``None``
    takes the model's own prompt of that role, ``""`` adds nothing. ``root=None`` encodes without a cache (chunked
    all the same). Texts are encoded ``chunk_size`` at a time, each chunk saved before the next starts, so a killed
    call resumes after its last finished chunk; ``max_chunks`` stops after that many new chunks (for tests and for
    splitting a job) and then raises ``RuntimeError`` rather than returning a partial matrix. With several GPUs
    (or ``devices``) the chunks are encoded by sentence-transformers' multi-process pool.
    """
    from tqdm.auto import tqdm

    if role not in ("query", "document"):
        raise ValueError(f"role must be 'query' or 'document', got {role!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if prompt is None:  # the model's own prompt of the role, resolved here so that it keys the store
        prompt = (getattr(model, "prompts", None) or {}).get(role, "")
    array = as_arrow_strings(texts)
    keys = text_keys(array)
    unique_keys, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    store = (
        EmbeddingStore.for_model(root, model, prompt, normalize=normalize, model_name=model_name)
        if root is not None
        else None
    )
    stored = lookup(unique_keys, store.keys()) if store is not None else np.full(len(unique_keys), -1)
    missing = np.flatnonzero(stored < 0)
    dim = int(model.get_embedding_dimension())
    result_bytes = len(array) * dim * 4
    if store is None or result_bytes <= IN_MEMORY_BYTES:
        unique_out = np.empty((len(unique_keys), dim), dtype=np.float32)
    else:
        view = store.folder / f"view-{hashlib.sha256(unique_keys.tobytes()).hexdigest()[:16]}.npy"
        unique_out = np.lib.format.open_memmap(view, mode="w+", dtype=np.float32, shape=(len(unique_keys), dim))
    if store is not None and len(missing) < len(unique_keys):
        have = np.flatnonzero(stored >= 0)
        store.gather(stored[have], _RowsView(unique_out, have))
    logger.info(
        "encode_cached: %d text(s), %d distinct, %d cached, %d to encode%s",
        len(array),
        len(unique_keys),
        len(unique_keys) - len(missing),
        len(missing),
        f" ({store.folder})" if store is not None else "",
    )
    encode = model.encode_query if role == "query" else model.encode_document
    pool = _encoder_pool(model, devices) if len(missing) else None
    try:
        chunks = range(0, len(missing), chunk_size)
        for number, begin in enumerate(tqdm(chunks, desc=f"Encoding ({role})", disable=not show_progress_bar)):
            if max_chunks is not None and number >= max_chunks:
                raise RuntimeError(f"encode_cached: stopped after max_chunks={max_chunks} chunk(s)")
            chunk = missing[begin : begin + chunk_size]
            chunk_texts = array.take(pa.array(first[chunk])).to_pylist()
            vectors = encode(
                chunk_texts,
                prompt=prompt,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=normalize,
                show_progress_bar=False,
                pool=pool,
            )
            vectors = np.asarray(vectors, dtype=np.float32)
            unique_out[chunk] = vectors
            if store is not None:
                store.add(unique_keys[chunk], vectors)
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    if len(unique_keys) == len(array) and np.array_equal(inverse, np.arange(len(array))):
        return unique_out
    return unique_out[inverse] if result_bytes <= IN_MEMORY_BYTES or store is None else _expand(unique_out, inverse)


class _RowsView:
    """``view[i] = x`` writes ``target[rows[i]]``: lets :meth:`EmbeddingStore.gather` fill scattered rows."""

    def __init__(self, target: np.ndarray, rows: np.ndarray) -> None:
        self.target, self.rows = target, rows

    def __setitem__(self, index: np.ndarray, value: np.ndarray) -> None:
        self.target[self.rows[index]] = value


def _expand(unique: np.ndarray, inverse: np.ndarray, block: int = 65536) -> np.ndarray:
    """``unique[inverse]`` as a memory-mapped file next to ``unique``'s (both can exceed memory)."""
    path = Path(unique.filename).with_name(Path(unique.filename).stem + "-rows.npy")  # type: ignore[attr-defined]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(inverse), unique.shape[1]))
    for start in range(0, len(inverse), block):
        out[start : start + block] = unique[inverse[start : start + block]]
    return out


__all__ = ["EmbeddingStore", "encode_cached", "lookup", "model_fingerprint", "text_keys"]
