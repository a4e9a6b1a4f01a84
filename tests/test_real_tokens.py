"""Real-token forwards (packed rows / length buckets) give the padded forward's embeddings, losses and gradients.

References: the padded forward of the same weights (``real_tokens="off"``, the stock sentence-transformers path) and
the from-scratch Qwen2 of ``tests/reference_qwen2.py``; never the new code's own output.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from kalm_st.losses import (
    CachedFocalInfoNCE,
    ContrastiveDistillation,
    EmbeddingDistillation,
    FocalInfoNCE,
    HardNegativeMixing,
    kalm_matryoshka,
)
from kalm_st.modules.real_tokens import TokenLayout, bucket_groups
from tests.losses._helpers import (
    ANCHORS,
    NEGATIVES_1,
    NEGATIVES_2,
    POSITIVES,
    assert_same_loss_and_grads,
    featurize,
    params_grads,
)
from tests.reference_qwen2 import reference_embeddings

TEXTS = [
    "Hi.",
    "A man is playing a guitar on a stage while the crowd sings along to every single word of the song.",
    "How do I reset my card PIN?",
    "",
    "Two dogs run across a snowy field.",
    "What is the capital of France? Paris is, and it has been for a very long time indeed.",
]
MODES = [
    ("pack", {}),
    ("pack", {"pack_row_tokens": 8}),
    ("bucket", {}),
    ("bucket", {"bucket_ratio": 1.1}),
    ("auto", {}),
]


class _Positions:
    """Counts the positions the decoder computes, to show the real-token path really ran."""

    def __init__(self, model) -> None:
        self.count = 0
        # sentence-transformers calls the decoder's ``forward`` directly (no hooks); its embedding table is called
        model[0].auto_model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += args[0].numel()


def _set(model, mode: str, settings: dict) -> None:
    model[0].real_tokens = mode
    for key, value in settings.items():
        setattr(model[0], key, value)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("mode", "settings"), MODES)
def test_embeddings_equal_the_padded_forward_and_a_from_scratch_qwen2(
    tiny_qwen_dir, tiny_model, padding_side: str, mode: str, settings: dict
) -> None:
    tiny_model.tokenizer.padding_side = padding_side
    counter = _Positions(tiny_model)
    _set(tiny_model, "off", {})
    padded = tiny_model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    padded_positions, counter.count = counter.count, 0
    _set(tiny_model, mode, settings)
    real = tiny_model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    batch = tiny_model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert counter.count < padded_positions == batch["input_ids"].numel()  # padding really skipped

    nonempty = torch.tensor([bool(t) for t in TEXTS])
    assert F.cosine_similarity(real[nonempty], padded[nonempty]).min() >= 0.99999
    assert torch.equal(real[~nonempty], torch.zeros_like(real[~nonempty]))  # the empty text stays the zero vector
    weights = load_file(str(tiny_qwen_dir / "model.safetensors"))
    expected = reference_embeddings(
        weights, tiny_model[0].auto_model.config, batch["input_ids"], batch["attention_mask"]
    )
    torch.testing.assert_close(real[nonempty].double(), expected[nonempty], atol=1e-5, rtol=0)


def test_token_states_scatter_back_to_their_padded_places(tiny_model) -> None:
    """Every real token's state equals the padded forward's at the same place; padding positions hold zeros."""
    tiny_model.tokenizer.padding_side = "left"
    features = tiny_model.preprocess(TEXTS)
    _set(tiny_model, "off", {})
    with torch.no_grad():
        padded = tiny_model[0](dict(features))["token_embeddings"]
        _set(tiny_model, "pack", {"pack_row_tokens": 16})
        packed = tiny_model[0](dict(features))["token_embeddings"]
    mask = features["attention_mask"].bool()
    torch.testing.assert_close(packed[mask], padded[mask], atol=2e-5, rtol=1e-4)
    assert torch.equal(packed[~mask], torch.zeros_like(packed[~mask]))


def test_bucket_groups_keep_lengths_within_the_ratio() -> None:
    lengths = torch.tensor([3, 40, 0, 5, 9, 41, 4, 12])
    groups = bucket_groups(lengths, ratio=1.5)
    flat = torch.cat(groups)
    assert sorted(flat.tolist()) == [0, 1, 3, 4, 5, 6, 7]  # every non-empty text once, the empty one skipped
    for group in groups:
        group_lengths = lengths[group].double()
        assert group_lengths.max() / group_lengths.min() < 1.5
    layout = TokenLayout.of(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert layout.token_text.tolist() == [0, 0, 1, 1] and layout.token_position.tolist() == [0, 1, 0, 1]


def test_bad_mode_is_refused(tiny_model) -> None:
    with pytest.raises(ValueError, match="real_tokens"):
        tiny_model[0].real_tokens = "packed"


def test_saved_model_is_the_stock_format(tiny_model, tmp_path) -> None:
    """The runtime setting is not saved: plain sentence-transformers loads the folder and embeds the same."""
    _set(tiny_model, "pack", {"pack_row_tokens": 8})
    tiny_model.save(str(tmp_path / "model"))
    assert "real_tokens" not in (tmp_path / "model" / "sentence_bert_config.json").read_text()
    stock = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert type(stock[0]).__module__.startswith("sentence_transformers.")
    expected = stock.encode(TEXTS[:3], convert_to_tensor=True)
    got = tiny_model.encode(TEXTS[:3], convert_to_tensor=True)
    assert F.cosine_similarity(got, expected).min() >= 0.99999


def _columns() -> list[list[str]]:
    # Lengths vary a lot within each column, so packing and buckets change the work, not just the layout.
    long = " and then it went on for a long while, past the river and over the hills"
    return [
        ANCHORS,
        [p + (long if i % 2 else "") for i, p in enumerate(POSITIVES)],
        NEGATIVES_1,
        [n + (long if i % 3 == 0 else "") for i, n in enumerate(NEGATIVES_2)],
    ]


def _losses(model) -> dict[str, object]:
    mixing = HardNegativeMixing(seed=3)
    return {
        "focal": lambda: FocalInfoNCE(model, temperature=0.05, gamma=0.5),
        "focal+mixing": lambda: FocalInfoNCE(model, temperature=0.05, gamma=0.5, hard_negative_mixing=mixing),
        "cached token budget": lambda: CachedFocalInfoNCE(
            model, temperature=0.05, gamma=0.5, mini_batch_size=4, mini_batch_num_tokens=40
        ),
        "contrastive distillation": lambda: ContrastiveDistillation(model, FocalInfoNCE(model, gamma=0.5)),
        "embedding distillation": lambda: EmbeddingDistillation(
            model, FocalInfoNCE(model), teacher_dim=12, weight=0.7
        ),
        "matryoshka": lambda: kalm_matryoshka(model, FocalInfoNCE(model, gamma=0.5), dims=[64, 32, 16]),
    }


def _labels(name: str, rows: int, columns: int) -> torch.Tensor | None:
    generator = torch.Generator().manual_seed(11)
    if name == "contrastive distillation":
        return torch.rand(rows, columns - 1, generator=generator)
    if name == "embedding distillation":
        return torch.randn(rows, columns, 12, generator=generator)
    return None


@pytest.mark.parametrize("mode", ["pack", "bucket"])
@pytest.mark.parametrize(
    "loss_name",
    [
        "focal",
        "focal+mixing",
        "cached token budget",
        "contrastive distillation",
        "embedding distillation",
        "matryoshka",
    ],
)
def test_losses_and_gradients_equal_the_padded_forward(tiny_model, loss_name: str, mode: str) -> None:
    columns = _columns()
    features = featurize(tiny_model, columns)
    labels = _labels(loss_name, len(columns[0]), len(columns))

    def run(real_tokens: str):
        _set(tiny_model, real_tokens, {"pack_row_tokens": 24})
        torch.manual_seed(0)
        loss = _losses(tiny_model)[loss_name]()
        tiny_model.zero_grad()
        value = loss(copy.deepcopy(features), labels)
        value.backward()
        return value.detach(), params_grads(tiny_model)

    assert_same_loss_and_grads(run(mode), run("off"), msg=f"{loss_name} / {mode}")


def test_gradcache_replay_with_real_tokens_equals_plain_padded(tiny_model) -> None:
    """CachedFocalInfoNCE (real tokens, token-budget mini-batches, dropout replayed) = FocalInfoNCE padded."""
    tiny_model.train()
    features = featurize(tiny_model, _columns())
    kwargs = dict(temperature=0.05, gamma=0.5)

    def run(loss, real_tokens: str):
        _set(tiny_model, real_tokens, {})
        tiny_model.zero_grad()
        torch.manual_seed(5)
        value = loss(copy.deepcopy(features), None)
        value.backward()
        return value.detach(), params_grads(tiny_model)

    cached = CachedFocalInfoNCE(tiny_model, mini_batch_size=3, mini_batch_num_tokens=64, **kwargs)
    plain = FocalInfoNCE(tiny_model, **kwargs)
    if any(getattr(m, "p", 0) for m in tiny_model.modules() if isinstance(m, torch.nn.Dropout)):
        pytest.skip("dropout: the plain loss draws other masks than the cached replay")
    assert_same_loss_and_grads(run(cached, "auto"), run(plain, "off"), msg="gradcache")


def test_a_causal_call_stays_causal(tiny_model) -> None:
    """The block mask is bidirectional, so a causal call (``is_causal=True``, the GPU check's control) or a causal
    config must run padded: the first token then cannot see the last one. Reference: causality itself."""
    model = copy.deepcopy(tiny_model)
    features = model.preprocess(TEXTS[:3])  # padded: the real-token path would run for a bidirectional call
    ids = features["input_ids"]
    last = int(features["attention_mask"][1].sum()) - 1
    changed = ids.clone()
    changed[1, last] = ids[1, 1] if int(ids[1, 1]) != int(ids[1, last]) else ids[1, 2]

    def first_token(input_ids: torch.Tensor, causal: bool) -> torch.Tensor:
        with torch.no_grad():
            return model[0]({**features, "input_ids": input_ids}, is_causal=causal)["token_embeddings"][1, 0]

    assert (first_token(ids, False) - first_token(changed, False)).abs().max() > 1e-3  # bidirectional: it sees it
    assert torch.equal(first_token(ids, True), first_token(changed, True))  # causal: it does not
