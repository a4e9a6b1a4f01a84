"""Saves that every serving runtime reads as sentence-transformers does (issue 13, part 1)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from kalm_st.cli import main
from kalm_st.serving.runtime_files import (
    LEGACY_MODULE_TYPES,
    bidirectional_flag_is_inert,
    dual_format_pooling_config,
    write_runtime_files,
)
from tests.serving import _runtime_readers as readers

SENTENCES = ["A man is playing a guitar.", "Two dogs run.", "How do I reset my card PIN?"]

# ../shared/docs/DATA_AND_SERVING.md §3, the file every reader accepts, at the tiny model's 64 dimensions.
DUAL_POOLING_FILE = {
    "embedding_dimension": 64,
    "pooling_mode": "mean",
    "include_prompt": True,
    "word_embedding_dimension": 64,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
}


@pytest.fixture
def saved(tiny_model, tmp_path):
    folder = tmp_path / "kalm"
    tiny_model.save(str(folder))
    return folder


def test_save_holds_both_formats_and_both_flags(saved, tiny_model):
    assert json.loads((saved / "1_Pooling" / "config.json").read_text()) == DUAL_POOLING_FILE
    config = json.loads((saved / "config.json").read_text())
    assert config["is_causal"] is False and config["use_bidirectional_attention"] is True
    st_config = json.loads((saved / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == tiny_model.max_seq_length == 512
    assert st_config["do_lower_case"] is False
    assert st_config["modality_config"] == {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    types = [m["type"] for m in json.loads((saved / "modules.json").read_text())]
    assert types == ["sentence_transformers.models." + name for name in ("Transformer", "Pooling", "Normalize")]
    # Saving again changes nothing (the rewrite is idempotent).
    assert write_runtime_files(saved) == []


def test_every_reader_gets_mean_pooling_and_normalisation(saved):
    expected = {"use_activation": True, "seq_pooling_type": "MEAN"}
    assert readers.vllm_before_fix(saved) == expected
    assert readers.vllm_after_fix(saved) == expected
    assert readers.text_embeddings_inference(saved) == {"pooling": "mean", "max_input_length": 512}
    assert readers.llama_cpp_converter_before_2026_04(saved) == "MEAN"
    assert readers.llama_cpp_converter_current(saved) == ("MEAN", False)


def test_control_a_stock_v6_save_is_misread(saved, tmp_path):
    """The same model re-saved by plain sentence-transformers 6: the readers above fail or fall back silently."""
    stock = tmp_path / "stock"
    SentenceTransformer(str(saved), device="cpu").save(str(stock))
    assert readers.vllm_before_fix(stock) == {}  # no Pooling found: last-token pooling, no normalisation
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        readers.text_embeddings_inference(stock)
    assert readers.llama_cpp_converter_before_2026_04(stock) is None
    assert readers.vllm_after_fix(stock) == {"use_activation": True, "seq_pooling_type": "MEAN"}


def test_save_reloads_in_plain_sentence_transformers_in_a_fresh_interpreter(saved, tiny_model, tmp_path):
    np.save(tmp_path / "expected.npy", tiny_model.encode(SENTENCES))
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
        model = SentenceTransformer({str(saved)!r}, device="cpu")
        assert not any(name.startswith("kalm_st") for name in sys.modules), "kalm_st was imported"
        assert [type(m) for m in model] == [Transformer, Pooling, Normalize], [type(m) for m in model]
        # sentence-transformers 6 reads the v6 keys and drops the legacy ones.
        assert model[1].get_config_dict() == {{"embedding_dimension": 64, "pooling_mode": "mean", "include_prompt": True}}
        assert model[0].auto_model.config.is_causal is False
        assert model.max_seq_length == 512
        diff = np.abs(model.encode({SENTENCES!r}) - np.load({str(tmp_path / "expected.npy")!r})).max()
        assert diff <= 1e-6, diff
        print("OK", diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


def test_pooling_mode_wins_over_the_legacy_keys(tmp_path):
    """sentence-transformers uses ``pooling_mode`` and ignores the booleans when both are present: pinned with a
    file whose two formats disagree (a change in this precedence would make our dual file ambiguous)."""
    (tmp_path / "config.json").write_text(json.dumps(dict(DUAL_POOLING_FILE, pooling_mode_cls_token=True)))
    assert Pooling.load(str(tmp_path)).pooling_mode == "mean"


def test_legacy_aliases_are_the_same_classes():
    import importlib
    import warnings

    for current, legacy in LEGACY_MODULE_TYPES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            legacy_cls = getattr(importlib.import_module(legacy.rsplit(".", 1)[0]), legacy.rsplit(".", 1)[1])
        module, name = current.rsplit(".", 1)
        assert legacy_cls is getattr(importlib.import_module(module), name)


def test_convert_writes_the_runtime_files(tiny_qwen_dir, tmp_path):
    assert main(["convert", str(tiny_qwen_dir), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text()) == DUAL_POOLING_FILE
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_bidirectional_attention"] is True


def test_dual_format_from_a_legacy_file_and_bad_modes():
    legacy = {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "include_prompt": True}
    assert dual_format_pooling_config(legacy) == DUAL_POOLING_FILE
    with pytest.raises(ValueError, match="x.json: unknown pooling mode"):
        dual_format_pooling_config({"embedding_dimension": 8, "pooling_mode": "median"}, source="x.json")
    with pytest.raises(ValueError, match="x.json: no integer 'embedding_dimension'"):
        dual_format_pooling_config({"pooling_mode": "mean"}, source="x.json")


def test_bidirectional_flag_only_where_transformers_ignores_it(tmp_path):
    assert bidirectional_flag_is_inert("qwen2") and bidirectional_flag_is_inert("qwen3")
    assert bidirectional_flag_is_inert("llama")
    # Gemma configs act on the flag (Gemma 3 halves its sliding window): writing it would change the embeddings.
    assert not bidirectional_flag_is_inert("gemma3_text") and not bidirectional_flag_is_inert("gemma2")
    (tmp_path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}])
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "is_causal": False}))
    write_runtime_files(tmp_path)
    assert "use_bidirectional_attention" not in json.loads((tmp_path / "config.json").read_text())
