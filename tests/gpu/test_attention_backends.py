"""Attention back-ends on a GPU: same embeddings, bidirectional, texts kept apart (deselected by default).

Run with ``pytest -m gpu tests/gpu`` on a CUDA machine, or through ``python benchmarks/gpu_check.py``, which runs
these tests and puts their outcomes and measured numbers in its report.

For eager, sdpa and flash-attention-2 (when ``flash_attn`` is installed: its padded path and sentence-transformers'
unpadded path), in bf16:

- the embeddings of a right-padded batch match fp32 eager (cosine >= 0.9999 per text) and each text encoded alone;
  a control with the padding attended shows the batch-vs-alone comparison detects a padding leak;
- attention is bidirectional: the first token's state moves when only the last token of its text changes, and the
  causal control (the same call with ``is_causal=True``) leaves it in place, so the probe tells the two apart;
- texts of one batch do not see each other (padded rows, or packed sequences on the unpadded path).

**sentence-transformers' unpadded path** (read in ST 6.2's ``base/modules/transformer.py``): when the loaded model
runs flash-attention-2 with a varlen kernel, ``Transformer._can_flatten_inputs`` installs
``DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True, return_position_ids=True)``;
``preprocess`` then packs the whole batch into one row: ``input_ids`` of shape ``(1, total_tokens)``,
``position_ids`` restarting at 0 per text, ``cu_seq_lens_q/k``, ``max_length_q/k``, ``seq_idx`` and no
``attention_mask``. The varlen kernel keeps the texts apart by ``cu_seq_lens_q``; ``Pooling._forward_flattened``
means over the flat states per text. ``model[0].unpad_inputs = False`` (a public setter) forces the padded path.
Each test asserts from those keys which path it ran, so an ST change of the mechanism fails here, not silently.

Environment knobs (``benchmarks/gpu_check.py --cpu-smoke`` sets them to run these same tests on CPU in seconds):
``KALM_GPU_TEST_DEVICE`` (default ``cuda``), ``KALM_GPU_TEST_DTYPE`` (default ``bfloat16``; the smoke uses
``float32``, since bf16 on an AVX2-only CPU is slow and rounds differently), ``KALM_GPU_TEST_SIZE`` (``gpu``, the
default: 4 layers, 256-d, the real Qwen2 vocabulary and tokenizer; ``tiny``: 2 layers, 64-d, a tiny BPE).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.util import batch_to_device

from kalm_st import build_model, load_model, testing

DEVICE = os.environ.get("KALM_GPU_TEST_DEVICE", "cuda")
DTYPE: torch.dtype = getattr(torch, os.environ.get("KALM_GPU_TEST_DTYPE", "bfloat16"))
SIZE = os.environ.get("KALM_GPU_TEST_SIZE", "gpu")
ON_CUDA = DEVICE.startswith("cuda")

if not ON_CUDA:
    FA2_MISSING: str | None = "flash-attention-2 needs a CUDA device"
elif importlib.util.find_spec("flash_attn") is None:
    FA2_MISSING = "flash_attn is not installed"
else:
    FA2_MISSING = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MIN_COSINE = 0.9999
# The causal control and the cross-text checks expect no change at all (masked keys contribute exp(-inf) = 0);
# the tolerance only absorbs a kernel choosing a different reduction order. The bidirectional shift must clear it
# tenfold (measured: ~0.1 of the state's scale on the tiny model).
EXACT_RTOL = 1e-3

# Right padding with very different lengths; a one-token-ish text exercises the shortest rows.
TEXTS = [
    "Two dogs run across a snowy field in the early morning while their owner follows them.",
    "PIN reset?",
    "A man is playing a guitar on the stage.",
    "What is the capital of France? Paris is the capital and largest city of France.",
]

_fa2 = pytest.mark.skipif(FA2_MISSING is not None, reason=FA2_MISSING or "")
PATHS = [
    pytest.param("eager", False, id="eager"),
    pytest.param("sdpa", False, id="sdpa"),
    pytest.param("flash_attention_2", False, id="fa2-padded", marks=_fa2),
    pytest.param("flash_attention_2", True, id="fa2-unpadded", marks=_fa2),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpu-check-qwen")
    if SIZE == "gpu":
        config = testing.tiny_qwen_config(
            vocab_size=151_936, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4
        )
        tokenizer = testing.qwen_tokenizer_dir()
    elif SIZE == "tiny":
        config = testing.tiny_qwen_config()
        tokenizer = testing.train_tiny_tokenizer((*testing.TINY_TEXTS, *TEXTS))
    else:
        raise ValueError(f"KALM_GPU_TEST_SIZE must be 'gpu' or 'tiny', got {SIZE!r}")
    build_model(config, tokenizer=tokenizer, dtype="float32", device="cpu", seed=0).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    """``loaded(backend, unpadded, dtype)``: the saved model with that attention back-end, loaded once."""
    cache: dict[tuple[str, bool, torch.dtype], object] = {}

    def get(backend: str, unpadded: bool, dtype: torch.dtype = DTYPE):
        key = (backend, unpadded, dtype)
        if key not in cache:
            model = load_model(
                checkpoint, device=DEVICE, model_kwargs={"dtype": dtype, "attn_implementation": backend}
            )
            if backend == "flash_attention_2" and not unpadded:
                model[0].unpad_inputs = False  # ST's public switch: flash-attention-2 on padded batches
            model.eval()
            cache[key] = model
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(loaded) -> torch.Tensor:
    """fp32 eager embeddings of ``TEXTS`` (one padded batch), the reference of every back-end."""
    return _encode(loaded("eager", False, torch.float32), TEXTS)


def _encode(model, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode(texts, batch_size=len(texts), convert_to_tensor=True).float().cpu()


def _features(model, texts: list[str], unpadded: bool) -> dict:
    features = batch_to_device(model.preprocess(texts), torch.device(DEVICE))
    if unpadded:
        assert "cu_seq_lens_q" in features and "attention_mask" not in features, (
            f"expected sentence-transformers' unpadded flash-attention path, got keys {sorted(features)}"
        )
        assert features["input_ids"].shape[0] == 1
    else:
        assert "attention_mask" in features and "cu_seq_lens_q" not in features, (
            f"expected a padded batch, got keys {sorted(features)}"
        )
    return features


def _spans(features: dict, unpadded: bool) -> list[tuple[int, int, int]]:
    """``(row, first, end)`` of each text's real tokens in ``input_ids`` (right padding, or packed in row 0)."""
    if unpadded:
        cu = features["cu_seq_lens_q"].tolist()
        return [(0, begin, end) for begin, end in zip(cu[:-1], cu[1:], strict=True)]
    lengths = features["attention_mask"].sum(-1).tolist()
    assert bool((features["attention_mask"][:, 0] == 1).all()), "expected right padding"
    return [(row, 0, int(length)) for row, length in enumerate(lengths)]


@pytest.mark.parametrize(("backend", "unpadded"), PATHS)
def test_embeddings_match_fp32_eager(loaded, reference, backend, unpadded, record_property) -> None:
    model = loaded(backend, unpadded)
    _features(model, TEXTS, unpadded)  # asserts which path encode() takes
    batch = _encode(model, TEXTS)
    alone = torch.cat([_encode(model, [text]) for text in TEXTS])
    versus_reference = F.cosine_similarity(batch, reference)
    versus_alone = F.cosine_similarity(batch, alone)
    record_property("min_cosine_vs_fp32_eager", float(versus_reference.min()))
    record_property("min_cosine_batch_vs_alone", float(versus_alone.min()))
    assert float(versus_reference.min()) >= MIN_COSINE, f"cosine vs fp32 eager per text: {versus_reference.tolist()}"
    assert float(versus_alone.min()) >= MIN_COSINE, f"cosine batch vs alone per text: {versus_alone.tolist()}"


def test_padding_control_is_detected(loaded, reference, record_property) -> None:
    """Control of the batch-vs-alone check: attending to and pooling over the padding changes the short texts."""
    model = loaded("eager", False, torch.float32)
    features = _features(model, TEXTS, unpadded=False)
    features["attention_mask"] = torch.ones_like(features["attention_mask"])
    with torch.inference_mode():
        leaked = model(features)["sentence_embedding"].float().cpu()
    cosine = F.cosine_similarity(leaked, reference)
    record_property("min_cosine_with_padding_attended", float(cosine.min()))
    assert float(cosine.min()) < MIN_COSINE, f"attending to padding went unnoticed: {cosine.tolist()}"


@pytest.mark.parametrize(("backend", "unpadded"), PATHS)
def test_bidirectional_with_causal_control(loaded, backend, unpadded, record_property) -> None:
    model = loaded(backend, unpadded)
    features = _features(model, TEXTS, unpadded)
    spans = _spans(features, unpadded)
    (row0, first0, end0), (row1, _, end1) = spans[0], spans[1]
    ids = features["input_ids"]
    replacement = int(ids[row0, first0 + 1])  # an ordinary token id of this tokenizer, different from the last one
    assert replacement != int(ids[row0, end0 - 1]) and replacement != int(ids[row1, end1 - 1])
    last_of_text0, last_of_text1 = ids.clone(), ids.clone()
    last_of_text0[row0, end0 - 1] = replacement
    last_of_text1[row1, end1 - 1] = replacement

    def text0_states(input_ids: torch.Tensor, causal: bool) -> torch.Tensor:
        with torch.inference_mode():
            out = model[0]({**features, "input_ids": input_ids}, is_causal=causal)["token_embeddings"]
        return out[row0, first0:end0].float()

    shifts = {}
    for causal in (False, True):
        base = text0_states(ids, causal)
        scale = float(base[0].abs().max())
        name = "causal" if causal else "bidirectional"
        shifts[f"{name}_first_token_shift"] = float((text0_states(last_of_text0, causal)[0] - base[0]).abs().max())
        shifts[f"{name}_cross_text_shift"] = float((text0_states(last_of_text1, causal) - base).abs().max())
        shifts[f"{name}_scale"] = scale
    for key, value in shifts.items():
        record_property(key, value)
    tolerance = EXACT_RTOL * shifts["bidirectional_scale"]
    assert shifts["causal_first_token_shift"] <= EXACT_RTOL * shifts["causal_scale"], (
        f"causal control: the first token saw the last one ({shifts})"
    )
    assert shifts["bidirectional_first_token_shift"] > 10 * tolerance, f"attention is not bidirectional ({shifts})"
    assert shifts["bidirectional_cross_text_shift"] <= tolerance, f"text 0 saw text 1 ({shifts})"
    assert shifts["causal_cross_text_shift"] <= EXACT_RTOL * shifts["causal_scale"], f"text 0 saw text 1 ({shifts})"


@pytest.mark.parametrize("unpadded", [pytest.param(False, id="padded"), pytest.param(True, id="unpadded")])
@_fa2
def test_flash_attention_2_matches_sdpa(loaded, unpadded, record_property) -> None:
    sdpa = _encode(loaded("sdpa", False), TEXTS)
    flash = _encode(loaded("flash_attention_2", unpadded), TEXTS)
    cosine = F.cosine_similarity(flash, sdpa)
    record_property("min_cosine_vs_sdpa", float(cosine.min()))
    assert float(cosine.min()) >= MIN_COSINE, f"flash-attention-2 vs sdpa per text: {cosine.tolist()}"
