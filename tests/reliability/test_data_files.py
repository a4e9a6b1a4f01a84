"""Bad training files: each is reported with the file (and row and column where there is one), never a traceback
from inside ``datasets``/``pyarrow``, never silently dropped data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from kalm_st.data import DataValidationError, load_training_data


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf8")
    return path


def _problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(DataValidationError) as info:
        load_training_data(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value.problems


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"^Training data file not found: {tmp_path / 'nope.jsonl'}$"):
        load_training_data(tmp_path / "nope.jsonl")


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(IsADirectoryError, match=f"Training data path {tmp_path / 'data.jsonl'} is a directory"):
        load_training_data(tmp_path / "data.jsonl")


def test_wrong_extension(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("anchor\tpositive\n")
    with pytest.raises(ValueError, match=r"x\.txt: unsupported format '\.txt'; use one of \['\.csv', '\.json'"):
        load_training_data(tmp_path / "x.txt")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert _problems(path) == [f"{path}: the file is empty (0 bytes)"]


@pytest.mark.parametrize(
    ("name", "text"),
    [("header.csv", "anchor,positive\n"), ("blank.jsonl", "\n\n  \n")],
    ids=["header-only-csv", "blank-lines-jsonl"],
)
def test_file_without_rows(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert _problems(path) == [f"{path}: no rows (the file holds no records)"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.jsonl", b'{"anchor": "a", "positive": "p"}\n{"anchor": "b", "positive": \n', "in row 1"),
        ("latin1.csv", "anchor,positive\ncaf\xe9,p\n".encode("latin-1"), "'utf-8' codec can't decode byte 0xe9"),
        ("binary.jsonl", b"\x00\xff\xfe\x89PNG\r\n", "'utf-8' codec can't decode byte 0xff"),
        ("garbage.parquet", b"not a parquet file", "Parquet magic bytes not found"),
        ("ragged.csv", b"anchor,positive\na,p\nb,q,extra\n", "Expected 2 fields in line 3, saw 3"),
    ],
    ids=["invalid-json", "not-utf8-csv", "binary-jsonl", "garbage-parquet", "ragged-csv-row"],
)
def test_unreadable_file(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: cannot be read as ")
    assert reason in problems[0]


def test_missing_column_names_what_is_there(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"anchor": "a", "pos": "p"}])
    assert _problems(path) == [f"{path}: missing column 'positive' (have ['anchor', 'pos'])"]


@pytest.mark.parametrize(
    ("column", "meant"),
    [
        ("negativs", "negatives"),
        ("postive", "positive"),
        ("instrution", "instruction"),
        ("teacher_score", "teacher_scores"),
    ],
)
def test_misspelled_column_is_an_error(tmp_path: Path, column: str, meant: str) -> None:
    row = {"anchor": "a", "positive": "p", column: "x"}
    if meant == "positive":
        row = {"anchor": "a", column: "p"}
    path = _jsonl(tmp_path / "d.jsonl", [row])
    problems = _problems(path)
    assert f"{path}: column {column!r} is not a column kalm-st reads; did you mean {meant!r}?" in problems[0]


def test_extra_columns_are_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"id": 1, "anchor": "a", "positive": "p", "source": "web"}])
    with caplog.at_level(logging.WARNING, logger="kalm_st"):
        data = load_training_data(path)
    assert data["d"].column_names == ["anchor", "positive"]
    assert f"{path}: ignoring column(s) ['id', 'source']" in caplog.text


def test_rows_missing_a_key(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"anchor": "a", "positive": "p"}, {"anchor": "b"}])
    assert _problems(path) == [f"{path}: line 2: column 'positive': empty or not a string (None)"]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"anchor": "a", "positive": 3}, "line 1: column 'positive': empty or not a string (3)"),
        ({"anchor": True, "positive": "p"}, "line 1: column 'anchor': empty or not a string (True)"),
        ({"anchor": "a", "positive": ["p"]}, "line 1: column 'positive': empty or not a string (['p'])"),
        (
            {"anchor": "a", "positive": "p", "negatives": ["n", 4]},
            "line 1: column 'negatives': negative 2 is empty or not a string",
        ),
        ({"anchor": "a", "positive": "\t "}, "line 1: column 'positive': empty or not a string ('\\t ')"),
        (
            {"anchor": "a", "positive": "p", "negatives": ["n", ""]},
            "line 1: column 'negatives': negative 2 is empty or not a string",
        ),
    ],
    ids=["int-positive", "bool-anchor", "list-positive", "int-negative", "blank-positive", "empty-negative"],
)
def test_non_string_or_empty_cells(tmp_path: Path, row: dict, problem: str) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [row])
    assert _problems(path) == [f"{path}: {problem}"]


def test_csv_numbers_are_not_texts(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("anchor,positive\na,1\nb,2\n")
    assert _problems(path) == [
        f"{path}: line 2: column 'positive': empty or not a string (1)",  # line 1 is the header
        f"{path}: line 3: column 'positive': empty or not a string (2)",
    ]


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        ("[1.0, Infinity]", "column 'label': NaN, infinite or non-numeric score in [1.0, inf]"),
        ("[1.0, NaN]", "column 'label': NaN, infinite or non-numeric score in [1.0, nan]"),
        ('[1.0, "high"]', "column 'label': NaN, infinite or non-numeric score in [1.0, 'high']"),
        ("[1.0, 0.2, 0.1]", "column 'label': ragged teacher scores: 3 values for 2 texts"),
        ("0.5", "column 'label': teacher scores must be a list of 2 numbers (positive + 1 negatives), got 0.5"),
    ],
    ids=["inf", "nan", "string", "too-many", "scalar"],
)
def test_bad_teacher_scores(tmp_path: Path, label: str, problem: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"anchor": "a", "positive": "p", "negatives": ["n"], "label": {label}}}\n')
    assert _problems(path) == [f"{path}: line 1: {problem}"]


def test_infinite_teacher_score_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    frame = pd.DataFrame({"anchor": ["a"], "positive": ["p"], "negatives": [["n"]], "label": [[1.0, float("inf")]]})
    frame.to_parquet(path)
    assert _problems(path) == [f"{path}: row 1: column 'label': NaN, infinite or non-numeric score in [1.0, inf]"]


def test_ragged_teacher_scores_across_rows(tmp_path: Path) -> None:
    rows = [
        {"anchor": "a", "positive": "p", "negatives": ["n", "m"], "label": [1.0, 0.5, 0.1]},
        {"anchor": "b", "positive": "q", "negatives": ["n", "m"], "label": [1.0, 0.5]},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    assert _problems(path) == [
        f"{path}: line 2: column 'label': teacher scores must be a list of 3 numbers (positive + 2 negatives), "
        "got [1.0, 0.5]"
    ]


def test_duplicate_rows_are_reported(tmp_path: Path, caplog) -> None:
    rows = [{"anchor": "a", "positive": "p"}, {"anchor": "b", "positive": "q"}] * 2 + [
        {"anchor": "a", "positive": "x"}
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="kalm_st"):
        data = load_training_data(path)
    assert len(data["d"]) == 5  # kept as given: deduplicating is the curation step's job
    assert f"{path}: task 'd': 2 row(s) repeat an earlier (anchor, positive) pair (e.g. anchor 'a')" in caplog.text
