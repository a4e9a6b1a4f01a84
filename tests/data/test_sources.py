"""Issue 11: the paper's data as it is (KaLM / FlagEmbedding / F2LLM formats; folders, globs, Hub-layout folders).

Rows are real text from the bundled STS-B / TrecQA / Banking77 files under ``data/``, written by each test into the
layouts the public datasets use (DATA_AND_SERVING.md §1-2). Expected values are computed from those rows here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm_st.data import DataValidationError
from kalm_st.instructions import KALM_INSTRUCTION_TEMPLATE
from kalm_st.recipe.build import build_stage, load_sources, resolve_tasks, run_stage
from kalm_st.recipe.config import StageConfig

ROOT = Path(__file__).resolve().parents[2]
INSTRUCT = "Given a web search query, retrieve relevant passages"
BAKED = KALM_INSTRUCTION_TEMPLATE.format(instruction=INSTRUCT)


def _stsb(n: int) -> list[tuple[str, str]]:
    frame = pd.read_csv(ROOT / "data/stsb/train.csv", header=None, names=["a", "b", "s"]).head(n)
    return list(zip(frame["a"], frame["b"], strict=True))


def _trecqa(n: int) -> pd.DataFrame:
    frame = pd.read_csv(ROOT / "data/trecqa/train.csv")
    return frame.groupby("qtext").agg(pos=("atext", list)).reset_index().head(n)


def _kalm_rows(n: int, n_neg: int = 3) -> list[dict]:
    pairs = _stsb(n + n_neg)
    return [
        {"query": BAKED + a, "pos": [b], "neg": [pairs[(i + k + 1) % len(pairs)][1] for k in range(n_neg)]}
        for i, (a, b) in enumerate(pairs[:n])
    ]


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _config(tmp_path: Path, data: dict, stage: str = "finetune", **args) -> StageConfig:
    return StageConfig.from_dict(
        {
            "stage": stage,
            "output_dir": str(tmp_path / "out"),
            "model": {"init_from": "builtin:tiny-qwen2", "max_seq_length": 48, "dtype": "float32"},
            "data": data,
            "loss": {"name": "focal_infonce", "kwargs": {"temperature": 0.05}},
            "args": {
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "use_cpu": True,
                "report_to": "none",
                "save_strategy": "no",
                "dataloader_drop_last": True,
                **args,
            },
        },
        source="test.yaml",
    )


def _load(config: StageConfig):
    tasks = resolve_tasks(config, config.data.tasks)
    return load_sources(config, tasks)


def test_kalm_subfolders_train_end_to_end_with_the_baked_instruction_once(tmp_path: Path) -> None:
    root = tmp_path / "kalm"
    _write_parquet(root / "stsb" / "train-00000-of-00002.parquet", _kalm_rows(8))
    _write_parquet(root / "stsb" / "train-00001-of-00002.parquet", _kalm_rows(16)[8:])
    banking = pd.read_csv(ROOT / "data/banking77/train.csv").head(40)
    rows = [
        {"query": t, "pos": [banking.text[(i + 1) % 40]], "neg": [banking.text[(i + 20) % 40]]}
        for i, t in enumerate(banking.text)
    ]
    _write_parquet(root / "banking77_no_in_batch_neg" / "train-00000-of-00001.parquet", rows)
    config = _config(
        tmp_path,
        {
            "sources": [
                {"path": str(root), "tasks": "subfolders", "types": {"banking77_no_in_batch_neg": "Classification"}}
            ],
            "num_negatives": 1,
        },
    )
    run = build_stage(config)
    assert sorted(run.train_dataset) == ["banking77_no_in_batch_neg", "stsb"]
    assert len(run.train_dataset["stsb"]) == 16
    assert run.losses["banking77_no_in_batch_neg"].in_batch_negatives is False
    assert run.losses["stsb"].in_batch_negatives is True
    # the instruction the query carries is in the tokenized text exactly once; no prompt is added on top
    assert run.args.prompts["stsb"] == {}
    anchor = run.train_dataset["stsb"][0]["anchor"]
    assert anchor == BAKED + _stsb(1)[0][0]
    tokenizer = run.model.tokenizer
    decoded = tokenizer.decode(tokenizer(anchor)["input_ids"])
    assert decoded.count("Instruct:") == 1 and decoded.count(INSTRUCT) == 1
    # uninstructed banking queries got the classification instruction on every side
    row = run.train_dataset["banking77_no_in_batch_neg"][0]
    assert row["anchor"].startswith("Instruct: ") and row["positive"].startswith("Instruct: ")
    run.trainer.train()
    assert run.trainer.state.global_step == 2


def test_empty_neg_trains_in_batch_only(tmp_path: Path) -> None:
    rows = [{"query": a, "pos": [b], "neg": []} for a, b in _stsb(12)]
    path = _write_parquet(tmp_path / "weak" / "part-0.parquet", rows)
    config = _config(tmp_path, {"tasks": {"weak": {"path": str(path.parent)}}}, stage="pretrain")
    run = build_stage(config)
    assert run.train_dataset["weak"].column_names == ["anchor", "positive"]
    assert run.train_dataset["weak"]["positive"] == [b for _, b in _stsb(12)]
    run.trainer.train()
    assert run.trainer.state.global_step == 2


def test_ragged_neg_resampled_identically_and_scores_follow_the_choice(tmp_path: Path) -> None:
    frame = _trecqa(12)
    negs = [t for t, _ in _stsb(40)]
    rows = []
    for i, (q, pos) in enumerate(zip(frame.qtext, frame.pos, strict=True)):
        neg = negs[i : i + 1 + i % 3]  # 1..3 negatives, want 3
        rows.append(
            {
                "query": q,
                "pos": pos,
                "neg": neg,
                "pos_scores": [float(10 * i + j) for j in range(len(pos))],
                "neg_scores": [-float(10 * i + j) for j in range(len(neg))],
                "prompt": "Retrieve the answer",
            }
        )
    path = tmp_path / "flag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(tmp_path, {"tasks": {"trec": {"path": str(path)}}, "num_negatives": 3})
    first, _ = _load(config)
    again, _ = _load(_config(tmp_path / "b", {"tasks": {"trec": {"path": str(path)}}, "num_negatives": 3}))
    assert first["trec"].to_dict() == again["trec"].to_dict()
    other, _ = _load(StageConfig.from_dict({**config.to_dict(), "seed": 7}, "t"))
    # rows with 2 of the 3 negatives wanted draw the third from their own: another seed, another draw
    assert other["trec"]["negative_3"] != first["trec"]["negative_3"]
    data = first["trec"]
    prompt = KALM_INSTRUCTION_TEMPLATE.format(instruction="Retrieve the answer")
    # several positives: one row per positive, in the list's order, each naming its source row
    assert data["positive_group"] == [i for i, src in enumerate(rows) for _ in src["pos"]]
    for row in data:
        src = rows[row["positive_group"]]
        assert row["anchor"] == prompt + src["query"]
        j = src["pos"].index(row["positive"])
        assert row["label"][0] == src["pos_scores"][j]
        chosen = [row[f"negative_{k}"] for k in (1, 2, 3)]
        for k, text in enumerate(chosen):
            assert text in src["neg"]
            assert row["label"][k + 1] == src["neg_scores"][src["neg"].index(text)]
        assert chosen[: len(src["neg"])] == src["neg"][:3]  # a row's own negatives first, then draws from them


def test_f2llm_parquet_and_glob(tmp_path: Path) -> None:
    pairs = _stsb(20)
    rows = [
        {"query": a, "passage": b, "negative_1": pairs[(i + 3) % 20][1], "negative_2": pairs[(i + 5) % 20][1]}
        for i, (a, b) in enumerate(pairs)
    ]
    _write_parquet(tmp_path / "f2llm" / "a-0.parquet", rows[:10])
    _write_parquet(tmp_path / "f2llm" / "a-1.parquet", rows[10:])
    config = _config(
        tmp_path, {"tasks": {"STSBenchmark": {"path": str(tmp_path / "f2llm/a-*.parquet"), "type": "STS"}}}
    )
    run = build_stage(config)
    data = run.train_dataset["STSBenchmark"]
    sts = KALM_INSTRUCTION_TEMPLATE.format(instruction="Retrieve semantically similar text")
    assert data["anchor"] == [sts + r["query"] for r in rows]
    assert data["negative_2"] == [sts + r["negative_2"] for r in rows]  # symmetric: documents instructed too
    run.trainer.train()
    assert run.trainer.state.global_step == 2


def test_local_hub_layout_loads_through_the_hub_code_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "repo"
    _write_parquet(repo / "stsb" / "train-00000-of-00001.parquet", _kalm_rows(8))
    _write_parquet(repo / "other" / "train-00000-of-00001.parquet", _kalm_rows(12)[4:])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: stsb\n  data_files:\n  - split: train\n    path: stsb/*.parquet\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/*.parquet\n---\n"
    )
    config = _config(tmp_path, {"sources": [{"path": str(repo), "tasks": "subfolders", "max_rows_per_task": 6}]})
    data, tasks = _load(config)
    assert sorted(data) == ["other", "stsb"] and tasks["stsb"].config_name == "stsb"
    assert [len(d) for d in data.values()] == [6, 6]
    assert data["stsb"]["positive"] == [r["pos"][0] for r in _kalm_rows(6)]


def test_dry_run_does_not_fail_on_hub_sources(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        {"sources": [{"path": "hf://datasets/KaLM-Embedding/KaLM-embedding-finetuning-data", "tasks": "subfolders"}]},
    )
    assert run_stage(config, dry_run=True) is None


def _error(tmp_path: Path, data: dict) -> str:
    with pytest.raises((DataValidationError, FileNotFoundError)) as info:
        _load(_config(tmp_path, data))
    return str(info.value)


@pytest.mark.parametrize(
    ("row", "column", "what"),
    [
        ({"pos": "not a list"}, "pos", "must be a list"),
        ({"pos": []}, "pos", "empty list"),
        ({"query": 3}, "query", "string"),
        ({"pos_scores": [math.nan]}, "pos_scores", "NaN"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path: Path, row: dict, column: str, what: str) -> None:
    rows = [{**r, "pos_scores": [1.0], "neg_scores": [0.5] * 3} for r in _kalm_rows(8)]
    path = tmp_path / "bad" / "shard.parquet"
    if column in ("pos", "query") and not isinstance(row.get(column), list):
        # a parquet column has one type: the bad value is the whole column's
        rows = [{**r, **row} for r in rows]
        bad_row = 1  # rows count from 1
    else:
        rows[5] = {**rows[5], **row}
        bad_row = 6
    _write_parquet(path, rows)
    message = _error(tmp_path, {"tasks": {"t": {"path": str(path.parent)}}})
    assert f"{path}: row {bad_row}: column {column!r}" in message and what in message, message


def test_missing_and_unreadable_shards(tmp_path: Path) -> None:
    message = _error(tmp_path, {"tasks": {"t": {"path": str(tmp_path / "nope")}}})
    assert "data.tasks.t.path" in message and "nope" in message
    message = _error(tmp_path, {"tasks": {"t": {"path": str(tmp_path / "x-*.parquet")}}})
    assert "glob matches no file" in message
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.parquet").write_bytes(b"PAR1 not really")
    message = _error(tmp_path, {"tasks": {"t": {"path": str(tmp_path / "broken")}}})
    assert f"{tmp_path / 'broken' / 'a.parquet'}: cannot be read as Parquet" in message


def test_subfolder_with_other_columns_is_named(tmp_path: Path) -> None:
    root = tmp_path / "kalm"
    for name in ("a", "b"):
        _write_parquet(root / name / "train.parquet", _kalm_rows(8))
    odd = _write_parquet(root / "c" / "train.parquet", [{"query": r["query"], "pos": r["pos"]} for r in _kalm_rows(8)])
    message = _error(tmp_path, {"sources": [{"path": str(root), "tasks": "subfolders"}]})
    assert f"{odd}: column 'neg'" in message and "differ from its siblings" in message


def test_a_restart_reads_the_converted_cache_without_converting_again(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "kalm" / "t" / "train.parquet", _kalm_rows(16))
    config = _config(tmp_path, {"tasks": {"t": {"path": str(path)}}, "num_negatives": 2})
    first, _ = _load(config)
    files = [f["filename"] for f in first["t"].cache_files]
    stamps = [Path(f).stat().st_mtime_ns for f in files]
    again, _ = _load(config)
    assert [f["filename"] for f in again["t"].cache_files] == files  # memory-mapped from the same Arrow file
    assert [Path(f).stat().st_mtime_ns for f in files] == stamps  # not rewritten: nothing converted or checked again
    assert again["t"].to_dict() == first["t"].to_dict()


def test_a_changed_parquet_file_is_read_again(tmp_path: Path) -> None:
    """The Arrow copy of a parquet shard is keyed by the file's size and modification time: new rows are seen."""
    path = _write_parquet(tmp_path / "kalm" / "t" / "train.parquet", _kalm_rows(16))
    config = _config(tmp_path, {"tasks": {"t": {"path": str(path)}}, "num_negatives": 2})
    first, _ = _load(config)
    rows = _kalm_rows(24)[8:]  # other queries, and more of them
    _write_parquet(path, rows)
    again, _ = _load(config)
    assert again["t"]["anchor"] == [r["query"] for r in rows] != first["t"]["anchor"]
    assert again["t"]["positive"] == [r["pos"][0] for r in rows]


@pytest.mark.parametrize("policy", ["strip", "replace"])
def test_baked_instruction_strip_or_replace(tmp_path: Path, policy: str) -> None:
    path = _write_parquet(tmp_path / "k" / "STSBenchmark" / "train.parquet", _kalm_rows(8))
    config = _config(
        tmp_path,
        {"sources": [{"path": str(path.parent.parent), "tasks": "subfolders"}], "instructed_queries": policy},
    )
    run = build_stage(config)
    anchors = run.train_dataset["STSBenchmark"]["anchor"]
    raw = [a for a, _ in _stsb(8)]
    if policy == "strip":
        assert anchors == raw and run.args.prompts["STSBenchmark"] == {}
    else:  # the table's instruction for STSBenchmark replaces the row's
        table = KALM_INSTRUCTION_TEMPLATE.format(instruction="Retrieve semantically similar text")
        assert anchors == [table + a for a in raw]


def test_ragged_drop_and_flag_type_column(tmp_path: Path) -> None:
    pairs = _stsb(12)
    rows = [
        {"query": a, "pos": [b], "neg": [pairs[(i + 1) % 12][1]] * (1 + i % 2), "type": "symmetric_sts"}
        for i, (a, b) in enumerate(pairs)
    ]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(
        tmp_path, {"tasks": {"pairs": {"path": str(path)}}, "num_negatives": 2, "ragged_negatives": "drop"}
    )
    data, tasks = _load(config)
    assert tasks["pairs"].type == "STS"  # symmetric_sts
    assert len(data["pairs"]) == 6  # the rows with one negative dropped
    sts = KALM_INSTRUCTION_TEMPLATE.format(instruction="Retrieve semantically similar text")
    assert data["pairs"]["positive"] == [sts + b for i, (_, b) in enumerate(pairs) if i % 2 == 1]


def test_source_config_errors_name_the_key(tmp_path: Path) -> None:
    from kalm_st.recipe.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.max_rows_per_task must be >= 1"):
        _config(tmp_path, {"sources": [{"path": "x", "max_rows_per_task": 0}]})
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.tasks must be one of"):
        _config(tmp_path, {"sources": [{"path": "x", "tasks": "folders"}]})
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.path 'hf://KaLM/x': a Hub dataset is written"):
        _config(tmp_path, {"sources": [{"path": "hf://KaLM/x"}]})


def test_jsonl_row_whose_pos_is_not_a_list_is_named(tmp_path: Path) -> None:
    rows = [{"query": a, "pos": [b], "neg": [a]} for a, b in _stsb(10)]
    rows[3]["pos"] = rows[3]["pos"][0]
    path = tmp_path / "flag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = _error(tmp_path, {"tasks": {"t": {"path": str(path)}}})
    assert f"{path}: line 4: column 'pos': must be a list" in message, message  # rows[3] is on line 4


def test_recipe_planning_lists_hub_sources_as_remote_and_checks_globs(tmp_path: Path, monkeypatch) -> None:
    from kalm_st.recipe.recipe import RecipeError, load_recipe
    from kalm_st.recipe.runner import check_recipe

    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'out'}\nsteps:\n"
        "  - {name: pretrain, kind: train, config: training/configs/stage1_pretrain.yaml}\n"
    )
    unchecked = check_recipe(load_recipe(recipe))
    assert any("hf://datasets/HIT-TMG/KaLM-embedding-pretrain-data" in item for item in unchecked), unchecked
    shards = str(tmp_path / "none-*.parquet")
    recipe.write_text(
        f"output_dir: {tmp_path / 'out'}\nsteps:\n"
        "  - name: pretrain\n    kind: train\n    config: training/configs/stage1_pretrain.yaml\n"
        f"    set: {{data: {{tasks: {{weak: {{path: '{shards}'}}}}}}}}\n"
    )
    with pytest.raises(RecipeError, match="matches no file"):
        check_recipe(load_recipe(recipe))


def test_a_hub_model_id_with_a_dot_is_remote() -> None:
    from kalm_st.recipe.runner import is_remote

    assert is_remote("Qwen/Qwen2-0.5B", model=True)  # ".5B" is not a file suffix
    assert not is_remote("corpora/pairs.jsonl", model=True)


def test_tasks_column_makes_one_task_per_value_of_a_curated_file(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    from kalm_st.data import write_training_data

    pairs = _stsb(24)
    curated = DatasetDict(
        {
            "sts_a": Dataset.from_dict({"anchor": [a for a, _ in pairs[:12]], "positive": [b for _, b in pairs[:12]]}),
            "sts_b": Dataset.from_dict({"anchor": [a for a, _ in pairs[12:]], "positive": [b for _, b in pairs[12:]]}),
        }
    )
    path = write_training_data(curated, tmp_path / "curated" / "data.parquet")
    config = _config(
        tmp_path, {"sources": [{"path": str(path), "tasks": "column", "types": {"sts_b": "STS"}}]}, stage="pretrain"
    )
    data, resolved = _load(config)
    assert list(data) == ["sts_a", "sts_b"]
    assert data["sts_b"]["anchor"] == [a for a, _ in pairs[12:]]  # the rows of that task value, in order
    assert (resolved["sts_a"].type, resolved["sts_b"].type) == (None, "STS")
    only = _config(tmp_path, {"sources": [{"path": str(path), "tasks": "column", "include": ["sts_b"]}]}, "pretrain")
    assert list(_load(only)[0]) == ["sts_b"]
    plain = _write_parquet(tmp_path / "plain.parquet", [{"anchor": a, "positive": b} for a, b in pairs])
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.path: .*plain\.parquet: tasks: column needs a 'task'"):
        _load(_config(tmp_path, {"sources": [{"path": str(plain), "tasks": "column"}]}))


def test_a_json_column_empty_in_the_first_chunk_names_the_cause(tmp_path: Path) -> None:
    """datasets' JSON reader takes each chunk's types from the file's first chunk (1 MB): a list column empty there
    but filled later cannot be cast; the error says so, with the fix, instead of only 'cast string to null'."""
    import json

    from kalm_st.data.checks import DataValidationError
    from kalm_st.data.shards import read_table

    path = tmp_path / "late_negatives.jsonl"
    with path.open("w") as handle:
        for i in range(12_000):  # ~1.7 MB: the first MB has no negatives
            negatives = [] if i < 8_000 else [f"negative {i}"]
            handle.write(json.dumps({"query": f"query {i} " * 8, "positive": f"p {i}", "negatives": negatives}) + "\n")
    with pytest.raises(DataValidationError, match=r"empty \(null or \[\]\) in every row of the file's first MB"):
        read_table(path)
