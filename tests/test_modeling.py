"""The model side of KaLM-V2: bidirectional decoder + mean pooling + normalisation (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import (
    AutoTokenizer,
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import kalm_st
from kalm_st import build_model, load_model, testing
from kalm_st.modules import SUPPORTED_MODEL_TYPES, BidirectionalDecoder, MeanPooling, bidirectional_decoder
from tests.reference_qwen2 import reference_embeddings

SENTENCES = ["A man is playing a guitar.", "Two dogs run.", "How do I reset my card PIN?"]


def _token_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        return model[0](features)["token_embeddings"]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_first_token_sees_the_last_token(tiny_qwen_dir, attn_implementation):
    model = build_model(tiny_qwen_dir, attn_implementation=attn_implementation, dtype="float32", device="cpu")
    assert model[0].auto_model.config._attn_implementation == attn_implementation
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 61, 250]])
    changed = ids.clone()
    changed[0, -1] = 251
    moved = (_token_states(model, ids)[0, 0] - _token_states(model, changed)[0, 0]).abs().max()
    assert moved > 1e-4

    # Causal control: the same weights with the causal mask back on do not let token 0 see token 7.
    model[0].auto_model.config.is_causal = True
    still = (_token_states(model, ids)[0, 0] - _token_states(model, changed)[0, 0]).abs().max()
    assert still == 0.0


def _tiny_config(model_type: str):
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    configs = {
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=8),
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common),
        "gemma": lambda: GemmaConfig(**common, head_dim=8),
        "gemma2": lambda: Gemma2Config(**common, head_dim=8),
        "gemma3_text": lambda: Gemma3TextConfig(**common, head_dim=8),
        "phi3": lambda: Phi3Config(**common, pad_token_id=0),
    }
    return configs[model_type]()


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_supported_decoder_families_become_bidirectional(model_type):
    assert model_type in SUPPORTED_MODEL_TYPES
    tokenizer = testing.train_tiny_tokenizer(vocab_size=300)
    config = _tiny_config(model_type)
    config.vocab_size = 320
    model = build_model(config, tokenizer=tokenizer, dtype="float32", device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    changed = ids.clone()
    changed[0, -1] = 100
    assert (_token_states(model, ids)[0, 0] - _token_states(model, changed)[0, 0]).abs().max() > 1e-5


def test_embeddings_match_a_from_scratch_qwen2_forward(tiny_qwen_dir):
    model = build_model(tiny_qwen_dir, dtype="float32", device="cpu")
    weights = load_file(str(tiny_qwen_dir / "model.safetensors"))
    tokenizer = model.tokenizer
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = reference_embeddings(weights, model[0].auto_model.config, batch["input_ids"], batch["attention_mask"])
    got = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)

    tokenizer.padding_side = "left"
    left = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not left["attention_mask"][:, 0].all()  # really left-padded
    expected_left = reference_embeddings(
        weights, model[0].auto_model.config, left["input_ids"], left["attention_mask"]
    )
    torch.testing.assert_close(expected_left, expected, atol=1e-9, rtol=0)  # the oracle is padding-invariant
    torch.testing.assert_close(model.encode(SENTENCES, convert_to_tensor=True).double(), expected, atol=1e-5, rtol=0)


def test_padding_side_does_not_change_embeddings(tiny_model):
    alone = np.stack([tiny_model.encode([s])[0] for s in SENTENCES])
    right = tiny_model.encode(SENTENCES)
    tiny_model.tokenizer.padding_side = "left"
    left = tiny_model.encode(SENTENCES)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)


def test_mean_pooling_excludes_padding_and_optionally_prompt():
    pooling = MeanPooling(2, include_prompt=False)
    tokens = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [5.0, 9.0]], [[7.0, 7.0], [2.0, 4.0], [4.0, 6.0]]])
    right = {"token_embeddings": tokens, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "prompt_length": 1}
    left = {"token_embeddings": tokens, "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]), "prompt_length": 1}
    # Hand-computed: prompt token (first real token) and padding left out of the mean.
    assert pooling(right)["sentence_embedding"].tolist() == [[4.0, 7.0], [2.0, 4.0]]
    assert pooling(left)["sentence_embedding"].tolist() == [[4.0, 7.0], [4.0, 6.0]]
    with pytest.raises(ValueError, match="mean"):
        MeanPooling(2, pooling_mode="cls")


def test_real_qwen2_tokenizer(qwen_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"


def test_real_qwen2_vocabulary_shape(qwen_tokenizer_dir):
    """The real tokenizer over a Qwen2-0.5B-shaped embedding table (151,936 rows), 2 small layers."""
    config = testing.tiny_qwen_config(vocab_size=151_936, num_hidden_layers=1)
    model = build_model(config, tokenizer=qwen_tokenizer_dir, dtype="float32", device="cpu")
    embeddings = model.encode(["Hello world", "你好，世界"])
    assert embeddings.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_saved_model_loads_with_plain_sentence_transformers_in_a_fresh_interpreter(tiny_model, tmp_path):
    folder = tmp_path / "kalm-v2"
    tiny_model.save(str(folder))
    expected = tiny_model.encode(SENTENCES)
    np.save(tmp_path / "expected.npy", expected)
    modules = json.loads((folder / "modules.json").read_text())
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(folder)!r}, device="cpu")
        assert not any(name.startswith("kalm_st") for name in sys.modules), "kalm_st was imported"
        assert model[0].auto_model.config.is_causal is False
        got = model.encode({SENTENCES!r})
        diff = np.abs(got - np.load({str(tmp_path / "expected.npy")!r})).max()
        assert diff <= 1e-6, diff
        print("OK", diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


def test_load_model_gives_kalm_classes_back(tiny_model, tmp_path):
    tiny_model.save(str(tmp_path / "m"))
    reloaded = load_model(tmp_path / "m", device="cpu")
    assert isinstance(reloaded, kalm_st.KaLMSentenceTransformer)
    assert isinstance(reloaded[0], BidirectionalDecoder) and isinstance(reloaded[1], MeanPooling)
    assert reloaded[0].is_bidirectional
    np.testing.assert_array_equal(reloaded.encode(SENTENCES), tiny_model.encode(SENTENCES))
    assert reloaded.prompts == tiny_model.prompts


def test_saved_requirements_are_enforced_by_sentence_transformers(tiny_model, tmp_path):
    tiny_model.save(str(tmp_path / "m"))
    config_path = tmp_path / "m" / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text())
    assert config["requirements"]["transformers"]["specifier"] == ">=5.2.0"
    config["requirements"]["transformers"]["specifier"] = ">=99"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ImportError, match="transformers"):
        SentenceTransformer(str(tmp_path / "m"), device="cpu")


def test_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    tiny_model.save(str(folder))
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_model[1]), "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save(str(folder))
    after = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind


def test_version_guard_matches_installed_transformers(monkeypatch, tiny_qwen_dir):
    # The flag must be True exactly when transformers honours is_causal=False; on this stack it does (tests above).
    assert bidirectional_decoder._TRANSFORMERS_SUPPORTS_IS_CAUSAL_FALSE is True
    monkeypatch.setattr(bidirectional_decoder, "_TRANSFORMERS_SUPPORTS_IS_CAUSAL_FALSE", False)
    with pytest.raises(ImportError, match="transformers>=5.2.0"):
        build_model(tiny_qwen_dir)


def test_matryoshka_truncate_dim_and_bf16(tiny_qwen_dir):
    model = build_model(tiny_qwen_dir, truncate_dim=32, dtype="bfloat16", device="cpu")
    assert model[0].auto_model.dtype == torch.bfloat16
    assert model.encode(SENTENCES).shape == (3, 32)


def test_prompts_reach_the_model(tiny_model):
    instruction = "Instruct: Given a query, retrieve documents that answer the query \n Query: "
    query = "how do I reset my PIN"
    np.testing.assert_allclose(tiny_model.encode_query([query]), tiny_model.encode([instruction + query]), atol=1e-6)
    np.testing.assert_allclose(tiny_model.encode_document([query]), tiny_model.encode([query]), atol=1e-6)
    sts = "Instruct: Retrieve semantically similar text \n Query: "
    np.testing.assert_allclose(
        tiny_model.encode([query], prompt_name="STSBenchmark"), tiny_model.encode([sts + query]), atol=1e-6
    )


class TestBadInput:
    def test_edge_case_texts(self, tiny_model):
        long_text = "word " * 5000
        embeddings = tiny_model.encode(["", "   ", long_text])
        assert embeddings.shape == (3, 64) and np.isfinite(embeddings).all()
        assert tiny_model.encode([]).shape[0] == 0

    def test_non_string_item_names_its_index(self, tiny_model):
        with pytest.raises(TypeError, match="item 1 is int"):
            tiny_model.encode(["fine", 3])

    def test_encoder_only_backbone_is_refused(self):
        with pytest.raises(ValueError, match="BertModel.*not a decoder"):
            build_model(BertConfig(architectures=["BertModel"]), tokenizer=testing.train_tiny_tokenizer())

    def test_unsupported_decoder_is_refused(self):
        with pytest.raises(ValueError, match="GPT2LMHeadModel.*not verified"):
            build_model(GPT2Config(architectures=["GPT2LMHeadModel"]), tokenizer=testing.train_tiny_tokenizer())

    def test_missing_path(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does-not-exist"):
            build_model(tmp_path / "does-not-exist")
        with pytest.raises(FileNotFoundError, match="Hub is offline"):
            build_model("someone/not-cached-model")

    def test_is_causal_in_config_kwargs_is_refused(self, tiny_qwen_dir):
        with pytest.raises(ValueError, match="config_kwargs"):
            BidirectionalDecoder(str(tiny_qwen_dir), config_kwargs={"is_causal": False})


def test_package_exports():
    assert Path(kalm_st.__file__).parent.name == "kalm_st"
    assert kalm_st.MATRYOSHKA_DIMS == (896, 512, 256, 128, 64)


def test_texts_are_embedded_as_plain_text_not_through_the_chat_template(qwen_tokenizer_dir, tmp_path):
    """The real Qwen2 tokenizer has a chat template; sentence-transformers 6 would render every text through it (a
    KaLM prompt becoming a system message). KaLM embeds the plain string ``prompt + text``."""
    from sentence_transformers import SentenceTransformer

    reference = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert reference.chat_template is not None  # the hazard is real for this tokenizer
    config = testing.tiny_qwen_config(vocab_size=151_936, num_hidden_layers=1)
    model = build_model(config, tokenizer=qwen_tokenizer_dir, dtype="float32", device="cpu")
    prompt = "Instruct: Given a query, retrieve documents that answer the query \n Query: "
    expected = reference([prompt + "PIN reset?"])["input_ids"][0]
    assert model[0].preprocess(["PIN reset?"], prompt=prompt)["input_ids"][0].tolist() == expected
    model.save(str(tmp_path / "m"))
    plain = SentenceTransformer(str(tmp_path / "m"), device="cpu")  # the saved model keeps the plain-text mode
    assert plain[0].preprocess(["PIN reset?"], prompt=prompt)["input_ids"][0].tolist() == expected
