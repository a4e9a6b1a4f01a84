"""Issue 11: several positives per query, one per row per epoch, seeded (kalm_st.data.positive_groups).

Rows are real TrecQA questions with their answers (several per question) written into KaLM-layout parquet; the
expected rows and groups are computed here from those input lists. The per-epoch draw is checked against its
definition (one row per group per epoch) and, for its distribution, against binomial bounds computed by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from torch.utils.data import BatchSampler, ConcatDataset, SequentialSampler

from kalm_st.data import DataValidationError, load_training_data, write_training_data
from kalm_st.data.positive_groups import POSITIVE_GROUP, draw_members, group_starts, load_starts, split_positive_groups
from kalm_st.recipe.build import build_stage, load_sources, resolve_tasks
from kalm_st.recipe.config import StageConfig
from kalm_st.sampling import TaskHomogeneousBatchSampler

ROOT = Path(__file__).resolve().parents[2]


def _trec_rows(n: int, skip: int = 0) -> list[dict]:
    """TrecQA questions with 1-4 of their answers as ``pos`` and three STS-B sentences as ``neg``."""
    frame = pd.read_csv(ROOT / "data/trecqa/train.csv")
    grouped = frame.groupby("qtext", sort=True)["atext"].apply(list).reset_index().iloc[skip : skip + n]
    negatives = pd.read_csv(ROOT / "data/stsb/train.csv", header=None, names=["a", "b", "s"])["a"].tolist()
    return [
        {"query": q, "pos": answers[: 1 + i % 4], "neg": negatives[3 * i : 3 * i + 3]}
        for i, (q, answers) in enumerate(zip(grouped.qtext, grouped.atext, strict=True))
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _config(tmp_path: Path, data: dict, **args) -> StageConfig:
    # instructed_queries strip: the texts as written (no instruction), so they compare with the input rows
    return StageConfig.from_dict(
        {
            "stage": "finetune",
            "output_dir": str(tmp_path / "out"),
            "model": {"init_from": "builtin:tiny-qwen2", "max_seq_length": 32, "dtype": "float32"},
            "data": {"num_negatives": 1, "instructed_queries": "strip", **data},
            "loss": {"name": "focal_infonce", "kwargs": {"temperature": 0.05}},
            "args": {
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "use_cpu": True,
                "report_to": "none",
                "save_strategy": "no",
                **args,
            },
        },
        source="test.yaml",
    )


def _two_shards(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = _trec_rows(24)
    folder = tmp_path / "kalm" / "trec"
    _write(folder / "train-00000-of-00002.parquet", rows[:10])
    _write(folder / "train-00001-of-00002.parquet", rows[10:])
    return folder, rows


def test_a_row_with_k_positives_is_read_as_k_rows_of_one_group(tmp_path: Path) -> None:
    folder, rows = _two_shards(tmp_path)
    config = _config(tmp_path, {"tasks": {"trec": {"path": str(folder)}}})
    data, _ = load_sources(config, resolve_tasks(config, config.data.tasks))
    trec = data["trec"]
    # one row per positive, in the list's order; group ids unique over both shards (the second starts at 10)
    assert trec["positive"] == [p for r in rows for p in r["pos"]]
    assert trec[POSITIVE_GROUP] == [i for i, r in enumerate(rows) for _ in r["pos"]]
    assert trec["anchor"] == [r["query"] for r in rows for _ in r["pos"]]
    assert trec["negative_1"] == [r["neg"][0] for r in rows for _ in r["pos"]]
    sizes = [len(r["pos"]) for r in rows]
    assert group_starts(trec).tolist() == [sum(sizes[:i]) for i in range(len(rows))]
    # positives: once keeps one row per query (drawn at load), no group column
    once = _config(tmp_path / "once", {"tasks": {"trec": {"path": str(folder)}}, "positives": "once"})
    single = load_sources(once, resolve_tasks(once, once.data.tasks))[0]["trec"]
    assert POSITIVE_GROUP not in single.column_names and len(single) == len(rows)
    assert all(row["positive"] in src["pos"] for row, src in zip(single, rows, strict=True))


def _sampler(data: dict[str, Dataset], groups: dict, seed: int = 0, batch: int = 4) -> TaskHomogeneousBatchSampler:
    concat = ConcatDataset(list(data.values()))
    children = [BatchSampler(SequentialSampler(d), batch, drop_last=True) for d in data.values()]
    return TaskHomogeneousBatchSampler(
        concat, children, seed=seed, world_size=1, task_names=list(data), positive_groups=groups
    )


def test_the_sampler_trains_one_positive_per_query_per_epoch(tmp_path: Path) -> None:
    folder, rows = _two_shards(tmp_path)
    config = _config(tmp_path, {"tasks": {"trec": {"path": str(folder)}}})
    loaded, _ = load_sources(config, resolve_tasks(config, config.data.tasks))
    owner = np.asarray(loaded["trec"][POSITIVE_GROUP])  # the reference: each row's query, from the input
    plain = Dataset.from_dict({"anchor": [f"plain {i}" for i in range(8)], "positive": [f"p {i}" for i in range(8)]})
    data, groups = split_positive_groups({"trec": loaded["trec"], "plain": plain})
    assert POSITIVE_GROUP not in data["trec"].column_names and list(groups) == ["trec"]
    sampler = _sampler(data, groups)
    assert len(sampler) == len(rows) // 4 + 8 // 4  # steps count queries, not rows
    drawn = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        trec_rows = [i for batch in sampler for i in batch if i < len(owner)]
        assert sorted(owner[trec_rows].tolist()) == list(range(len(rows)))  # every query once, one positive
        drawn.append(trec_rows)
    per_epoch = [dict(zip(owner[r].tolist(), r, strict=True)) for r in drawn]
    multi = [g for g, r in enumerate(rows) if len(r["pos"]) > 1]
    assert any(len({p[g] for p in per_epoch}) > 1 for g in multi)  # a new draw each epoch
    again = _sampler(data, groups)
    again.set_epoch(3)
    assert [i for batch in again for i in batch if i < len(owner)] == drawn[3]  # same seed, epoch: same rows
    other = _sampler(data, groups, seed=1)
    other.set_epoch(3)
    assert [i for batch in other for i in batch if i < len(owner)] != drawn[3]


def test_the_per_epoch_draw_is_uniform_within_each_group() -> None:
    sizes = np.array([1, 2, 3, 4, 5] * 20)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    epochs = 400
    counts = np.zeros(sizes.sum(), dtype=np.int64)
    for epoch in range(epochs):
        members = draw_members(starts, int(sizes.sum()), seed=0, epoch=epoch)
        assert np.all((members >= starts) & (members < starts + sizes))
        counts[members] += 1
    for start, size in zip(starts, sizes, strict=True):
        expected = epochs / size
        sigma = math.sqrt(epochs * (1 / size) * (1 - 1 / size))
        assert np.all(np.abs(counts[start : start + size] - expected) <= 5 * sigma + 1e-9)


def test_a_stage_hides_the_group_column_and_trains(tmp_path: Path) -> None:
    folder, rows = _two_shards(tmp_path)
    run = build_stage(_config(tmp_path, {"tasks": {"trec": {"path": str(folder)}}}))
    assert POSITIVE_GROUP not in run.train_dataset["trec"].column_names  # ST's collator never sees it
    groups = run.args.multi_dataset_batch_sampler.keywords["positive_groups"]
    starts = load_starts(groups["trec"], len(run.train_dataset["trec"]))
    assert len(starts) == len(rows)
    assert isinstance(groups["trec"], str) and groups["trec"].endswith(".npy")  # on disk: small training args
    run.trainer.train()
    assert run.trainer.state.global_step == 2


def test_curation_outputs_keep_the_groups(tmp_path: Path, tiny_model) -> None:
    from kalm_st.data.mining import mine_hard_negatives

    folder, rows = _two_shards(tmp_path)
    config = _config(tmp_path, {"tasks": {"trec": {"path": str(folder)}}})
    trec = load_sources(config, resolve_tasks(config, config.data.tasks))[0]["trec"]
    corpus = pd.read_csv(ROOT / "data/stsb/train.csv", header=None, names=["a", "b", "s"])["b"].head(60).tolist()
    mined = mine_hard_negatives(
        trec.select_columns(["anchor", "positive", POSITIVE_GROUP]), tiny_model, corpus=corpus, range_min=0,
        range_max=10, num_negatives=2, show_progress_bar=False,
    )  # fmt: skip
    assert mined[POSITIVE_GROUP] == trec[POSITIVE_GROUP] and mined["positive"] == trec["positive"]
    # a query's other positives are never its negatives
    positives_of = {}
    for row in trec:
        positives_of.setdefault(row["anchor"], set()).add(row["positive"])
    assert all(not {row["negative_1"], row["negative_2"]} & positives_of[row["anchor"]] for row in mined)
    # a multi-task file written and read back (the vectorised path) keeps them, memory-mapped
    other = Dataset.from_dict({"anchor": ["a1", "a2"], "positive": ["b1", "b2"]})
    path = write_training_data(DatasetDict({"trec": mined, "other": other}), tmp_path / "curated.parquet")
    back = load_training_data(path)
    assert back["trec"][POSITIVE_GROUP] == trec[POSITIVE_GROUP]
    assert back["trec"]["negative_2"] == mined["negative_2"]
    assert back["other"].column_names == ["anchor", "positive"] and back["other"]["anchor"] == ["a1", "a2"]
    assert back["trec"].cache_files  # a view of the file, not a copy in memory


def test_a_non_integer_group_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"anchor": "a", "positive": "b", "positive_group": 0}\n'
                    '{"anchor": "c", "positive": "d", "positive_group": 1.5}\n')  # fmt: skip
    with pytest.raises(DataValidationError, match=r"bad\.jsonl: line 2: column 'positive_group': must be an integer"):
        load_training_data(path)


def test_group_starts_are_checked() -> None:
    with pytest.raises(ValueError, match="start at row 0 and increase strictly"):
        load_starts(np.array([0, 3, 3]), 10)
    with pytest.raises(ValueError, match="start at row 0"):
        load_starts(np.array([1, 3]), 10)
    assert load_starts(np.array([0, 2, 9]), 10).tolist() == [0, 2, 9]


def test_flag_embedding_output_regroups_a_querys_positives(tmp_path: Path) -> None:
    from kalm_st.data.teacher_scores import as_flag_embedding

    folder, rows = _two_shards(tmp_path)
    config = _config(tmp_path, {"tasks": {"trec": {"path": str(folder)}}})
    trec = load_sources(config, resolve_tasks(config, config.data.tasks))[0]["trec"]
    # scores as a teacher would give them: row i's positive 100 + i, its negative -(100 + i)
    scored = trec.add_column("label", [[100.0 + i, -100.0 - i] for i in range(len(trec))])
    flag = as_flag_embedding(scored).to_list()
    assert [row["query"] for row in flag] == [r["query"] for r in rows]
    assert [row["pos"] for row in flag] == [r["pos"] for r in rows]  # the source rows' positive lists, in order
    first = np.cumsum([0] + [len(r["pos"]) for r in rows])[:-1]
    for g, row in enumerate(flag):
        members = range(first[g], first[g] + len(rows[g]["pos"]))
        assert row["pos_scores"] == [100.0 + i for i in members]
        assert row["neg"] == [rows[g]["neg"][0]] * len(members)  # each member row's one negative, in turn
        assert row["neg_scores"] == [-100.0 - i for i in members]
