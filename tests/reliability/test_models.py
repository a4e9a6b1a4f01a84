"""Bad model paths and architectures: clear errors naming the path and the architecture, before any weight loads;
damaged model folders are named with the damaged file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kalm_st import build_model, testing
from kalm_st.model import load_model


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        build_model(tmp_path / "nope")
    assert str(info.value) == f"Backbone {str(tmp_path / 'nope')!r} does not exist."
    with pytest.raises(FileNotFoundError) as info:
        load_model(tmp_path / "nope")
    assert str(info.value) == f"Model {str(tmp_path / 'nope')!r} does not exist."


def test_hub_id_while_offline() -> None:
    with pytest.raises(FileNotFoundError) as info:
        build_model("someone/not-cached-model")
    assert str(info.value) == (
        "Backbone 'someone/not-cached-model' does not exist (and the Hub is offline: HF_HUB_OFFLINE is set)."
    )


def test_encoder_only_model_folder(minilm_dir: Path) -> None:
    with pytest.raises(ValueError) as info:
        build_model(minilm_dir)
    assert str(info.value).startswith(
        f"Unsupported architecture BertModel (model_type='bert') in {minilm_dir}: it is not a decoder LLM "
        "(encoder-only models are already bidirectional: use the stock sentence_transformers Transformer module)."
    )


def test_unsupported_decoder_folder(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=600, n_positions=64)).save_pretrained(folder)
    testing.train_tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError) as info:
        build_model(folder)
    assert str(info.value).startswith(
        f"Unsupported architecture GPT2LMHeadModel (model_type='gpt2') in {folder}: it is a decoder kalm-st has not "
        "verified as bidirectional. Supported decoder model types: ['gemma', 'gemma2', 'gemma3_text', 'llama', "
    )


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        build_model(tmp_path / "weights")
    assert str(info.value) == (
        f"Backbone {str(tmp_path / 'weights')!r} has neither modules.json nor config.json: not a model folder."
    )
    with pytest.raises(FileNotFoundError) as info:
        load_model(tmp_path / "weights")
    assert str(info.value) == (
        f"Model {str(tmp_path / 'weights')!r} has neither modules.json nor config.json: not a model folder."
    )


def test_a_file_instead_of_a_folder(tiny_qwen_dir: Path) -> None:
    config = tiny_qwen_dir / "config.json"
    with pytest.raises(NotADirectoryError) as info:
        build_model(config)
    assert str(info.value) == f"Backbone {str(config)!r} is a file; give the model's folder."
    with pytest.raises(NotADirectoryError) as info:
        load_model(config)
    assert str(info.value) == f"Model {str(config)!r} is a file; give the model's folder."


def test_tokenizer_without_padding_or_end_token() -> None:
    tokenizer = testing.train_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"has neither a padding nor an end-of-sequence token; set `tokenizer\.pad"):
        build_model(testing.tiny_qwen_config(), tokenizer=tokenizer)


@pytest.fixture
def saved_model(tiny_model, tmp_path: Path) -> Path:
    tiny_model.save(str(tmp_path / "model"))
    return tmp_path / "model"


def test_truncated_weights_in_a_saved_model(saved_model: Path) -> None:
    weights = saved_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_model(saved_model)
    assert str(info.value) == (
        f"Model folder {str(saved_model)!r} is damaged: model.safetensors: SafetensorError: Error while deserializing "
        "header: incomplete metadata, file not fully covered."
    )


def test_unparsable_module_config_in_a_saved_model(saved_model: Path) -> None:
    shutil.copy(saved_model / "README.md", saved_model / "1_Pooling" / "config.json")
    with pytest.raises(ValueError) as info:
        load_model(saved_model)
    assert str(info.value).startswith(
        f"Model folder {str(saved_model)!r} is damaged: 1_Pooling/config.json: JSONDecodeError: "
    )
