"""``kalm-st convert``: decoder checkpoints and the released KaLM layout become portable kalm-st folders."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from kalm_st import testing
from kalm_st.cli import main
from tests.reference_qwen2 import reference_embeddings

TEXTS = ["A man is playing a guitar.", "How do I reset my card PIN?"]


def _plain_st_embeddings(folder) -> np.ndarray:
    """Encode in a fresh interpreter that imports only sentence_transformers, without trust_remote_code."""
    script = textwrap.dedent(
        f"""
        import sys, json
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(folder)!r}, device="cpu")
        assert not any(name.startswith("kalm_st") for name in sys.modules)
        print(json.dumps(model.encode({TEXTS!r}).tolist()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.array(json.loads(result.stdout.strip().splitlines()[-1]))


def _released_kalm_layout(folder):
    """A folder shaped like the released KaLM-V2 checkpoints: a Qwen2ForCausalLM with remote code in auto_map,
    a mean Pooling and a Normalize; it needs trust_remote_code with stock sentence-transformers."""
    tokenizer = testing.train_tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    Qwen2ForCausalLM(testing.tiny_qwen_config(architectures=["Qwen2ForCausalLM"])).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_bidirectional_qwen2.BidirectionalQwen2Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_bidirectional_qwen2.py").write_text("raise ImportError('remote code must not run')\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "include_prompt": True})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    return folder


def test_convert_released_kalm_layout(tmp_path, capsys):
    source = _released_kalm_layout(tmp_path / "kalm-release")
    assert main(["convert", str(source), str(tmp_path / "out")]) == 0
    assert "bidirectional" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["is_causal"] is False and "auto_map" not in config
    got = _plain_st_embeddings(tmp_path / "out")

    # Oracle: the from-scratch bidirectional forward over the source's own weights.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    expected = reference_embeddings(
        load_file(str(source / "model.safetensors")),
        testing.tiny_qwen_config(),
        batch["input_ids"],
        batch["attention_mask"],
    )
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_convert_plain_decoder_checkpoint(tiny_qwen_dir, tmp_path):
    assert main(["convert", str(tiny_qwen_dir), str(tmp_path / "out"), "--max-seq-length", "64"]) == 0
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(tmp_path / "out"), device="cpu").max_seq_length == 64
    assert _plain_st_embeddings(tmp_path / "out").shape == (2, 64)


def test_convert_bad_input(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "neither modules.json nor config.json" in capsys.readouterr().err
    source = _released_kalm_layout(tmp_path / "cls")
    (source / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_cls_token": True})
    )
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    assert "not mean pooling" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "kalm-st" in capsys.readouterr().out
