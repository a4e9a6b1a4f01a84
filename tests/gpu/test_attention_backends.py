"""GPU checks of the attention back-ends (deselected by default; run with ``pytest -m gpu tests/gpu``).

On a CUDA device in bf16: every back-end is bidirectional, and sdpa / flash-attention-2 (when ``flash_attn`` is
installed, including sentence-transformers' unpadded FA2 path) give the embeddings of eager attention.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kalm_st import build_model, testing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field in the morning.", "PIN reset?"]
BACKENDS = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-qwen")
    config = testing.tiny_qwen_config(vocab_size=151_936, hidden_size=256, num_attention_heads=4)
    build_model(config, tokenizer=testing.qwen_tokenizer_dir(), dtype="float32").save(str(folder))
    return folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_is_bidirectional_in_bf16(checkpoint, backend):
    from kalm_st import load_model

    model = load_model(
        checkpoint, device="cuda", model_kwargs={"dtype": torch.bfloat16, "attn_implementation": backend}
    )
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 61, 250]], device="cuda")
    changed = ids.clone()
    changed[0, -1] = 251
    with torch.no_grad():
        first = model[0].auto_model(input_ids=ids).last_hidden_state[0, 0]
        second = model[0].auto_model(input_ids=changed).last_hidden_state[0, 0]
    assert (first - second).abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backend_matches_eager(checkpoint, backend):
    from kalm_st import load_model

    kwargs = {"dtype": torch.bfloat16}
    eager = load_model(checkpoint, device="cuda", model_kwargs={**kwargs, "attn_implementation": "eager"})
    other = load_model(checkpoint, device="cuda", model_kwargs={**kwargs, "attn_implementation": backend})
    reference = eager.encode(TEXTS, convert_to_tensor=True).float()
    got = other.encode(TEXTS, convert_to_tensor=True).float()
    torch.testing.assert_close(got, reference, atol=2e-2, rtol=0)  # bf16 tolerance
