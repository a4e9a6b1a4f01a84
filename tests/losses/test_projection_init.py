"""EmbeddingDistillation's ridge-fitted start (kalm_st.losses.fit_projection) against a hand-chosen linear map.

The teacher embeddings are an exact affine image ``Y = X A^T + c`` of the starting student's embeddings ``X``, with
``A`` and ``c`` drawn here: the fit must recover them (ridge ~ 0), and a recipe stage built with
``projection_init: ridge`` must start with a projection that maps the student onto that teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset

from kalm_st.losses import EmbeddingDistillation, FocalInfoNCE, fit_projection

ROOT = Path(__file__).resolve().parents[2]
TEACHER_DIM = 24


def _rows(n: int) -> dict[str, list[str]]:
    frame = pd.read_csv(ROOT / "data/stsb/train.csv", header=None, names=["a", "b", "s"]).head(2 * n)
    return {"anchor": frame.a[:n].tolist(), "positive": frame.b[:n].tolist(), "negative_1": frame.b[n:].tolist()}


def _affine_teacher(model, rows: dict[str, list[str]], seed: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dim = model.get_embedding_dimension()
    a, c = torch.randn(TEACHER_DIM, dim, generator=generator), torch.randn(TEACHER_DIM, generator=generator)
    x = torch.stack([model.encode(rows[col], convert_to_tensor=True).float() for col in rows], dim=1)  # (n, C, d)
    return (x @ a.T + c).numpy(), a, c


def test_the_fit_recovers_an_exact_affine_teacher(tiny_model) -> None:
    rows = _rows(48)  # 144 texts for a 32-dim student (tiny-qwen2)
    labels, a, c = _affine_teacher(tiny_model, rows)
    dataset = Dataset.from_dict({**rows, "label": labels.tolist()})
    loss = EmbeddingDistillation(
        tiny_model, FocalInfoNCE(tiny_model), teacher_dim=TEACHER_DIM, projection_init="ridge"
    )
    info = fit_projection(loss, dataset, rows=48, ridge=1e-9)
    torch.testing.assert_close(loss.projection.weight.detach(), a, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(loss.projection.bias.detach(), c, atol=2e-3, rtol=2e-3)
    assert info["cos_after"] > 0.9999 > info["cos_before"]


def test_the_fit_names_a_label_that_is_not_teacher_embeddings(tiny_model) -> None:
    rows = _rows(8)
    loss = EmbeddingDistillation(tiny_model, FocalInfoNCE(tiny_model), teacher_dim=TEACHER_DIM)
    scores = Dataset.from_dict({**rows, "label": [[1.0, 0.0]] * 8})
    with pytest.raises(ValueError, match=r"expected \(3, 24\): teacher embeddings of \['anchor', 'positive'"):
        fit_projection(loss, scores)
    with pytest.raises(ValueError, match="projection_init must be 'random' or 'ridge'"):
        EmbeddingDistillation(tiny_model, FocalInfoNCE(tiny_model), teacher_dim=8, projection_init="zeros")


def test_a_stage_with_projection_init_ridge_starts_at_the_fit(tmp_path: Path) -> None:
    from kalm_st.instructions import column_prompts
    from kalm_st.recipe.build import build_stage, build_stage_model
    from kalm_st.recipe.config import StageConfig

    config = {
        "stage": "distill",
        "output_dir": str(tmp_path / "out"),
        "model": {"init_from": "builtin:tiny-qwen2", "max_seq_length": 256, "dtype": "float32"},
        "data": {"tasks": {"STSBenchmark": {"path": str(tmp_path / "rows.jsonl"), "type": "STS"}}},
        "loss": {
            "name": "embedding_distillation",
            "kwargs": {"teacher_dim": TEACHER_DIM, "projection_init": "ridge", "projection_ridge": 1e-9},
            "base": {"name": "focal_infonce", "kwargs": {"temperature": 0.05}},
        },
        "matryoshka": {"enabled": False},
        "args": {"max_steps": 1, "per_device_train_batch_size": 4, "use_cpu": True, "report_to": "none"},
    }
    stage = StageConfig.from_dict(config, source="test.yaml")
    rows = _rows(48)
    # the teacher is affine in the *starting* model's embeddings of the texts as trained (STS: with its prompts)
    model = build_stage_model(stage)
    prompts = column_prompts(list(rows), "STSBenchmark", "STS")
    labels, a, c = _affine_teacher(model, {col: [prompts[col] + t for t in texts] for col, texts in rows.items()})
    with open(tmp_path / "rows.jsonl", "w") as handle:
        for i in range(48):
            handle.write(json.dumps({**{col: rows[col][i] for col in rows}, "label": labels[i].tolist()}) + "\n")
    run = build_stage(stage)
    assert run.args.prompts["STSBenchmark"] == {c: p for c, p in prompts.items() if p}  # what the fit encoded with
    loss = run.losses["STSBenchmark"]
    torch.testing.assert_close(loss.projection.weight.detach(), a, atol=2e-3, rtol=2e-3)


def test_identical_student_embeddings_are_a_clear_error() -> None:
    from kalm_st.losses import ridge_projection

    same = torch.ones(10, 4) / 2  # every text embedded alike (e.g. all cut to the same prompt)
    with pytest.raises(ValueError, match="embeddings of the fitting texts are all the same"):
        ridge_projection(same, torch.randn(10, 3), ridge=0.01)
