"""One instruction per text, the same in training and in every curation command (issue 16 items 1, 2, 3, 7).

End to end with a kalm-st model that carries the KaLM prompt table (``"query"`` is the retrieval instruction), so a
``None`` prompt that falls back to the model's own prompt is visible. The reference is always a hand-written full
text encoded with ``prompt=""`` (nothing added), never the code's own prompt strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from kalm_st.cli import main

RETRIEVAL = "Instruct: Given a query, retrieve documents that answer the query \n Query: "
STS = "Instruct: Retrieve semantically similar text \n Query: "
CLASSIFY = "Instruct: Classify the given text into its category \n Query: "


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def kalm_model_dir(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved kalm-st model: tiny bidirectional Qwen2 + the KaLM prompt table (``"query"`` = retrieval)."""
    from kalm_st import build_model

    model = build_model(tiny_qwen_dir, dtype="float32", device="cpu")
    assert model.prompts["query"] == RETRIEVAL  # the premise of item 2: the model has its own query prompt
    folder = tmp_path_factory.mktemp("kalm-model")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def kalm_model(kalm_model_dir: Path) -> SentenceTransformer:
    return SentenceTransformer(str(kalm_model_dir), device="cpu")


def _cos(model: SentenceTransformer, queries: list[str], docs: list[str]) -> torch.Tensor:
    """Cosine of each (query, doc) pair, both encoded exactly as written (``prompt=""``)."""
    q = model.encode(queries, prompt="", convert_to_tensor=True, normalize_embeddings=True)
    d = model.encode(docs, prompt="", convert_to_tensor=True, normalize_embeddings=True)
    return (q * d).sum(-1).double()


# Float32 cosines (|x| <= 1) of the same texts encoded in other batches (other padding): measured <= 1.8e-7 apart
# (also with the AVX2 kernels); torch.testing.assert_close's float32 tolerances. A wrong prompt moves them >= 0.15.
COS_TOL = {"rtol": 1.3e-6, "atol": 1e-5}
FILTER_TOP_K = 3


ROWS = [
    {"anchor": "How do I reset my card PIN?", "positive": "I was charged twice for the same transaction.",
     "negatives": ["A man is playing a guitar."]},
    {"anchor": "The cat sleeps on the warm windowsill.", "positive": "Two dogs run across a snowy field.",
     "negatives": ["Children are playing football in the park."]},
]  # fmt: skip


def _teacher_score(tmp_path: Path, model_dir: Path, rows: list[dict], *extra: str) -> list[dict]:
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    argv = ["teacher-score", str(source), "-o", str(out), "--model", str(model_dir), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), *extra]  # fmt: skip
    assert main(argv) == 0
    return _read_jsonl(out)


def _expected_scores(model, rows, query_prefix: str, doc_prefix: str) -> torch.Tensor:
    queries = [query_prefix + r["anchor"] for r in rows for _ in range(2)]
    docs = [doc_prefix + t for r in rows for t in (r["positive"], r["negatives"][0])]
    return _cos(model, queries, docs).reshape(len(rows), 2)


# ------------------------------------------------------------------------------------------------------------------
# Item 1: a row's own instruction, once
# ------------------------------------------------------------------------------------------------------------------


def test_row_instruction_once_in_training(tmp_path: Path) -> None:
    """The collated batch of the real trainer: the row's instruction once, the task's for rows without their own."""
    from kalm_st.recipe.build import build_stage
    from kalm_st.recipe.config import load_config

    qa = [
        {"anchor": "how do I x?", "positive": "do y.", "instruction": "Find the answer"},
        {"anchor": "why is z?", "positive": "because w."},
    ]
    sts = [
        {"anchor": "a man plays", "positive": "a guy plays", "instruction": "Find paraphrases"},
        {"anchor": "a dog runs", "positive": "a hound runs"},
    ]
    config_file = tmp_path / "stage.yaml"
    config_file.write_text(
        json.dumps(
            {
                "stage": "pretrain",
                "output_dir": str(tmp_path / "out"),
                "model": {"init_from": "builtin:tiny-qwen2", "dtype": "float32", "max_seq_length": 128},
                "data": {
                    "tasks": {
                        "myqa": {"path": str(_write_jsonl(tmp_path / "qa.jsonl", qa)), "type": "Retrieval"},
                        "my_sts": {"path": str(_write_jsonl(tmp_path / "sts.jsonl", sts)), "type": "STS"},
                    },
                    "num_negatives": 0,
                },
                "loss": {"name": "focal_infonce"},
                "args": {
                    "max_steps": 1,
                    "per_device_train_batch_size": 2,
                    "use_cpu": True,
                    "bf16": False,
                    "report_to": "none",
                    "activation_checkpointing": False,
                },
            }
        ),  # fmt: skip
        encoding="utf8",
    )
    run = build_stage(load_config(config_file))
    tokenizer = run.model.tokenizer
    seen: dict[str, set[str]] = {"anchor": set(), "positive": set()}
    for batch in run.trainer.get_train_dataloader():
        for column in seen:
            ids = batch[f"{column}_input_ids"]
            seen[column].update(tokenizer.batch_decode(ids, skip_special_tokens=True))
    assert seen["anchor"] == {
        "Instruct: Find the answer \n Query: how do I x?",
        RETRIEVAL + "why is z?",
        "Instruct: Find paraphrases \n Query: a man plays",
        STS + "a dog runs",
    }
    # Symmetric task: the row's instruction on both sides; retrieval: documents as written.
    assert seen["positive"] == {
        "do y.",
        "because w.",
        "Instruct: Find paraphrases \n Query: a guy plays",
        STS + "a hound runs",
    }


def test_row_instruction_once_in_curation(tmp_path: Path, kalm_model_dir: Path, kalm_model) -> None:
    rows = [{**ROWS[0], "instruction": "Find the answer"}, ROWS[1]]
    out = _teacher_score(tmp_path, kalm_model_dir, rows)
    expected = torch.stack(
        [
            _expected_scores(kalm_model, rows[:1], "Instruct: Find the answer \n Query: ", "")[0],
            _expected_scores(kalm_model, rows[1:], RETRIEVAL, "")[0],
        ]
    )
    torch.testing.assert_close(torch.tensor([r["label"] for r in out], dtype=torch.float64), expected, **COS_TOL)
    # the written anchor carries the instruction once, so training the output adds nothing
    assert out[0]["anchor"] == "Instruct: Find the answer \n Query: How do I reset my card PIN?"


# ------------------------------------------------------------------------------------------------------------------
# Item 2: --no-instructions encodes the texts exactly as written
# ------------------------------------------------------------------------------------------------------------------


def test_no_instructions_teacher_score(tmp_path: Path, kalm_model_dir: Path, kalm_model) -> None:
    out = _teacher_score(tmp_path, kalm_model_dir, ROWS, "--no-instructions")
    expected = _expected_scores(kalm_model, ROWS, "", "")
    torch.testing.assert_close(torch.tensor([r["label"] for r in out], dtype=torch.float64), expected, **COS_TOL)


def _mine_rows() -> list[dict]:
    from kalm_st.testing import TINY_TEXTS

    texts = list(TINY_TEXTS)
    return [{"anchor": texts[i], "positive": texts[(i + 1) % len(texts)]} for i in range(len(texts))]


def _mine(tmp_path: Path, model_dir: Path, rows: list[dict], *extra: str) -> list[dict]:
    source = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "mined.jsonl"
    argv = ["mine", str(source), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--range-min", "0",
            "--range-max", "4", "--num-negatives", "2", "--scores", *extra]  # fmt: skip
    assert main(argv) == 0
    return _read_jsonl(out)


def test_no_instructions_mine(tmp_path: Path, kalm_model_dir: Path, kalm_model) -> None:
    out = _mine(tmp_path, kalm_model_dir, _mine_rows(), "--no-instructions")
    assert out
    queries = [r["anchor"] for r in out for _ in range(3)]
    docs = [r[c] for r in out for c in ("positive", "negative_1", "negative_2")]
    expected = _cos(kalm_model, queries, docs).reshape(len(out), 3)
    torch.testing.assert_close(torch.tensor([r["label"] for r in out], dtype=torch.float64), expected, **COS_TOL)


# ------------------------------------------------------------------------------------------------------------------
# Item 3: curation uses training's instructions, given the task type
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_type", "prefix"), [("STS", STS), ("Classification", CLASSIFY)], ids=["STS", "Classification"]
)
def test_curation_instructs_like_training(tmp_path, kalm_model_dir, kalm_model, task_type, prefix) -> None:
    """STS: both sides; Classification: every column; as ``build_training_prompts`` does for training."""
    rows = [{**r, "task": "my_task"} for r in ROWS]
    out = _teacher_score(tmp_path, kalm_model_dir, rows, "--task-type", f"my_task={task_type}")
    expected = _expected_scores(kalm_model, ROWS, prefix, prefix)
    torch.testing.assert_close(torch.tensor([r["label"] for r in out], dtype=torch.float64), expected, **COS_TOL)

    from kalm_st.data import build_training_prompts, load_training_data

    # the same prefixes reach the trainer for this task and type
    data = load_training_data(_write_jsonl(tmp_path / "again.jsonl", rows))
    assert build_training_prompts(data, {"my_task": task_type})["my_task"] == {
        "anchor": prefix,
        "positive": prefix,
        "negative_1": prefix,
    }


def test_mine_instructs_like_training(tmp_path: Path, kalm_model_dir: Path, kalm_model) -> None:
    rows = [{**r, "task": "my_sts"} for r in _mine_rows()]
    out = _mine(tmp_path, kalm_model_dir, rows, "--task-type", "my_sts=STS")
    assert out
    queries = [STS + r["anchor"] for r in out for _ in range(3)]
    docs = [STS + r[c] for r in out for c in ("positive", "negative_1", "negative_2")]
    expected = _cos(kalm_model, queries, docs).reshape(len(out), 3)
    torch.testing.assert_close(torch.tensor([r["label"] for r in out], dtype=torch.float64), expected, **COS_TOL)


def _filter_rows() -> list[dict]:
    from kalm_st.testing import TINY_TEXTS

    texts = list(TINY_TEXTS)
    n = len(texts)
    return [{"anchor": texts[i], "positive": texts[(i + 1) % n], "negatives": [texts[(i + 3) % n]]} for i in range(n)]


def _kept_by_reference(model, rows: list[dict], query_prefix: str, doc_prefix: str, top_k: int) -> set[tuple]:
    """Rows whose positive is in the anchor's top ``top_k`` of all positive/negative texts (the anchor's own text
    and its other positives excluded), from texts encoded as written; also the smallest score gap to the cut."""
    corpus = sorted({t for r in rows for t in (r["positive"], *r["negatives"])})
    q = model.encode([query_prefix + r["anchor"] for r in rows], prompt="", convert_to_tensor=True,
                     normalize_embeddings=True)  # fmt: skip
    d = model.encode([doc_prefix + t for t in corpus], prompt="", convert_to_tensor=True, normalize_embeddings=True)
    scores = (q @ d.T).double()
    kept, gaps = set(), []
    for i, r in enumerate(rows):
        others = [j for j, t in enumerate(corpus) if t not in (r["anchor"], r["positive"])]
        positive = scores[i, corpus.index(r["positive"])]
        rank = int((scores[i, others] > positive).sum())
        gaps.append(float((scores[i, others] - positive).abs().min()))
        if rank < top_k:
            kept.add((r["anchor"], r["positive"]))
    return kept, min(gaps)


def test_filter_instructs_like_training(tmp_path: Path, kalm_model_dir: Path, kalm_model) -> None:
    """Which rows ``filter`` keeps follows the ranks under the STS instruction on both sides."""
    rows = [{**r, "task": "my_sts"} for r in _filter_rows()]
    top_k = FILTER_TOP_K
    source = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "kept.jsonl"
    argv = ["filter", str(source), "-o", str(out), "--model", str(kalm_model_dir), "--device", "cpu",
            "--top-k", str(top_k), "--task-type", "my_sts=STS"]  # fmt: skip
    assert main(argv) == 0
    kept = {(r["anchor"], r["positive"]) for r in _read_jsonl(out)}
    expected, gap = _kept_by_reference(kalm_model, rows, STS, STS, top_k)
    assert gap > 1e-4  # no near-tie at any cut: float noise cannot flip a rank
    # the data tells the prompts apart: other instructions would keep other rows
    assert expected != _kept_by_reference(kalm_model, rows, RETRIEVAL, "", top_k)[0]
    assert expected != _kept_by_reference(kalm_model, rows, "", "", top_k)[0]
    assert kept == expected


def test_task_type_must_be_known(tmp_path: Path, kalm_model_dir: Path, capsys) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", [{**r, "task": "my_task"} for r in ROWS])
    argv = ["teacher-score", str(source), "-o", str(tmp_path / "o.jsonl"), "--model", str(kalm_model_dir),
            "--device", "cpu", "--task-type", "my_task=Sts"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Sts" in err and "STS" in err and "Retrieval" in err


# ------------------------------------------------------------------------------------------------------------------
# Item 7: a cross-encoder teacher refuses prompts
# ------------------------------------------------------------------------------------------------------------------


def test_cross_encoder_teacher_refuses_prompts(minilm_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from sentence_transformers import CrossEncoder

    from kalm_st.data import score_with_teacher

    teacher = CrossEncoder(str(minilm_dir), num_labels=1, device="cpu")  # random head: any cross-encoder works
    data = Dataset.from_dict({"anchor": ["q", "r"], "positive": ["p", "s"], "negative_1": ["n", "t"]})
    with pytest.raises(ValueError, match="CrossEncoder teacher takes no prompts"):
        score_with_teacher(data, teacher, query_prompt=RETRIEVAL)
    with pytest.raises(ValueError, match="CrossEncoder teacher takes no prompts"):
        score_with_teacher(data, teacher, document_prompt=STS)
    # no prompt (None or "") is one cache entry: prompts are not part of a cross-encoder's key
    cache = tmp_path / "cache"
    first = score_with_teacher(data, teacher, cache_dir=cache, show_progress_bar=False)
    again = score_with_teacher(data, teacher, query_prompt="", document_prompt="", cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1
    assert again["label"] == first["label"]


def test_task_type_of_a_missing_task_is_an_error(tmp_path: Path, kalm_model_dir: Path, capsys) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", [{**r, "task": "my_task"} for r in ROWS])
    argv = ["mine", str(source), "-o", str(tmp_path / "o.jsonl"), "--model", str(kalm_model_dir), "--device", "cpu",
            "--task-type", "my_tsak=STS"]  # fmt: skip
    assert main(argv) == 2
    assert "my_tsak" in capsys.readouterr().err


def test_document_columns_needing_different_prompts_are_an_error() -> None:
    from datasets import Dataset

    from kalm_st.instructions import encoding_prompts

    data = Dataset.from_dict({"anchor": ["a"], "positive": [STS + "p"], "negative_1": ["n"]})
    with pytest.raises(ValueError, match="task 'my_sts': the document columns need different prompts"):
        encoding_prompts(data, "my_sts", "STS")
    assert encoding_prompts(data, "my_sts", "STS", instructions=False) == ("", "")
