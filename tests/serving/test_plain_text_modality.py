"""A kalm-st model tokenizes ``prompt + text`` as plain text, as every serving runtime does, even when its
tokenizer ships a chat template (the real Qwen2 tokenizer does; sentence-transformers 6 would otherwise render
every input through it and turn the KaLM instruction into a system message)."""

from __future__ import annotations

from kalm_st import build_model, testing
from kalm_st.instructions import RETRIEVAL_INSTRUCTION, format_instruction


def test_chat_template_tokenizer_still_embeds_plain_text(qwen_tokenizer_dir):
    config = testing.tiny_qwen_config(vocab_size=151_936, num_hidden_layers=1)
    model = build_model(config, tokenizer=qwen_tokenizer_dir, dtype="float32", device="cpu")
    assert model.tokenizer.chat_template, "fixture precondition: the real Qwen2 tokenizer has a chat template"
    prompt = format_instruction(RETRIEVAL_INSTRUCTION)
    features = model.preprocess(["Hello world"], prompt=prompt)
    # Reference: the tokenizer on the concatenated string, what vLLM, TEI, llama.cpp and ONNX Runtime embed.
    expected = model.tokenizer([prompt + "Hello world"])["input_ids"]
    assert features["input_ids"].tolist() == expected
    assert "message" not in model[0].modality_config
