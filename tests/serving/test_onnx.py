"""``kalm-st export --format onnx`` and the torch-free ONNXEncoder (issue 13, parts 2 and 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from kalm_st import testing
from kalm_st.cli import main
from kalm_st.serving import ONNXEncoder
from kalm_st.serving.onnx_export import check_parity
from tests.reference_qwen2 import reference_embeddings

# Varied lengths (1 to ~40 tokens of the tiny BPE), so every batch below is padded.
TEXTS = [
    "A man is playing a guitar.",
    "x",
    "How do I reset my card PIN? I was charged twice for the same transaction yesterday evening.",
    "Two dogs run across a snowy field while children are playing football in the park nearby.",
    "The cat sleeps.",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="session")
def exported(_tiny_model, tmp_path_factory):
    """A saved tiny kalm-st model exported with ``kalm-st export MODEL --format onnx --quantize int8``, run from an
    empty working directory that must stay empty (onnxruntime writes scratch files into the working directory)."""
    folder = tmp_path_factory.mktemp("onnx") / "kalm"
    _tiny_model.save(str(folder))
    workdir = tmp_path_factory.mktemp("cwd")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(["export", str(folder), "--format", "onnx", "--quantize", "int8"]) == 0
    finally:
        os.chdir(cwd)
    assert list(workdir.iterdir()) == []
    return folder


def test_export_layout_and_graph_signature(exported):
    onnx_dir = exported / "onnx"
    assert {p.name for p in onnx_dir.iterdir()} == {
        "model.onnx",
        "model_int8.onnx",
        "tokenizer.json",
        "kalm_st_onnx.json",
    }
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert all(kind == "tensor(int64)" and all(isinstance(d, str) for d in shape) for kind, shape in inputs.values())
    assert list(outputs) == ["last_hidden_state", "sentence_embedding"]
    assert isinstance(outputs["last_hidden_state"][0], str) and isinstance(outputs["last_hidden_state"][1], str)
    assert outputs["last_hidden_state"][2] == 64 and outputs["sentence_embedding"][1] == 64
    manifest = json.loads((onnx_dir / "kalm_st_onnx.json").read_text())
    assert manifest["parity"]["float32"]["min_cosine"] >= 0.99999 and manifest["parity"]["int8"]["min_cosine"] >= 0.99
    assert manifest["normalize"] is True and manifest["bidirectional"] is True


@pytest.mark.parametrize(("file_name", "min_cosine"), [("model.onnx", 0.99999), ("model_int8.onnx", 0.99)])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_onnx_matches_pytorch_and_a_from_scratch_forward(exported, tiny_model, file_name, min_cosine, padding_side):
    tokenizer = tiny_model.tokenizer
    tokenizer.padding_side = padding_side
    batch = tokenizer(TEXTS, padding=True, return_tensors="np")
    assert (batch["attention_mask"] == 0).any(), "the probe batch must be padded"
    session = ort.InferenceSession(str(exported / "onnx" / file_name), providers=["CPUExecutionProvider"])
    hidden, embeddings = session.run(None, {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})

    # Reference 1: an independent from-scratch bidirectional Qwen2 forward over the saved weights (float64).
    oracle = reference_embeddings(
        load_file(str(exported / "model.safetensors")),
        testing.tiny_qwen_config(),
        torch.from_numpy(batch["input_ids"]),
        torch.from_numpy(batch["attention_mask"]),
    ).numpy()
    # Reference 2: the PyTorch model's own encode (right-padded, length-sorted batches).
    tokenizer.padding_side = "right"
    pytorch = tiny_model.encode(TEXTS)
    assert _cosines(embeddings, oracle).min() >= min_cosine
    assert _cosines(embeddings, pytorch).min() >= min_cosine
    if file_name == "model.onnx":
        np.testing.assert_allclose(embeddings, pytorch, rtol=0, atol=1e-5)  # fp32 noise of a 64-d unit vector
        # last_hidden_state at the real tokens equals the PyTorch token embeddings.
        tokens = tiny_model.encode(TEXTS, output_value="token_embeddings")
        for row, expected in enumerate(tokens):
            got = hidden[row][batch["attention_mask"][row].astype(bool)]
            np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_control_a_causal_export_differs_and_the_check_catches_it(exported, tiny_model, tmp_path):
    """The same weights traced with the causal mask on: clearly different embeddings, and the export's own parity
    check (run against the bidirectional model) refuses the graph."""
    from kalm_st.serving.onnx_export import _torch_export
    from kalm_st.serving.onnx_graph import EmbeddingGraph, inspect_model

    bidirectional = tiny_model.encode(TEXTS)
    shutil.copytree(exported / "onnx", tmp_path / "causal")
    spec = inspect_model(tiny_model, "tiny")
    tiny_model[0].auto_model.config.is_causal = True
    try:
        sample = tiny_model.tokenizer(TEXTS[:2], padding=True, return_tensors="np")
        _torch_export(
            EmbeddingGraph(tiny_model, spec).eval(),
            {k: sample[k].astype(np.int64) for k in ("input_ids", "attention_mask")},
            tmp_path / "causal" / "model.onnx",
            "torchscript",
            17,
        )
    finally:
        tiny_model[0].auto_model.config.is_causal = False
    causal = ONNXEncoder(tmp_path / "causal").encode(TEXTS)
    assert _cosines(causal, bidirectional).min() < 0.99
    report = check_parity(
        tmp_path / "causal", "model.onnx", tiny_model, is_decoder=True, threshold=0.99999, padding_side="right"
    )
    assert not report.passed and report.min_cosine < 0.99


def test_encoder_applies_the_models_prompts(exported, tiny_model):
    encoder = ONNXEncoder(exported, intra_op_num_threads=1)
    assert encoder.prompts == tiny_model.prompts and "query" in encoder.prompts
    query = encoder.encode_query(TEXTS)
    np.testing.assert_allclose(query, tiny_model.encode_query(TEXTS), rtol=0, atol=1e-5)
    # The instruction matters: without it the embeddings differ (so the check above can fail).
    assert _cosines(query, encoder.encode(TEXTS)).min() < 0.999
    np.testing.assert_allclose(encoder.encode_document(TEXTS), tiny_model.encode_document(TEXTS), atol=1e-5)
    task = "STSBenchmark"
    np.testing.assert_allclose(
        encoder.encode(TEXTS, prompt_name=task), tiny_model.encode(TEXTS, prompt_name=task), atol=1e-5
    )


def test_encoder_batching_truncation_and_progress_bar(exported, tiny_model, capsys):
    encoder = ONNXEncoder(exported, truncate_dim=32)
    small_batches = encoder.encode(TEXTS, batch_size=2, show_progress_bar=True)
    assert "Batches" in capsys.readouterr().err
    np.testing.assert_allclose(small_batches, encoder.encode(TEXTS, batch_size=64), atol=1e-6)
    np.testing.assert_allclose(small_batches, tiny_model.encode(TEXTS, truncate_dim=32), atol=1e-5)
    normalized = encoder.encode(TEXTS, normalize_embeddings=True, truncate_dim=16)
    np.testing.assert_allclose(
        normalized, tiny_model.encode(TEXTS, normalize_embeddings=True, truncate_dim=16), atol=1e-5
    )
    assert encoder.encode("x").shape == (32,) and encoder.get_embedding_dimension() == 32
    int8 = ONNXEncoder(exported, quantized=True).encode(TEXTS)
    assert _cosines(int8, tiny_model.encode(TEXTS)).min() >= 0.99


def test_encoder_imports_and_runs_without_torch(exported, tiny_model, tmp_path):
    np.save(tmp_path / "expected.npy", tiny_model.encode_query(TEXTS))
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "sentence_transformers"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import numpy as np
        from kalm_st.serving import ONNXEncoder
        got = ONNXEncoder({str(exported)!r}).encode_query({TEXTS!r})
        diff = np.abs(got - np.load({str(tmp_path / "expected.npy")!r})).max()
        assert diff <= 1e-5, diff
        print("OK", diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


class TestBadInput:
    def test_not_a_model_folder(self, tmp_path, capsys):
        assert main(["export", str(tmp_path / "missing")]) == 2
        assert "does not exist" in capsys.readouterr().err
        (tmp_path / "empty").mkdir()
        assert main(["export", str(tmp_path / "empty")]) == 2
        assert "not a sentence-transformers model folder (no modules.json)" in capsys.readouterr().err

    def test_unsupported_architecture(self, tmp_path, capsys):
        from transformers import GPT2Config, GPT2Model

        testing.train_tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
        GPT2Model(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
            tmp_path / "gpt2"
        )
        transformer = Transformer(str(tmp_path / "gpt2"))
        SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu").save(str(tmp_path / "st"))
        assert main(["export", str(tmp_path / "st")]) == 2
        error = capsys.readouterr().err
        assert "Unsupported architecture GPT2Model (model_type='gpt2')" in error and "qwen2" in error

    def test_causal_decoder_and_extra_module(self, tiny_qwen_dir, tiny_model, tmp_path, capsys):
        SentenceTransformer(str(tiny_qwen_dir), device="cpu").save(str(tmp_path / "causal"))
        assert main(["export", str(tmp_path / "causal")]) == 2
        assert "is causal" in capsys.readouterr().err
        tiny_model.save(str(tmp_path / "dense"))
        stock = SentenceTransformer(str(tmp_path / "dense"), device="cpu")
        SentenceTransformer(modules=[*stock, Dense(64, 8)], device="cpu").save(str(tmp_path / "dense"))
        assert main(["export", str(tmp_path / "dense")]) == 2
        assert "module 3 (Dense) cannot be exported" in capsys.readouterr().err

    def test_chat_template_modality_is_refused(self, tiny_model):
        from kalm_st.serving.onnx_graph import inspect_model

        tiny_model[0].modality_config["message"] = {"method": "forward", "method_output_name": "last_hidden_state"}
        with pytest.raises(ValueError, match="sentence_bert_config.json: the Transformer renders text through"):
            inspect_model(tiny_model, "old-save")

    def test_unwritable_destination(self, exported, tmp_path, capsys):
        (tmp_path / "a-file").write_text("not a folder")
        assert main(["export", str(exported), "--output", str(tmp_path / "a-file" / "onnx")]) == 2
        assert "is not writable" in capsys.readouterr().err

    def test_encoder_errors(self, exported, tmp_path):
        with pytest.raises(FileNotFoundError, match="Run `kalm-st export"):
            ONNXEncoder(tmp_path)
        (tmp_path / "fp32").mkdir()
        shutil.copytree(exported / "onnx", tmp_path / "fp32" / "onnx")
        (tmp_path / "fp32" / "onnx" / "model_int8.onnx").unlink()
        with pytest.raises(FileNotFoundError, match="--quantize int8"):
            ONNXEncoder(tmp_path / "fp32", quantized=True)
        encoder = ONNXEncoder(exported)
        with pytest.raises(TypeError, match="item 1 is int"):
            encoder.encode(["a", 3])
        with pytest.raises(ValueError, match="Prompt name 'nope' not found"):
            encoder.encode(["a"], prompt_name="nope")
        with pytest.raises(ValueError, match="truncate_dim must be in 1..64"):
            encoder.encode(["a"], truncate_dim=65)


def test_an_int8_graph_below_its_floor_is_dropped_and_float32_kept(tiny_model, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "m"))
    # A floor no int8 graph can reach (cosine <= 1): the check must refuse it.
    assert main(["export", str(tmp_path / "m"), "--quantize", "int8", "--int8-min-cosine", "1.01"]) == 1
    error = capsys.readouterr().err
    assert "int8 ONNX graph" in error and "model_int8.onnx was not kept" in error
    onnx_dir = tmp_path / "m" / "onnx"
    assert (onnx_dir / "model.onnx").is_file() and not (onnx_dir / "model_int8.onnx").exists()
    manifest = json.loads((onnx_dir / "kalm_st_onnx.json").read_text())
    assert manifest["files"] == {"float32": "model.onnx"} and list(manifest["parity"]) == ["float32"]
    np.testing.assert_allclose(ONNXEncoder(tmp_path / "m").encode(TEXTS), tiny_model.encode(TEXTS), atol=1e-5)


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_parity(tiny_model, tmp_path):
    """``--exporter dynamo`` (torch.export); slow (~15 s for the tiny model), so opt-in."""
    tiny_model.save(str(tmp_path / "m"))
    assert main(["export", str(tmp_path / "m"), "--exporter", "dynamo"]) == 0
    manifest = json.loads((tmp_path / "m" / "onnx" / "kalm_st_onnx.json").read_text())
    assert manifest["exporter"] == "dynamo" and manifest["opset"] == 18
    np.testing.assert_allclose(ONNXEncoder(tmp_path / "m").encode(TEXTS), tiny_model.encode(TEXTS), atol=1e-5)


def test_truncation_matches_the_models_max_seq_length(tiny_model, tmp_path):
    tiny_model.max_seq_length = 16
    tiny_model.save(str(tmp_path / "m"))
    assert main(["export", str(tmp_path / "m")]) == 0
    long_texts = [" ".join(TEXTS) * 3, TEXTS[2] * 2, "x"]
    encoder = ONNXEncoder(tmp_path / "m")
    assert encoder.max_seq_length == 16
    assert encoder.tokenize(long_texts)["input_ids"].shape[1] == 16
    # The query prompt is long too: truncation applies to prompt + text, as in sentence-transformers.
    np.testing.assert_allclose(encoder.encode_query(long_texts), tiny_model.encode_query(long_texts), atol=1e-5)
    np.testing.assert_allclose(encoder.encode(long_texts), tiny_model.encode(long_texts), atol=1e-5)


def test_export_to_another_folder_carries_the_prompt_table(exported, tiny_model, tmp_path):
    (tmp_path / "config_sentence_transformers.json").write_text('{"prompts": {"query": "unrelated: "}}')
    assert main(["export", str(exported), "--output", str(tmp_path / "served")]) == 0
    encoder = ONNXEncoder(tmp_path / "served")
    assert encoder.prompts == tiny_model.prompts
    np.testing.assert_allclose(encoder.encode_query(TEXTS), tiny_model.encode_query(TEXTS), atol=1e-5)


def test_weight_only_int8_quantizer_is_quiet(exported, tmp_path):
    """onnxruntime's weight-only quantizer calls ``logging.basicConfig(level=INFO)`` when first imported and then logs
    two lines per MatMul node (hundreds for a real decoder); ``kalm-st export --quantize int8`` must not print them.
    A fresh interpreter, because basicConfig acts once per process (pytest's own log handlers would hide it here)."""
    script = textwrap.dedent(
        f"""
        from kalm_st.serving.onnx_int8 import quantize_variant
        quantize_variant({str(exported / "onnx" / "model.onnx")!r}, {str(tmp_path / "q.onnx")!r},
                         "weight-only-fp32-compute")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert (tmp_path / "q.onnx").is_file()
    assert "start to quantize" not in result.stdout + result.stderr, result.stderr[-2000:]
