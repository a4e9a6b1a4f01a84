"""Issue 22: one reader for every layout, no Python object per row, one policy; the bugs of the two old readers."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_st.data import DataValidationError, load_training_data
from kalm_st.instructions import KALM_INSTRUCTION_TEMPLATE

N = 10_000


def _fail(*_args, **_kwargs):
    raise AssertionError("a row was materialised as a Python object on the data path")


@pytest.fixture
def no_python_rows(monkeypatch):
    """Fail on any way ``datasets`` hands out rows as Python objects (Arrow-formatted access stays allowed)."""
    for name in ("__iter__", "to_list", "to_dict", "to_pandas", "from_dict", "from_list"):
        monkeypatch.setattr(datasets.Dataset, name, _fail)
    getitem, iterate = datasets.Dataset.__getitem__, datasets.Dataset.iter

    def arrow_only(method):
        def wrapped(self, *args, **kwargs):
            if self.format["type"] != "arrow":
                _fail()
            return method(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(datasets.Dataset, "__getitem__", arrow_only(getitem))
    monkeypatch.setattr(datasets.Dataset, "iter", arrow_only(iterate))


def _negatives(i: int, k: int) -> list[str]:
    return [f"n{i}_{j}" for j in range(k)]


def _variant(name: str) -> tuple[dict, dict]:
    """``(columns of N rows, load_training_data options)`` of each variant of the benchmark."""
    rows = range(N)
    base = {"anchor": [f"q{i}" for i in rows], "positive": [f"p{i}" for i in rows]}
    if name == "plain":
        return {**base, "negatives": [_negatives(i, 3) for i in rows]}, {}
    if name == "instruction":
        return {**base, "negatives": [_negatives(i, 3) for i in rows], "instruction": [f"do {i}" for i in rows]}, {}
    if name == "int_labels":
        labels = [[i % 5, 1, 0, 2] for i in rows]
        return {**base, "negatives": [_negatives(i, 3) for i in rows], "label": labels}, {}
    if name == "truncated_scores":
        scores = [[1.0 + i] + [-float(j) for j in range(7)] for i in rows]
        return {**base, "negatives": [_negatives(i, 7) for i in rows], "label": scores}, {"num_negatives": 3}
    if name == "ragged":
        return {**base, "negatives": [_negatives(i, i % 8) for i in rows]}, {}
    assert name == "kalm"
    return {
        "query": base["anchor"],
        "pos": [[f"p{i}"] + ([f"p{i}b"] if i % 2 else []) for i in rows],
        "neg": [_negatives(i, 3) for i in rows],
    }, {}


@pytest.mark.parametrize("name", ["plain", "instruction", "int_labels", "truncated_scores", "ragged", "kalm"])
def test_every_variant_reads_without_a_python_row(tmp_path: Path, name: str, request) -> None:
    columns, options = _variant(name)
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table(columns), path)
    request.getfixturevalue("no_python_rows")
    data = load_training_data(path, **options)[name]
    rows = data.with_format("arrow")[:].to_pylist()  # the test reads the result back (Arrow access is allowed)
    i = 7
    if name == "kalm":  # several positives: one row per positive, each naming its query
        assert len(rows) == N + N // 2 and rows[11]["anchor"].endswith("q7") and rows[11]["positive"] == "p7b"
        assert rows[11]["anchor"].startswith("Instruct: ")  # the KaLM layout's queries are instructed at load
        return
    if name == "ragged":  # rows without negatives dropped; the others keep their own first, then draws from them
        kept = [r for r in range(N) if r % 8]
        assert [row["anchor"] for row in rows] == [f"q{r}" for r in kept]
        row = rows[kept.index(i)]
        own = _negatives(i, 7)
        assert [row[f"negative_{k}"] for k in range(1, 8)] == own
        three = rows[kept.index(3)]
        assert [three[f"negative_{k}"] for k in (1, 2, 3)] == _negatives(3, 3)
        assert {three[f"negative_{k}"] for k in range(4, 8)} <= set(_negatives(3, 3))
        return
    row = rows[i]
    expected_anchor = "Instruct: do 7 \n Query: q7" if name == "instruction" else "q7"
    assert row["anchor"] == expected_anchor and row["positive"] == "p7"
    assert [row[f"negative_{k}"] for k in (1, 2, 3)] == _negatives(i, 3)
    if name == "int_labels":
        assert row["label"] == [2.0, 1.0, 0.0, 2.0]
    if name == "truncated_scores":
        assert "negative_4" not in row and row["label"] == [8.0, 0.0, -1.0, -2.0]  # the scores of the kept ones


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf8")
    return path


def _stage(tmp_path: Path, tasks: dict, stage: str = "pretrain", **data):  # noqa: ANN202
    """A stage's datasets, read as training reads them."""
    from kalm_st.recipe.build import load_sources, resolve_tasks
    from kalm_st.recipe.config import StageConfig

    config = StageConfig.from_dict(
        {
            "stage": stage,
            "output_dir": str(tmp_path / "out"),
            "model": {"init_from": "builtin:tiny-qwen2"},
            "data": {"tasks": tasks, **data},
            "loss": {"name": "focal_infonce"},
            "args": {"per_device_train_batch_size": 1},
        },
        "test.yaml",
    )
    return load_sources(config, resolve_tasks(config, config.data.tasks))[0]


def test_a_bad_item_in_a_kalm_jsonl_is_named_at_its_own_line(tmp_path: Path) -> None:
    """The old KaLM reader reported a non-string list item as row 0 whatever its row."""
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]} for i in range(10)]
    rows[6]["neg"] = ["n6", 3]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataValidationError) as info:
        _stage(tmp_path, {"t": {"path": str(path)}})
    assert info.value.problems == [f"{path}: line 7: column 'neg': negative 2 is empty or not a string"]


def test_a_symmetric_task_gives_its_documents_the_querys_own_instruction(tmp_path: Path) -> None:
    """STS: a query that already carries its instruction gave its documents the row's other one."""
    mine = KALM_INSTRUCTION_TEMPLATE.format(instruction="Mine")
    other = KALM_INSTRUCTION_TEMPLATE.format(instruction="Other")
    rows = [
        {"query": mine + "a", "pos": ["b"], "neg": ["c"], "prompt": "Other"},
        {"query": "d", "pos": ["e"], "neg": ["f"], "prompt": "Other"},
    ]
    data = _stage(tmp_path, {"pairs": {"path": str(_jsonl(tmp_path / "pairs.jsonl", rows)), "type": "STS"}})["pairs"]
    assert data.to_list() == [
        {"anchor": mine + "a", "positive": mine + "b", "negative_1": mine + "c"},
        {"anchor": other + "d", "positive": other + "e", "negative_1": other + "f"},
    ]
    st_rows = [{"anchor": mine + "a", "positive": "b", "instruction": "Other"}]  # the same in kalm-st's layout
    same = load_training_data(_jsonl(tmp_path / "st.jsonl", st_rows), task_types={"st": "STS"})["st"]
    assert same.to_list() == [{"anchor": mine + "a", "positive": mine + "b"}]


def test_the_same_rows_in_any_layout_give_the_same_rows(tmp_path: Path) -> None:
    """One policy: ragged negatives, truncation and scores read alike from kalm-st's and the KaLM layout."""
    kalm = [
        {"query": f"q{i}", "pos": [f"p{i}"], "neg": _negatives(i, 1 + i % 3), "pos_scores": [1.0],
         "neg_scores": [-float(j) for j in range(1 + i % 3)]}
        for i in range(9)
    ]  # fmt: skip
    st = [
        {
            "anchor": r["query"],
            "positive": r["pos"][0],
            "negatives": r["neg"],
            "label": r["pos_scores"] + r["neg_scores"],
        }
        for r in kalm
    ]
    options = {"num_negatives": 2, "instructed_queries": "strip"}  # strip: the KaLM layout adds no instruction
    a = load_training_data(_jsonl(tmp_path / "t.jsonl", kalm), **options)["t"].to_list()
    b = load_training_data(_jsonl(tmp_path / "u.jsonl", st), **options)["u"].to_list()
    assert a == b and [r["negative_2"] for r in a][1:3] == ["n1_1", "n2_1"]


def test_num_negatives_0_is_in_batch_only_in_a_finetune_stage(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "weak.jsonl", [{"query": f"q{i}", "pos": [f"p{i}"], "neg": []} for i in range(8)])
    data = _stage(tmp_path, {"weak": {"path": str(path)}}, stage="finetune", num_negatives=0)
    assert data["weak"].column_names == ["anchor", "positive"] and len(data["weak"]) == 8


def test_kalm_st_mine_is_the_recipes_mine_step(tmp_path: Path, minilm_dir: Path, shared_data_dir: Path) -> None:
    """``kalm-st mine`` runs the recipe's step: the same file, a Classification task passed through unchanged."""
    import csv

    from kalm_st.cli import main
    from kalm_st.recipe.recipe import load_recipe
    from kalm_st.recipe.runner import run_recipe

    with (shared_data_dir / "stsb" / "train.csv").open(encoding="utf8") as handle:
        pairs = [r for r in csv.reader(handle) if float(r[2]) >= 4.0][:30]
    retrieval = _jsonl(tmp_path / "pairs.jsonl", [{"anchor": a, "positive": b} for a, b, _ in pairs])
    banking = [{"anchor": f"card {i}", "positive": f"card issue {i}", "negatives": [f"rate {i}"]} for i in range(6)]
    classification = _jsonl(tmp_path / "Banking77Classification.jsonl", banking)
    options = ["--range-min", "2", "--range-max", "12", "--num-negatives", "2", "--device", "cpu"]
    cli_out = tmp_path / "cli.parquet"
    argv = ["mine", str(retrieval), str(classification), "-o", str(cli_out), "--model", str(minilm_dir), *options]
    assert main([*argv, "--no-instructions", "--task-type", "Banking77Classification=Classification"]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\nsteps:\n"
        f"  - {{name: mine, kind: mine, model: '{minilm_dir}', data: ['{retrieval}', '{classification}'],\n"
        "     range_min: 2, range_max: 12, num_negatives: 2, instructions: false,\n"
        "     task_types: {Banking77Classification: Classification}}\n"
    )
    run_recipe(load_recipe(recipe))
    from_cli, from_recipe = pq.read_table(cli_out), pq.read_table(tmp_path / "run" / "mine" / "data.parquet")
    assert from_cli.equals(from_recipe)
    passed = from_cli.filter(pa.compute.equal(from_cli["task"], "Banking77Classification")).to_pylist()
    assert [{k: r[k] for k in ("anchor", "positive", "negative_1")} for r in passed] == [
        {"anchor": b["anchor"], "positive": b["positive"], "negative_1": b["negatives"][0]} for b in banking
    ]
