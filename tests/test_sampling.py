"""Task-homogeneous, rank-aware batch sampler: unit checks, epoch reshuffling through accelerate's wrappers, and a
real 2-process gloo run through the ST trainer (spawned once for the module: starting the processes costs ~15 s)."""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from datasets import Dataset, DatasetDict
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, SequentialSampler

from kalm_st.data import build_training_prompts
from kalm_st.sampling import SamplerEpochCallback, TaskHomogeneousBatchSampler, text_lengths
from tests.ports import free_port

SIZES = {"A": 40, "B": 24, "C": 17}


def _datasets(sizes: dict[str, int] = SIZES) -> DatasetDict:
    return DatasetDict(
        {
            task: Dataset.from_dict(
                {
                    "anchor": [f"{task}{i} " + "x" * (i % 7) for i in range(n)],
                    "positive": [f"{task}p{i}" for i in range(n)],
                }
            )
            for task, n in sizes.items()
        }
    )


def _sampler(batch_size: int = 4, data: DatasetDict | None = None, **kwargs) -> TaskHomogeneousBatchSampler:
    data = data or _datasets()
    concat = ConcatDataset(list(data.values()))
    children = [BatchSampler(SequentialSampler(d), batch_size, drop_last=False) for d in data.values()]
    return TaskHomogeneousBatchSampler(concat, children, seed=7, task_names=list(data), **kwargs)


def _task_of(index: int, sizes: list[int]) -> int:
    offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
    return bisect_right(offsets, index)


def test_global_batches_are_homogeneous_full_and_deterministic() -> None:
    sampler = _sampler(batch_size=4, world_size=2)
    batches = list(sampler)
    sizes = list(SIZES.values())
    assert len(batches) == len(sampler) == 2 * (40 // 8 + 24 // 8 + 17 // 8)
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)  # no row twice in an epoch
    for step in range(0, len(batches), 2):
        tasks = {_task_of(i, sizes) for b in batches[step : step + 2] for i in b}
        assert len(tasks) == 1
    assert list(_sampler(batch_size=4, world_size=2)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_homogeneous_ratio_mixes_other_tasks_after_the_step_task() -> None:
    sampler = _sampler(batch_size=8, world_size=2, homogeneous_ratio=0.75)
    sizes = list(SIZES.values())
    batches = list(sampler)
    assert len(batches) == 2 * (40 // 12 + 24 // 12 + 17 // 12)
    for step in range(0, len(batches), 2):
        main = {_task_of(i, sizes) for b in batches[step : step + 2] for i in b[:6]}
        assert len(main) == 1
        for b in batches[step : step + 2]:
            assert len(b) == 8 and len(set(b)) == 8
            assert all(_task_of(i, sizes) not in main for i in b[6:])  # 2 of 8 from other tasks


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fill_rows_never_repeat_within_a_step(world_size: int) -> None:
    """Issue 16 item 5: under ``gather_across_devices`` a row twice in one step is its own copy's false negative."""
    # small other-task pools (A's fill comes from the 26 rows of B and C) make collisions likely if ranks draw alone
    data = _datasets({"A": 60, "B": 14, "C": 12})
    sampler = _sampler(batch_size=8, data=data, world_size=world_size, homogeneous_ratio=0.5)
    sizes = [60, 14, 12]
    steps = 0
    for epoch in range(40):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) % world_size == 0 and all(len(b) == 8 for b in batches)
        for start in range(0, len(batches), world_size):
            group = batches[start : start + world_size]  # the world batch of one step: batch i -> rank i % ws
            rows = [i for b in group for i in b]
            assert len(rows) == len(set(rows)), f"epoch {epoch}, step {start // world_size}: a row repeats"
            main = {_task_of(i, sizes) for b in group for i in b[:4]}
            assert len(main) == 1 and all(_task_of(i, sizes) not in main for b in group for i in b[4:])
            steps += 1
    assert steps >= 100


def test_fill_needs_enough_rows_for_the_whole_world_batch() -> None:
    data = _datasets({"A": 40, "B": 5, "C": 4})  # A's fill would need 4 x 2 = 8 rows from B and C: 9 exist
    _sampler(batch_size=8, data=data, world_size=2, homogeneous_ratio=0.5)
    with pytest.raises(ValueError, match="world batch"):  # 4 ranks x 4 fill rows = 16 > 9
        _sampler(batch_size=8, data=data, world_size=4, homogeneous_ratio=0.5)


def _pandas_parquet_dataset(tmp_path: Path, frame: pd.DataFrame) -> Dataset:
    """A parquet written by pandas, loaded by ``datasets``: string columns come back as ``large_string``."""
    frame.to_parquet(tmp_path / "rows.parquet")
    return Dataset.from_parquet(str(tmp_path / "rows.parquet"), cache_dir=str(tmp_path / "cache"))


def test_text_lengths_counts_large_string_columns_and_nulls(tmp_path: Path) -> None:
    anchors = ["héllo wörld", None, "", "x" * 1000, "日本語のテキスト", "emoji 🙂🙂"]
    positives = ["a", "bb", None, "ccc", "dddd", "ééééé"]
    frame = pd.DataFrame({"anchor": anchors, "positive": positives, "label": [0.5, 1.0, 0.0, 2.0, 1.5, 0.25]})
    data = _pandas_parquet_dataset(tmp_path, frame)
    assert data.features["anchor"].dtype == "large_string"  # the case the old code skipped
    lengths = text_lengths(data)
    expected = [sum(len(t) for t in (a, p) if t is not None) for a, p in zip(anchors, positives, strict=True)]
    assert isinstance(lengths, np.ndarray) and np.issubdtype(lengths.dtype, np.integer)
    assert lengths.tolist() == expected  # characters (code points), as Python's len(); a null cell counts 0
    # an indices mapping (select / shuffle) is followed: the lengths are those of the selected rows, in order
    picked = data.select([4, 0, 3])
    assert text_lengths(picked).tolist() == [expected[4], expected[0], expected[3]]
    # plain ``string`` columns and the ``dataset_name`` column ST adds
    small = Dataset.from_dict({"anchor": ["ab", None], "positive": ["c", "de"], "dataset_name": ["t", "t"]})
    assert text_lengths(small).tolist() == [3, 2]


def test_length_aware_works_on_a_pandas_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    anchors = ["w" * int(n) for n in rng.integers(1, 200, size=256)]
    data = DatasetDict(
        {
            "A": _pandas_parquet_dataset(tmp_path, pd.DataFrame({"anchor": anchors, "positive": ["p"] * 256})),
            "B": Dataset.from_dict({"anchor": anchors[:64], "positive": ["q"] * 64}),
        }
    )
    plain = list(_sampler(batch_size=8, data=data))
    aware = list(_sampler(batch_size=8, data=data, length_aware=True, length_window=16))
    lengths = [len(a) + 1 for a in anchors] + [len(a) + 1 for a in anchors[:64]]

    def spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert sorted(i for b in aware for i in b) == sorted(i for b in plain for i in b)
    assert spread(aware) < 0.25 * spread(plain)


def test_length_aware_groups_similar_lengths() -> None:
    data = _datasets({"A": 400, "B": 200})
    plain = list(_sampler(batch_size=8, data=data))
    aware = list(_sampler(batch_size=8, data=data, length_aware=True, length_window=50))
    lengths = [len(t) for d in data.values() for t in d["anchor"]]

    def spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert sorted(i for b in aware for i in b) == sorted(i for b in plain for i in b)
    assert spread(aware) < 0.5 * spread(plain)


def _largest_prefix_gap(batches: list[list[int]], sizes: list[int], steps: list[int]) -> float:
    """The largest |steps of task t among the first m - m * s_t / S| over every prefix m and task t."""
    counts, gap = [0] * len(sizes), 0.0
    for m, batch in enumerate(batches, start=1):
        counts[_task_of(batch[0], sizes)] += 1
        gap = max(gap, *(abs(c - m * s / sum(steps)) for c, s in zip(counts, steps, strict=True)))
    return gap


def test_even_task_order_keeps_every_prefix_in_proportion_and_the_epoch_unchanged() -> None:
    sizes = list(SIZES.values())
    steps = [n // 4 for n in sizes]  # 10, 6 and 4 steps of 4 rows
    gaps: dict[str, list[float]] = {"shuffled": [], "even": []}
    for epoch in range(30):
        epochs = {}
        for order in gaps:
            sampler = _sampler(batch_size=4, task_order=order)
            sampler.set_epoch(epoch)
            epochs[order] = list(sampler)
            gaps[order].append(_largest_prefix_gap(epochs[order], sizes, steps))
        assert sorted(epochs["even"]) == sorted(epochs["shuffled"])  # the same batches, in another order
    # step k of a task at (k + u) / s: a prefix ending at place x holds floor(x s) or floor(x s) + 1 of its steps
    assert max(gaps["even"]) < 2.0
    assert max(gaps["shuffled"]) >= 2.5  # a uniform shuffle lets a task fall behind its share (the test can fail)
    first = _sampler(batch_size=4, task_order="even")
    assert list(first) == list(_sampler(batch_size=4, task_order="even"))  # a function of (seed, epoch)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="homogeneous_ratio"):
        _sampler(homogeneous_ratio=0.0)
    with pytest.raises(ValueError, match="task_order"):
        _sampler(task_order="random")
    with pytest.raises(ValueError, match="same columns"):
        data = _datasets()
        data["C"] = data["C"].add_column("negative_1", ["n"] * 17)
        _sampler(data=data, homogeneous_ratio=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Epochs (issue 16 item 8). The order is a function of (seed, epoch); an epoch that does not reach the sampler
# replays epoch 0. Installed stack (transformers 5.24, accelerate 1.15): in one process accelerate's
# DataLoaderShard.set_epoch reaches the sampler; with several processes it stops at BatchSamplerShard, and
# transformers 5.24's trainer reaches one level deeper, which is not enough on a resume inside an epoch
# (SkipBatchSampler -> BatchSamplerShard -> sampler). SamplerEpochCallback walks the whole chain.
# ---------------------------------------------------------------------------------------------------------------------

ROW_SIZES = {"A": 24, "B": 16}  # batch 4 x 2 processes: 3 + 2 = 5 steps per epoch


def _row_datasets() -> DatasetDict:
    """Every row carries its index in the ConcatDataset in ``label`` (which ST hands to the loss untouched)."""
    data, offset = {}, 0
    for task, n in ROW_SIZES.items():
        data[task] = Dataset.from_dict(
            {
                "anchor": [f"{task} query {i}" for i in range(n)],
                "positive": [f"{task} passage {i}" for i in range(n)],
                "label": list(range(offset, offset + n)),
            }
        )
        offset += n
    return DatasetDict(data)


def _row_sampler(data: DatasetDict, world_size: int) -> TaskHomogeneousBatchSampler:
    concat = ConcatDataset(list(data.values()))
    children = [BatchSampler(SequentialSampler(d), 4, drop_last=False) for d in data.values()]
    return TaskHomogeneousBatchSampler(concat, children, seed=3, world_size=world_size)


def _rows_of_rank(epoch: int, world_size: int, rank: int) -> list[list[int]]:
    """The rows a rank must get in an epoch: a fresh sampler's global order, batch i to rank i % world_size."""
    sampler = _row_sampler(_row_datasets(), world_size)
    sampler.set_epoch(epoch)
    return list(sampler)[rank::world_size]


def _labels(batch: list[dict]) -> list[int]:
    return [row["label"] for row in batch]


def _sharded_loader(world_size: int, rank: int):
    """What ``accelerator.prepare`` builds on rank ``rank``: a DataLoaderShard over a BatchSamplerShard."""
    from accelerate.data_loader import BatchSamplerShard, prepare_data_loader

    data = _row_datasets()
    loader = DataLoader(
        ConcatDataset(list(data.values())), batch_sampler=_row_sampler(data, world_size), collate_fn=_labels
    )
    loader = prepare_data_loader(
        loader, num_processes=world_size, process_index=rank, put_on_device=False, even_batches=False
    )
    assert isinstance(loader.batch_sampler, BatchSamplerShard)
    return loader


def _begin_epoch(epoch: float, loader, tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    SamplerEpochCallback().on_epoch_begin(args, TrainerState(epoch=epoch), TrainerControl(), train_dataloader=loader)


def test_epoch_callback_reaches_the_sampler_behind_batch_sampler_shard_and_on_resume(tmp_path: Path) -> None:
    from accelerate import skip_first_batches

    for rank in range(2):
        loader = _sharded_loader(2, rank)
        _begin_epoch(0.0, loader, tmp_path)
        epoch0 = list(loader)
        loader.set_epoch(1)  # what accelerate and the trainer do; it stops at the BatchSamplerShard
        _begin_epoch(1.0, loader, tmp_path)
        epoch1 = list(loader)
        assert epoch0 == _rows_of_rank(0, 2, rank)
        assert epoch1 == _rows_of_rank(1, 2, rank) and epoch1 != epoch0
        # a resumed run: a fresh sampler, 1.4 epochs done, the trainer skips the first 2 batches of epoch 1
        loader = _sharded_loader(2, rank)
        _begin_epoch(1.4, loader, tmp_path)
        loader.set_epoch(1)
        assert list(skip_first_batches(loader, 2)) == _rows_of_rank(1, 2, rank)[2:]


def test_build_stage_registers_the_epoch_callback(tmp_path: Path) -> None:
    from kalm_st.recipe.build import build_stage
    from kalm_st.recipe.config import load_config

    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_smoke.yaml"
    run = build_stage(load_config(config, [f"output_dir={tmp_path}", "data.task_order=even"]))
    sampler = run.trainer.get_train_dataloader().batch_sampler
    assert isinstance(sampler, TaskHomogeneousBatchSampler)
    assert sampler.task_order == "even"  # the stage config's data.task_order reaches the sampler
    assert sum(isinstance(c, SamplerEpochCallback) for c in run.trainer.callback_handler.callbacks) == 1


# ---------------------------------------------------------------------------------------------------------------------
# A real 2-process gloo run: the ST trainer builds the sampler and accelerate shards its batches across the ranks;
# then two real trainings (2 epochs, and a resume inside epoch 1) record the rows the loss trained on.
# ---------------------------------------------------------------------------------------------------------------------


def _trained_rows(model_dir: str, out_dir: str) -> dict[str, list[list[int]]]:
    """Rows per step of a 2-epoch run and of a run resumed from its checkpoint at step 7 (inside epoch 1)."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    class RecordingLoss(MultipleNegativesRankingLoss):
        """The stock loss, recording the rows (``label`` = row index) of every batch it trains on."""

        def __init__(self, model: SentenceTransformer) -> None:
            super().__init__(model)
            self.seen: list[list[int]] = []

        def forward(self, sentence_features, labels):
            self.seen.append(labels.tolist())
            return super().forward(sentence_features, labels)

    def run(resume: str | None) -> list[list[int]]:
        model = SentenceTransformer(model_dir, device="cpu")
        loss = RecordingLoss(model)
        args = SentenceTransformerTrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=4, num_train_epochs=2, use_cpu=True, seed=3,
            multi_dataset_batch_sampler=TaskHomogeneousBatchSampler, report_to=[], ddp_backend="gloo",
            save_strategy="steps", save_steps=7, logging_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=_row_datasets(), loss=loss, callbacks=[SamplerEpochCallback()]
        )
        trainer.train(resume_from_checkpoint=resume)
        return loss.seen

    full = run(None)
    return {"full": full, "resumed": run(os.path.join(out_dir, "checkpoint-7"))}


def _worker(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true",
    )  # fmt: skip
    torch.set_num_threads(1)
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import MultiDatasetBatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(model_dir, device="cpu")
    data = _datasets()
    sizes = list(SIZES.values())
    results = {}
    for name, sampler in (
        ("kalm", TaskHomogeneousBatchSampler.configure(homogeneous_ratio=0.75)),
        ("st_proportional", MultiDatasetBatchSamplers.PROPORTIONAL),
    ):
        args = SentenceTransformerTrainingArguments(
            output_dir=os.path.join(out_dir, name), per_device_train_batch_size=4, use_cpu=True, seed=3,
            multi_dataset_batch_sampler=sampler, report_to=[], ddp_backend="gloo", prompts=build_training_prompts(data),
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model)
        )
        loader = trainer.get_train_dataloader()
        assert torch.distributed.get_world_size() == world_size
        # the indices this rank trains on at each step (accelerate's BatchSamplerShard: batch i -> rank i % ws)
        main_rows = 3 if name == "kalm" else 4
        step_tasks = [sorted({_task_of(i, sizes) for i in batch[:main_rows]}) for batch in loader.batch_sampler]
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, step_tasks)
        if name == "kalm":  # the first row's task is what the collator / loss see
            first_batch = next(iter(loader))
            assert first_batch["dataset_name"] == list(SIZES)[step_tasks[0][0]]
        results[name] = gathered
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, _trained_rows(model_dir, os.path.join(out_dir, "epochs")))
    results["epochs"] = gathered
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_run(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from kalm_st import build_model

    folder = tmp_path_factory.mktemp("gloo-run")
    model_dir = folder / "model"
    build_model(tiny_qwen_dir, dtype="float32", device="cpu").save(str(model_dir))
    mp.spawn(_worker, args=(2, free_port(), str(model_dir), str(folder)), nprocs=2, join=True)
    return torch.load(folder / "result.pt")


def test_one_task_per_global_batch_in_a_real_2_process_gloo_run(gloo_run: dict) -> None:
    rank0, rank1 = gloo_run["kalm"]
    assert len(rank0) == len(rank1) == 40 // 6 + 24 // 6 + 17 // 6  # same step count on both ranks
    for tasks0, tasks1 in zip(rank0, rank1, strict=True):
        assert len(tasks0) == 1 and tasks0 == tasks1  # one task per global batch on every rank
    # the control: sentence-transformers' own multi-dataset sampler is not rank-aware
    st0, st1 = gloo_run["st_proportional"]
    assert any(a != b for a, b in zip(st0, st1, strict=False))


def test_real_trainer_reshuffles_epochs_and_resumes_on_the_same_rows(gloo_run: dict) -> None:
    steps = 5
    for rank, record in enumerate(gloo_run["epochs"]):
        # the batches the trainer fed the loss are epochs 0 and 1 of a fresh sampler, sharded
        assert record["full"] == _rows_of_rank(0, 2, rank) + _rows_of_rank(1, 2, rank)
        assert record["full"][:steps] != record["full"][steps:]  # epoch 1 is reshuffled
        assert record["resumed"] == record["full"][7:]  # the resumed run trains the rows the full run trained
    for epoch in range(2):  # every row once per epoch over both ranks
        batches = [b for record in gloo_run["epochs"] for b in record["full"][epoch * steps : (epoch + 1) * steps]]
        assert sorted(i for b in batches for i in b) == list(range(sum(ROW_SIZES.values())))
