"""teacher-embed: the cache equals a direct encode, resumes by chunks, re-embeds changed texts and a new teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer

from kalm_st.cli import main
from kalm_st.data.teacher_embeddings import attach_teacher_embeddings, embed_texts, load_cache

ROWS = {
    "anchor": ["a dog runs", "a cat sleeps", "a dog runs"],
    "positive": ["the dog is running", "the cat naps", "a hound sprints"],
    "negative_1": ["a cat sleeps", "stocks fell", "bread is baked"],
}


class CountingModel:
    """A SentenceTransformer whose encode calls are counted (the real model, not a mock of its maths)."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, texts, **kwargs):
        self.encoded += len(texts)
        return self.model.encode(texts, **kwargs)


@pytest.fixture(scope="module")
def teacher(minilm_dir) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_dir), device="cpu")


def test_cache_matches_direct_encoding_resumes_and_rekeys(teacher, tmp_path) -> None:
    texts = [t for column in ROWS.values() for t in column]
    distinct = sorted(set(texts))
    counting = CountingModel(teacher)
    embed_texts(texts, counting, tmp_path, teacher_name="minilm", chunk_size=3, max_chunks=2)  # "killed" after 2
    assert counting.encoded == 6
    rows = embed_texts(texts, counting, tmp_path, teacher_name="minilm", chunk_size=3)  # resumes: the rest only
    assert counting.encoded == len(distinct)
    _, embeddings, filled = load_cache(tmp_path)
    assert filled.all() and embeddings.shape == (len(distinct), 384)
    direct = teacher.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(embeddings[rows], direct, rtol=1e-4, atol=1e-5)  # batch composition changes padding
    # A changed text is embedded anew, the others are reused.
    changed = [t if t != "stocks fell" else "stocks rose" for t in texts]
    embed_texts(changed, counting, tmp_path, teacher_name="minilm", chunk_size=3)
    assert counting.encoded == len(distinct) + 1
    # Another teacher (same architecture, other weights) re-embeds everything.
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    try:
        embed_texts(changed, counting, tmp_path, teacher_name="minilm", chunk_size=3)
    finally:
        with torch.no_grad():
            next(teacher.parameters()).sub_(0.01)
    assert counting.encoded == 2 * len(distinct) + 1


def test_attach_and_cli_write_the_label_column(teacher, minilm_dir, tmp_path) -> None:
    dataset = Dataset.from_dict(ROWS)
    columns = list(ROWS)
    embed_texts([t for c in columns for t in dataset[c]], teacher, tmp_path / "cache", teacher_name="m")
    with_labels = attach_teacher_embeddings(dataset, tmp_path / "cache", columns)
    label = np.asarray(with_labels["label"], dtype=np.float32)
    assert label.shape == (3, 3, 384)
    np.testing.assert_allclose(label[1, 2], teacher.encode("stocks fell"), rtol=1e-4, atol=1e-5)
    from kalm_st.data import validate_training_data

    validated = validate_training_data(with_labels, require_negatives=True)["default"]  # in memory: fixed-size lists
    np.testing.assert_array_equal(np.asarray(validated["label"], dtype=np.float32), label)
    with pytest.raises(ValueError, match=r"column 'positive', row 0"):
        attach_teacher_embeddings(
            Dataset.from_dict({**ROWS, "positive": ["new", "x", "y"]}), tmp_path / "cache", columns
        )
    # The command, on a file.
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "".join(json.dumps(dict(zip(ROWS, values, strict=True))) + "\n" for values in zip(*ROWS.values(), strict=True))
    )
    out = tmp_path / "out.parquet"
    argv = [
        "teacher-embed",
        str(source),
        "-o",
        str(out),
        "--model",
        str(minilm_dir),
        "--cache-dir",
        str(tmp_path / "c2"),
        "--no-instructions",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    written = Dataset.from_parquet(str(out))
    np.testing.assert_allclose(np.asarray(written["label"][0], dtype=np.float32), label[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_a_teacher_embed_file_validates_and_trains_a_stage(minilm_dir, tmp_path, suffix) -> None:
    """The (2 + n, d) label that teacher-embed writes passes load_training_data and trains embedding_distillation."""
    from kalm_st.data import load_training_data
    from kalm_st.recipe.build import run_stage
    from kalm_st.recipe.config import load_config
    from tests.recipe.conftest import CONFIG_DIR, write_rows

    rows = write_rows(tmp_path / "STSBenchmark.jsonl", num_rows=8, num_negatives=3, with_label=False)  # task name
    out = tmp_path / f"embedded{suffix}"
    argv = ["teacher-embed", str(rows), "-o", str(out), "--model", str(minilm_dir)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--no-instructions", "--device", "cpu"]
    assert main(argv) == 0
    data = load_training_data(out, require_negatives=True)
    (task,) = data
    assert data[task].column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "label"]
    label = np.asarray(data[task]["label"], dtype=np.float32)
    assert label.shape == (8, 5, 384)
    # The independent reference: the teacher's own encoding of row 2's third negative.
    teacher = SentenceTransformer(str(minilm_dir), device="cpu")
    np.testing.assert_allclose(label[2, 4], teacher.encode(data[task][2]["negative_3"]), rtol=1e-4, atol=1e-5)
    # One negative fewer: the embeddings are cut to (2 + 2, d) with the negatives.
    fewer = load_training_data(out, require_negatives=True, num_negatives=2)
    assert np.asarray(fewer[task]["label"]).shape == (8, 4, 384)
    # A stage trains on the file with embedding distillation (teacher_dim 384) over focal InfoNCE.
    overrides = [
        f"output_dir={tmp_path / 'stage'}",
        f"data.tasks.STSBenchmark.path={out}",
        "loss.name=embedding_distillation",
        "loss.kwargs={teacher_dim: 384, weight: 0.5}",
        "loss.base={name: focal_infonce, kwargs: {temperature: 0.05}}",
        "args.max_steps=2",
        "args.per_device_train_batch_size=4",
        "args.save_strategy=no",
    ]
    final = run_stage(load_config(CONFIG_DIR / "tiny_smoke.yaml", overrides))
    assert (final / "modules.json").is_file()


def test_bad_teacher_embeddings_in_a_file_are_named(tmp_path) -> None:
    from kalm_st.data import DataValidationError, load_training_data

    good = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    records = [
        {"anchor": "a", "positive": "b", "negative_1": "c", "label": good},
        {"anchor": "d", "positive": "e", "negative_1": "f", "label": [[0.1, 0.2], [0.3, 0.4]]},  # 2 texts, not 3
        {"anchor": "g", "positive": "h", "negative_1": "i", "label": [[0.1, 0.2], [0.3], [0.5, 0.6]]},  # ragged
        {"anchor": "j", "positive": "k", "negative_1": "l", "label": [[0.1, float("nan")], [0.3, 0.4], [0.5, 0.6]]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataValidationError) as info:
        load_training_data(path)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert "line 2: column 'label'" in problems[0] and "3" in problems[0]
    assert "line 3: column 'label'" in problems[1]
    assert "line 4: column 'label'" in problems[2] and "NaN" in problems[2]


def test_the_teacher_embed_recipe_step_embeds_every_task_in_one_cache(minilm_dir, tmp_path) -> None:
    """``kind: teacher-embed``: the (2 + n, d) label of each row is the teacher's own encoding of its texts, for
    every task of the step, from one cache; a rerun of the step embeds nothing."""
    import pyarrow.parquet as pq

    from kalm_st.recipe.recipe import load_recipe
    from kalm_st.recipe.runner import run_recipe
    from tests.recipe.conftest import write_rows

    sts = write_rows(tmp_path / "STSBenchmark.jsonl", num_rows=6, num_negatives=2, with_label=False)
    trec = write_rows(tmp_path / "TrecQA.jsonl", num_rows=4, num_negatives=2, with_label=False)
    recipe = tmp_path / "embed.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        "steps:\n"
        f"  - {{name: embed, kind: teacher-embed, teacher: '{minilm_dir}', data: ['{sts}', '{trec}'],\n"
        "     instructions: false, chunk_size: 5}\n"
    )
    run_recipe(load_recipe(recipe))
    table = pq.read_table(tmp_path / "run" / "embed" / "data.parquet").to_pydict()
    assert sorted(set(table["task"])) == ["STSBenchmark", "TrecQA"]
    teacher = SentenceTransformer(str(minilm_dir), device="cpu")
    for i in (0, 7):  # a row of each task: anchor, positive, negative_2 against a direct encode
        label = np.asarray(table["label"][i], dtype=np.float32)
        assert label.shape == (4, 384)
        for k, column in ((0, "anchor"), (1, "positive"), (3, "negative_2")):
            np.testing.assert_allclose(label[k], teacher.encode(table[column][i]), rtol=1e-4, atol=1e-5)
    keys, _, filled = load_cache(tmp_path / "run" / "embed" / "cache")
    texts = {t for column in ("anchor", "positive", "negative_1", "negative_2") for t in table[column]}
    assert len(keys) == len(texts) and filled.all()  # one cache holding both tasks' texts
