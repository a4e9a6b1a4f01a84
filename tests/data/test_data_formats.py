"""Training-data format: reading jsonl/csv/parquet, normalisation to ST's layout, validation errors, prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from kalm_st.data import (
    DataValidationError,
    build_training_prompts,
    load_training_data,
    validate_training_data,
    write_training_data,
)
from kalm_st.instructions import training_prompt


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf8")
    return path


ROWS = [
    {"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}a", f"n{i}b"], "task": "A" if i < 4 else "B"}
    for i in range(8)
]


def test_jsonl_list_negatives_split_by_task(tmp_path: Path) -> None:
    data = load_training_data(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert isinstance(data, DatasetDict) and list(data) == ["A", "B"]
    assert data["A"].column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert data["B"][0] == {"anchor": "q4", "positive": "p4", "negative_1": "n4a", "negative_2": "n4b"}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_numbered_negative_columns_and_scores_all_formats(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame(
        {
            "anchor": ["a0", "a1"],
            "positive": ["p0", "p1"],
            "negative_2": ["y0", "y1"],  # out of order on purpose: output is negative_1, negative_2
            "negative_1": ["x0", "x1"],
            "teacher_scores": [[0.9, 0.2, 0.1], [0.8, 0.3, 0.0]],
        }
    )
    path = tmp_path / f"mytask{suffix}"
    if suffix == ".csv":
        frame["teacher_scores"] = frame["teacher_scores"].map(json.dumps)
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    data = load_training_data(path)
    assert list(data) == ["mytask"]  # task from the file stem
    ds = data["mytask"]
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2", "label"]
    assert ds["negative_1"] == ["x0", "x1"]
    assert ds[1]["label"] == pytest.approx([0.8, 0.3, 0.0])


RETRIEVAL_PROMPT = "Instruct: Given a query, retrieve documents that answer the query \n Query: "
STS_PROMPT = "Instruct: Retrieve semantically similar text \n Query: "


def test_per_row_instruction_written_once(tmp_path: Path) -> None:
    """A task with row instructions: each row's own, else the task's, written into the texts the task instructs."""
    rows = [
        {"anchor": "how?", "positive": "so.", "instruction": "Find the answer"},
        {"anchor": "why?", "positive": "because."},
        {"anchor": "Instruct: Mine \n Query: what?", "positive": "that.", "instruction": "Find the answer"},
    ]
    ds = load_training_data(_write_jsonl(tmp_path / "t.jsonl", rows))["t"]
    assert list(ds["anchor"]) == [
        "Instruct: Find the answer \n Query: how?",
        RETRIEVAL_PROMPT + "why?",  # no own instruction: the task's (unknown task: the retrieval default)
        "Instruct: Mine \n Query: what?",  # already instructed: kept as written
    ]
    assert list(ds["positive"]) == ["so.", "because.", "that."]  # retrieval documents: as written
    assert build_training_prompts(DatasetDict({"t": ds}), {"t": "Retrieval"}) == {"t": {}}  # nothing added again


def test_per_row_instruction_on_both_sides_of_a_symmetric_task(tmp_path: Path) -> None:
    rows = [
        {"anchor": "a", "positive": "b", "negatives": ["c"], "instruction": "  Find paraphrases "},
        {"anchor": "d", "positive": "e", "negatives": ["f"], "instruction": ""},
    ]
    ds = load_training_data(_write_jsonl(tmp_path / "my_sts.jsonl", rows), task_types={"my_sts": "STS"})["my_sts"]
    mine = "Instruct: Find paraphrases \n Query: "
    assert ds.to_list() == [
        {"anchor": mine + "a", "positive": mine + "b", "negative_1": mine + "c"},
        {"anchor": STS_PROMPT + "d", "positive": STS_PROMPT + "e", "negative_1": STS_PROMPT + "f"},
    ]
    assert build_training_prompts(DatasetDict({"my_sts": ds}), {"my_sts": "STS"}) == {"my_sts": {}}


def test_row_instructions_off_keeps_texts_as_written(tmp_path: Path) -> None:
    rows = [{"anchor": "how?", "positive": "so.", "instruction": "Find the answer"}]
    ds = load_training_data(_write_jsonl(tmp_path / "t.jsonl", rows), row_instructions=False)["t"]
    assert ds.to_list() == [{"anchor": "how?", "positive": "so."}]


def test_row_instructions_in_one_file_of_a_task(tmp_path: Path) -> None:
    """Two files of one task, only one with row instructions: the other file's rows get the task's instruction."""
    first = _write_jsonl(tmp_path / "a.jsonl", [{"anchor": "q1", "positive": "p1", "task": "T", "instruction": "X"}])
    second = _write_jsonl(tmp_path / "b.jsonl", [{"anchor": "q2", "positive": "p2", "task": "T"}])
    ds = load_training_data([first, second], task_types={"T": "STS"})["T"]
    assert list(ds["anchor"]) == ["Instruct: X \n Query: q1", STS_PROMPT + "q2"]
    assert list(ds["positive"]) == ["Instruct: X \n Query: p1", STS_PROMPT + "p2"]


def test_partly_instructed_column_is_an_error() -> None:
    data = DatasetDict(
        {"myqa": Dataset.from_dict({"anchor": ["Instruct: X \n Query: a", "b"], "positive": ["p", "q"]})}
    )
    with pytest.raises(ValueError, match=r"task 'myqa': column 'anchor': 1 of 2 texts .* \(e\.g\. row 1\)"):
        build_training_prompts(data)


def test_unknown_task_type_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task type 'Sts'.*STS"):
        build_training_prompts(["t"], {"t": "Sts"})
    path = _write_jsonl(tmp_path / "t.jsonl", [{"anchor": "a", "positive": "p", "instruction": "X"}])
    with pytest.raises(DataValidationError, match="unknown task type 'Sts'"):
        load_training_data(path, task_types={"t": "Sts"})


def test_round_trip_write_and_load(tmp_path: Path) -> None:
    data = load_training_data(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    for suffix in (".jsonl", ".parquet", ".csv"):
        again = load_training_data(write_training_data(data, tmp_path / f"out{suffix}"))
        assert list(again) == list(data)
        for task in data:
            assert again[task].to_list() == data[task].to_list()


def _errors(tmp_path: Path, rows: list[dict], **kwargs) -> list[str]:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataValidationError) as info:
        load_training_data(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value.problems


def test_missing_column(tmp_path: Path) -> None:
    problems = _errors(tmp_path, [{"query": "q", "pos": "p"}])
    assert any("missing column 'positive'" in p for p in problems)
    problems = _errors(tmp_path, [{"text": "q", "positive": "p"}])
    assert any("missing column" in p and "anchor" in p for p in problems)


def test_empty_positive_names_row_and_column(tmp_path: Path) -> None:
    rows = [{"anchor": "a", "positive": "p"}, {"anchor": "b", "positive": "  "}, {"anchor": "c", "positive": None}]
    problems = _errors(tmp_path, rows)
    assert len(problems) == 2
    assert "line 2: column 'positive'" in problems[0] and "line 3: column 'positive'" in problems[1]


def test_negatives_required(tmp_path: Path) -> None:
    problems = _errors(tmp_path, [{"anchor": "a", "positive": "p"}], require_negatives=True)
    assert "negatives are required" in problems[0]
    # one policy for every layout: a row without negatives in a task with negatives is dropped (logged)
    rows = [{"anchor": "a", "positive": "p", "negatives": ["n"]}, {"anchor": "b", "positive": "q", "negatives": []}]
    data = load_training_data(_write_jsonl(tmp_path / "some.jsonl", rows), require_negatives=True)
    assert data["some"].to_list() == [{"anchor": "a", "positive": "p", "negative_1": "n"}]


def test_ragged_negatives(tmp_path: Path) -> None:
    """Ragged rows are read as in the KaLM layout: a row with fewer negatives than the task's longest gets seeded
    draws from its own (``ragged_negatives: resample``) or is dropped (``drop``)."""
    rows = [
        {"anchor": "a", "positive": "p", "negatives": ["n1", "n2"]},
        {"anchor": "b", "positive": "q", "negatives": ["m1"]},
    ]
    path = _write_jsonl(tmp_path / "ragged.jsonl", rows)
    data = load_training_data(path)["ragged"]
    assert data.to_list() == [
        {"anchor": "a", "positive": "p", "negative_1": "n1", "negative_2": "n2"},
        {"anchor": "b", "positive": "q", "negative_1": "m1", "negative_2": "m1"},  # its only one, drawn again
    ]
    assert load_training_data(path, ragged_negatives="drop")["ragged"]["anchor"] == ["a"]
    data = load_training_data(path, num_negatives=1)["ragged"]  # the first n of each row
    assert data.column_names == ["anchor", "positive", "negative_1"] and data["negative_1"] == ["n1", "m1"]


def test_bad_teacher_scores(tmp_path: Path) -> None:
    rows = [
        {"anchor": "a", "positive": "p", "negatives": ["n"], "label": [0.5, 0.1]},
        {"anchor": "b", "positive": "q", "negatives": ["n"], "label": [0.5, math.nan]},
        {"anchor": "c", "positive": "r", "negatives": ["n"], "label": [0.5]},
    ]
    path = tmp_path / "bad.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)  # writes NaN as null
    with pytest.raises(DataValidationError) as info:
        load_training_data(path)
    problems = info.value.problems
    assert len(problems) == 2
    assert "line 2: column 'label'" in problems[0] and "NaN" in problems[0]
    assert "line 3: column 'label'" in problems[1] and "2 numbers" in problems[1]


def test_task_smaller_than_batch(tmp_path: Path) -> None:
    problems = _errors(tmp_path, ROWS, batch_size=5)
    assert len(problems) == 2 and "task 'A'" in problems[0] and "fewer than one batch of 5" in problems[0]


def test_missing_file_and_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_training_data(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported format"):
        load_training_data(tmp_path / "x.txt")


def test_validate_in_memory() -> None:
    ds = Dataset.from_dict({"anchor": ["a", "b"], "positive": ["p", ""]})
    with pytest.raises(DataValidationError, match=r"mined\[T\]: row 2: column 'positive'"):
        validate_training_data(DatasetDict({"T": ds}), source="mined")


def test_build_training_prompts() -> None:
    data = DatasetDict(
        {
            "TrecQARetrieval": Dataset.from_dict({"anchor": ["q"], "positive": ["p"], "negative_1": ["n"]}),
            "STSBenchmark": Dataset.from_dict({"anchor": ["q"], "positive": ["p"]}),
            "Banking77Classification": Dataset.from_dict({"anchor": ["q"], "positive": ["p"], "negative_1": ["n"]}),
        }
    )
    prompts = build_training_prompts(data, task_types={"Banking77Classification": "Classification"})
    assert prompts["TrecQARetrieval"] == {"anchor": RETRIEVAL_PROMPT}  # documents get no prompt
    assert prompts["STSBenchmark"] == {"anchor": STS_PROMPT, "positive": STS_PROMPT}
    bank = "Instruct: Given an online banking query, find the corresponding intents \n Query: "
    assert prompts["Banking77Classification"] == {"anchor": bank, "positive": bank, "negative_1": bank}
    assert training_prompt("Banking77Classification", "Classification") == (bank, bank)
