"""Task-homogeneous, rank-aware multi-dataset batch sampler (METHOD.md §4).

KaLM draws every *global* batch (the batches all ranks train on in one step) from a single task, so instructions
and in-batch / cross-device negatives stay within a task; ``homogeneous_ratio`` r lets (1 - r) of each batch come
from other tasks.

How it plugs into sentence-transformers (6.2) and accelerate, and why it is built this way:

- For a ``DatasetDict`` training set, ``SentenceTransformerTrainer._build_dataloader`` concatenates the datasets
  into a ``ConcatDataset`` (in the dict's order), builds one batch sampler per dataset, and calls
  ``args.multi_dataset_batch_sampler(dataset, batch_samplers=..., generator=..., seed=args.seed)`` (a
  ``MultiDatasetDefaultBatchSampler`` subclass or any callable). Pass :class:`TaskHomogeneousBatchSampler` itself,
  or :meth:`TaskHomogeneousBatchSampler.configure` (a ``functools.partial``) to set its options.
- Every rank builds the same sampler and iterates the same *global* sequence of batches (same seed and epoch, no
  rank-dependent randomness). ``accelerator.prepare`` then wraps it in ``BatchSamplerShard`` (``split_batches=False``)
  which hands batch *i* to rank *i mod world_size*. This sampler therefore emits batches in groups of
  ``world_size`` consecutive batches from the same task: step *s* of every rank comes from group *s*.
- Only full batches are emitted and the number of batches is a multiple of ``world_size``: ``BatchSamplerShard``
  drops a group whose last batch is short and ST sets ``even_batches=False``, so anything else could leave ranks with
  different step counts (a hang in cross-device gathers) or different batch sizes.
- ST's data collator takes the batch's task (for the per-task ``prompts`` and per-task loss) from the batch's
  *first* row: the rows of the step's task come first in every batch. Mixed batches (r < 1) therefore use the
  step task's prompts and loss for every row; mixing requires tasks with the same columns.
- ``world_size`` is read from ``torch.distributed`` when the sampler is built (the trainer builds it after the
  process group exists); pass it explicitly to override. Gradient accumulation needs nothing special: each
  micro-step is a global batch of one task.

The per-dataset ``batch_samplers`` ST passes in only provide the batch size; shuffling is done here over indices.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Any

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset

logger = logging.getLogger(__name__)


def _dataset_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def text_lengths(dataset: Any) -> list[int]:
    """Characters per row summed over the string columns: a cheap, tokenizer-free length key."""
    columns = [
        c
        for c in dataset.column_names
        if c not in ("label", "dataset_name") and getattr(dataset.features.get(c), "dtype", None) == "string"
    ]
    lengths = [0] * len(dataset)
    for column in columns:
        for i, text in enumerate(dataset.select_columns([column])[column]):
            lengths[i] += len(text) if isinstance(text, str) else 0
    return lengths


class TaskHomogeneousBatchSampler(MultiDatasetDefaultBatchSampler):
    """Every global batch (``world_size`` consecutive batches) from one task; rank-aware and deterministic.

    Args:
        dataset: The ``ConcatDataset`` of the task datasets (built by ST from a ``DatasetDict``).
        batch_samplers: One batch sampler per task (from ST); only their ``batch_size`` is used.
        generator: Ignored beyond API compatibility: a private generator seeded with ``seed + epoch`` is used.
        seed: Seed; the order of epoch ``e`` is a function of ``(seed, e)`` only.
        homogeneous_ratio: Share r of each batch from the step's task; the other ``batch_size - ceil(r *
            batch_size)`` rows are drawn without replacement from the other tasks (uniformly over their rows).
            1.0 (default) gives fully homogeneous batches.
        world_size: Number of processes sharing a step; default: ``torch.distributed``'s world size (1 if not
            initialised).
        length_aware: Group rows of similar length into the same batch (less padding): each task's shuffled rows
            are cut into windows of ``length_window`` global batches, sorted by length inside the window, then
            batched; the order of the steps stays random.
        length_window: Window size in global batches for ``length_aware``.
        lengths: Length key per row of the ``ConcatDataset`` (e.g. token counts); default: :func:`text_lengths`.
        task_names: Names of the tasks in order (only for messages).

    Per epoch, task ``t`` with ``n_t`` rows gives ``floor(n_t / (ceil(r * batch_size) * world_size))`` steps; the
    steps of all tasks are shuffled together (larger tasks are drawn more often, as ST's proportional sampler).
    """

    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        homogeneous_ratio: float = 1.0,
        world_size: int | None = None,
        length_aware: bool = False,
        length_window: int = 16,
        lengths: Sequence[int] | None = None,
        task_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(dataset, batch_samplers, generator=generator, seed=seed if seed is not None else 0)
        if not 0.0 < homogeneous_ratio <= 1.0:
            raise ValueError(f"homogeneous_ratio must be in (0, 1], got {homogeneous_ratio}")
        self.homogeneous_ratio = float(homogeneous_ratio)
        self.world_size = int(world_size) if world_size is not None else _dataset_world_size()
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.length_aware = length_aware
        self.length_window = max(1, int(length_window))
        self.sizes = [len(d) for d in dataset.datasets]
        self.offsets = [0, *accumulate(self.sizes)][:-1]
        self.task_names = list(task_names) if task_names is not None else [str(i) for i in range(len(self.sizes))]
        self.main_size = math.ceil(self.homogeneous_ratio * self.batch_size)
        self.fill_size = self.batch_size - self.main_size
        if lengths is not None and len(lengths) != sum(self.sizes):
            raise ValueError(f"lengths has {len(lengths)} entries for {sum(self.sizes)} rows")
        self.lengths = list(lengths) if lengths is not None else None
        if self.length_aware and self.lengths is None:
            self.lengths = [n for d in dataset.datasets for n in text_lengths(d)]
        global_rows = self.main_size * self.world_size
        self.steps_per_task = [n // global_rows for n in self.sizes]
        for name, n, steps in zip(self.task_names, self.sizes, self.steps_per_task, strict=True):
            if steps == 0:
                logger.warning(
                    "TaskHomogeneousBatchSampler: task %r has %d rows, fewer than one global batch (%d x %d "
                    "processes); it is never sampled",
                    name,
                    n,
                    self.main_size,
                    self.world_size,
                )
        if self.fill_size:
            self._check_mixable()

    @classmethod
    def configure(cls, **options: Any) -> Callable[..., TaskHomogeneousBatchSampler]:
        """``functools.partial(cls, **options)`` for ``SentenceTransformerTrainingArguments(multi_dataset_batch_sampler=
        TaskHomogeneousBatchSampler.configure(homogeneous_ratio=0.9))``."""
        return functools.partial(cls, **options)

    def _check_mixable(self) -> None:
        layouts = {tuple(getattr(d, "column_names", ())) for d in self.dataset.datasets}
        if len(layouts) > 1:
            raise ValueError(
                "homogeneous_ratio < 1 mixes rows of different tasks in a batch, which needs the same columns in "
                f"every task; got {sorted(layouts)}"
            )
        if len(self.sizes) < 2:
            raise ValueError("homogeneous_ratio < 1 needs at least two tasks")
        smallest_rest = min(sum(self.sizes) - n for n in self.sizes)
        if smallest_rest < self.fill_size:
            raise ValueError(
                f"homogeneous_ratio={self.homogeneous_ratio} needs {self.fill_size} rows from other tasks per batch, "
                f"but only {smallest_rest} exist for some task"
            )

    def _task_batches(self, task: int, generator: torch.Generator) -> list[list[int]]:
        """The main rows of each batch of one task (global indices), ``steps * world_size`` batches."""
        n, offset = self.sizes[task], self.offsets[task]
        order = torch.randperm(n, generator=generator).tolist()
        usable = self.steps_per_task[task] * self.world_size * self.main_size
        order = order[:usable]
        if self.length_aware and self.lengths is not None:
            window = self.length_window * self.world_size * self.main_size
            sorted_order: list[int] = []
            for start in range(0, len(order), window):
                chunk = order[start : start + window]
                sorted_order.extend(sorted(chunk, key=lambda i: self.lengths[offset + i]))
            order = sorted_order
        batches = [
            [offset + i for i in order[start : start + self.main_size]] for start in range(0, usable, self.main_size)
        ]
        if self.length_aware:
            # keep global batches (world_size consecutive batches) together; shuffle their order within the task
            groups = [batches[i : i + self.world_size] for i in range(0, len(batches), self.world_size)]
            perm = torch.randperm(len(groups), generator=generator).tolist()
            batches = [b for g in perm for b in groups[g]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(int(self.seed) + int(self.epoch))
        per_task = [self._task_batches(t, generator) for t in range(len(self.sizes))]
        step_tasks = [t for t, steps in enumerate(self.steps_per_task) for _ in range(steps)]
        step_tasks = [step_tasks[i] for i in torch.randperm(len(step_tasks), generator=generator).tolist()]
        cursors = [0] * len(self.sizes)
        for task in step_tasks:
            for _ in range(self.world_size):
                batch = per_task[task][cursors[task]]
                cursors[task] += 1
                if self.fill_size:
                    batch = batch + self._fill(task, generator)
                yield batch

    def _fill(self, task: int, generator: torch.Generator) -> list[int]:
        """``fill_size`` distinct rows drawn uniformly from the rows of the other tasks."""
        others = sum(self.sizes) - self.sizes[task]
        picks: list[int] = []
        seen: set[int] = set()
        while len(picks) < self.fill_size:
            for p in torch.randint(others, (2 * self.fill_size,), generator=generator).tolist():
                if p not in seen and len(picks) < self.fill_size:
                    seen.add(p)
                    picks.append(p)
        start, end = self.offsets[task], self.offsets[task] + self.sizes[task]
        return [p if p < start else p + (end - start) for p in picks]

    def __len__(self) -> int:
        return sum(self.steps_per_task) * self.world_size


__all__ = ["TaskHomogeneousBatchSampler", "text_lengths"]
