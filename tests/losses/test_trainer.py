"""Short SentenceTransformerTrainer runs on real TrecQA rows: each loss lowers the loss; the model card records it."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from kalm_st.losses import (
    CachedFocalInfoNCE,
    ContrastiveDistillation,
    FocalInfoNCE,
    HardNegativeMixing,
    kalm_matryoshka,
)
from tests.losses._helpers import trecqa_rows

NUM_ROWS = 32


def _dataset(shared_data_dir, minilm_dir, with_teacher: bool) -> Dataset:
    rows = trecqa_rows(shared_data_dir, NUM_ROWS, num_negatives=2)
    assert len(rows) == NUM_ROWS
    data = {key: [row[key] for row in rows] for key in ("anchor", "positive", "negative_1", "negative_2")}
    if with_teacher:  # a real teacher: all-MiniLM-L6-v2 cosine scores of (query, positive, negatives)
        teacher = SentenceTransformer(str(minilm_dir), device="cpu")
        q = teacher.encode(data["anchor"], convert_to_tensor=True, normalize_embeddings=True)
        scores = [
            (q * teacher.encode(data[c], convert_to_tensor=True, normalize_embeddings=True)).sum(-1)
            for c in ("positive", "negative_1", "negative_2")
        ]
        data["label"] = torch.stack(scores, dim=1).tolist()
    return Dataset.from_dict(data)


LOSSES = {
    "focal_mixing": lambda m: FocalInfoNCE(m, temperature=0.05, gamma=0.5, hard_negative_mixing=HardNegativeMixing()),
    "cached": lambda m: CachedFocalInfoNCE(m, mini_batch_size=8, temperature=0.05),
    "distillation": lambda m: ContrastiveDistillation(m, FocalInfoNCE(m, temperature=0.05), alpha=1.0),
    "matryoshka": lambda m: kalm_matryoshka(m, FocalInfoNCE(m, temperature=0.05), dims=[64, 32]),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_trainer_lowers_loss_and_card_names_it(tiny_model, shared_data_dir, minilm_dir, tmp_path, name: str) -> None:
    model = tiny_model
    model.max_seq_length = 48
    dataset = _dataset(shared_data_dir, minilm_dir, with_teacher=name == "distillation")
    loss = LOSSES[name](model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, loss=loss
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before, (before, after)

    model.save(str(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text(encoding="utf8")
    inner = loss.loss if name == "matryoshka" else loss
    assert type(inner).__name__ in card
    assert "zhao2026iclr-kalmembeddingv2" in card
    if name != "matryoshka":
        assert '"gamma": 0.5' in card and '"temperature": 0.05' in card
