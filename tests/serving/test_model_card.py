"""The model card's "Serving" section: a command per runtime, each with what it was checked against and how."""

from __future__ import annotations

import re
import shlex

import yaml

from kalm_st.cli import build_parser
from kalm_st.evaluation.card import build_model_card
from kalm_st.serving.runtimes import RUNTIME_CHECKS


def test_card_has_a_serving_section_with_commands_and_versions(tiny_model):
    card = str(build_model_card(tiny_model, "me/kalm-test"))
    yaml.safe_load(card.split("---")[1])  # the metadata block still parses
    serving = card[card.index("## Serving") : card.index("## Training recipe")]
    for command in (
        'SentenceTransformer("me/kalm-test")',
        "vllm serve me/kalm-test --runner pooling --dtype float32",
        '"input_type": "query"',
        "text-embeddings-router --model-id me/kalm-test --pooling mean",
        "llama-server -m model.gguf --embeddings --pooling mean",
        # llama-cpp-python's server has no pooling flag: mean (1) comes as a GGUF key override (run in
        # benchmarks/serving_parity.py; without it a SmolLM2 GGUF is served as per-token vectors).
        "python -m llama_cpp.server --model model.gguf --embedding true",
        "--kv_overrides llama.pooling_type=int:1",
        # llama-server answers HTTP 500 for an input over its batch (run in benchmarks/serving_parity.py): the card
        # says how to cut it.
        "/tokenize",
        "kalm-st export ./kalm-test --format onnx --quantize int8",
    ):
        assert command in serving, command
    for check in RUNTIME_CHECKS.values():
        assert check.version in serving
        assert ("not run" in check.note) == (check.checked == "read")
    assert serving.count("read on 2026-12-01, not run") == 1  # TEI (vLLM and llama.cpp: benchmarks/serving_parity.py)
    # llama-server refuses --attention (a llama-embedding flag); the GGUF carries the non-causal attention.
    assert "--attention" not in serving
    # The query instruction users must prepend themselves is the model's own.
    assert tiny_model.prompts["query"].replace("\n", "\\n") in serving


def test_the_cards_kalm_st_command_parses():
    card_line = "kalm-st export ./kalm-test --format onnx --quantize int8"
    args = build_parser().parse_args(shlex.split(card_line)[1:])
    assert (args.command, args.format, args.quantize) == ("export", "onnx", "int8")
    assert re.fullmatch(r"[\w./-]+", args.model)
