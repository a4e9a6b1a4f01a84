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
- With r < 1 the fill rows of a step are drawn once for the whole world batch, without replacement, and split over
  its ``world_size`` batches: under ``gather_across_devices`` a row on two ranks would be its own copy's false
  negative.
- The epoch (``set_epoch``) must reach the sampler through accelerate's ``BatchSamplerShard`` (several processes),
  which has no ``set_epoch``. The trainer of transformers 5.24 reaches one level below the dataloader's batch sampler,
  which is not enough on a resume inside an epoch (accelerate's ``SkipBatchSampler`` adds a level: the resumed epoch
  would replay epoch 0's order); a trainer without that code never reaches it. :class:`SamplerEpochCallback` sets
  it at every epoch start whatever the wrapping; register it with the trainer (kalm-st's ``build_stage`` does).
- ``world_size`` is read from ``torch.distributed`` when the sampler is built (the trainer builds it after the
  process group exists); pass it explicitly to override. Gradient accumulation needs nothing special: each
  micro-step is a global batch of one task.

The per-dataset ``batch_samplers`` ST passes in only provide the batch size; shuffling is done here over indices.
Per-row state (lengths, shuffled indices, batches) is held in int64 tensors, never in Python lists of ints (about
36 bytes a row), so that an epoch over hundreds of millions of rows fits in memory.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kalm_st.data.positive_groups import GroupStarts, draw_members, load_starts

logger = logging.getLogger(__name__)


def _dataset_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


_TEXT_DTYPES = ("string", "large_string")  # pandas writes large_string; both are UTF-8 in Arrow
_NOT_TEXT = ("label", "dataset_name")


def text_lengths(dataset: Any, batch_size: int = 1 << 20) -> np.ndarray:
    """Characters per row summed over the text columns: a cheap, tokenizer-free length key.

    Counts Unicode code points (Python's ``len``) with ``pyarrow.compute.utf8_length`` over the dataset's Arrow
    data, in batches of ``batch_size`` rows (bounded memory, an indices mapping from ``select``/``shuffle`` is
    followed). Text columns are the ``string`` and ``large_string`` columns other than ``label`` and
    ``dataset_name``; a null cell counts 0. Returns an ``int64`` array of ``len(dataset)`` entries.
    """
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(dataset, "with_format"):
        raise TypeError(
            f"text_lengths needs a datasets.Dataset, got {type(dataset).__name__}; pass lengths= to the sampler"
        )
    columns = [c for c, f in features.items() if c not in _NOT_TEXT and getattr(f, "dtype", None) in _TEXT_DTYPES]
    lengths = np.zeros(len(dataset), dtype=np.int64)
    if not columns or len(dataset) == 0:
        return lengths
    start = 0
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size):
        stop = start + table.num_rows
        for column in table.columns:
            lengths[start:stop] += pc.fill_null(pc.utf8_length(column), 0).to_numpy()
        start = stop
    return lengths


def _first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """``values`` without repeats, each kept at its first position (order preserved)."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel())
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return values[first.sort().values]


def _sort_in_windows(order: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """``order`` sorted by ``keys`` inside consecutive windows of ``window`` entries (stable: ties keep order)."""
    full = order.numel() // window * window
    head = order[:full].view(-1, window)
    head = head.gather(1, torch.sort(keys[:full].view(-1, window), dim=1, stable=True).indices).reshape(-1)
    tail = order[full:][torch.sort(keys[full:], stable=True).indices]
    return torch.cat([head, tail])


class TaskHomogeneousBatchSampler(MultiDatasetDefaultBatchSampler):
    """Every global batch (``world_size`` consecutive batches) from one task; rank-aware and deterministic.

    Args:
        dataset: The ``ConcatDataset`` of the task datasets (built by ST from a ``DatasetDict``).
        batch_samplers: One batch sampler per task (from ST); only their ``batch_size`` is used.
        generator: Ignored beyond API compatibility: a private generator seeded with ``seed + epoch`` is used.
        seed: Seed; the order of epoch ``e`` is a function of ``(seed, e)`` only.
        homogeneous_ratio: Share r of each batch from the step's task; the other ``batch_size - ceil(r *
            batch_size)`` rows are drawn from the other tasks (uniformly over their rows), without replacement over
            the whole world batch of the step, so no row is on two ranks at once. 1.0 (default) gives fully
            homogeneous batches.
        world_size: Number of processes sharing a step; default: ``torch.distributed``'s world size (1 if not
            initialised).
        length_aware: Group rows of similar length into the same batch (less padding): each task's shuffled rows
            are cut into windows of ``length_window`` global batches, sorted by length inside the window, then
            batched; the order of the steps stays random.
        length_window: Window size in global batches for ``length_aware``.
        task_order: How the steps of the tasks are ordered in an epoch: ``"shuffled"`` (default: a uniform shuffle of
            all steps) or ``"even"``: step ``k`` of a task with ``s`` steps is placed at ``(k + u) / s`` with ``u``
            uniform in [0, 1), so every prefix of the epoch holds each task's share of its steps to within about one step
            (the order stays random). A run of ``max_steps`` shorter than an epoch then trains each task in
            proportion; with ``"shuffled"`` a short run draws its task mix (16 steps of three tasks: one task's
            share can be half or double its proportion).
        lengths: Length key per row of the ``ConcatDataset`` (e.g. token counts; a sequence, numpy array or
            tensor of integers); default: :func:`text_lengths`.
        task_names: Names of the tasks in order (for messages and ``positive_groups``).
        positive_groups: Task name -> the first row of each group of rows that share a query (one row per positive;
            an int64 array or a ``.npy`` path, from :func:`kalm_st.data.positive_groups.split_positive_groups`). Such
            a task is sampled by group: each epoch takes one row of every group, drawn by a hash of ``(seed, epoch,
            group)``, so a query with several positives trains one of them per epoch. Rows drawn to fill mixed
            batches (r < 1) are drawn over rows.

    Per epoch, task ``t`` with ``n_t`` rows (groups, for a task with ``positive_groups``) gives
    ``floor(n_t / (ceil(r * batch_size) * world_size))`` steps; the steps of all tasks are shuffled together (larger
    tasks are drawn more often, as ST's proportional sampler).
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
        task_order: Literal["shuffled", "even"] = "shuffled",
        lengths: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        task_names: Sequence[str] | None = None,
        positive_groups: Mapping[str, GroupStarts] | None = None,
    ) -> None:
        super().__init__(dataset, batch_samplers, generator=generator, seed=seed if seed is not None else 0)
        if not 0.0 < homogeneous_ratio <= 1.0:
            raise ValueError(f"homogeneous_ratio must be in (0, 1], got {homogeneous_ratio}")
        self.homogeneous_ratio = float(homogeneous_ratio)
        self.world_size = int(world_size) if world_size is not None else _dataset_world_size()
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.length_aware = length_aware
        if task_order not in ("shuffled", "even"):
            raise ValueError(f"task_order must be 'shuffled' or 'even', got {task_order!r}")
        self.task_order = task_order
        self.length_window = max(1, int(length_window))
        self.sizes = [len(d) for d in dataset.datasets]
        self.offsets = [0, *accumulate(self.sizes)][:-1]
        self.task_names = list(task_names) if task_names is not None else [str(i) for i in range(len(self.sizes))]
        unknown = sorted(set(positive_groups or {}) - set(self.task_names))
        if unknown:
            raise ValueError(f"positive_groups names task(s) {unknown} not among the tasks {self.task_names}")
        self.group_starts: list[np.ndarray | None] = [
            load_starts(positive_groups[name], n, f"task {name!r}") if name in (positive_groups or {}) else None
            for name, n in zip(self.task_names, self.sizes, strict=True)
        ]
        # what an epoch samples per task: its groups where it has them, else its rows
        self.units = [
            n if starts is None else len(starts) for n, starts in zip(self.sizes, self.group_starts, strict=True)
        ]
        self.main_size = math.ceil(self.homogeneous_ratio * self.batch_size)
        self.fill_size = self.batch_size - self.main_size
        self.lengths: torch.Tensor | None = None
        if lengths is not None:
            self.lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
            if self.lengths.ndim != 1 or self.lengths.numel() != sum(self.sizes):
                raise ValueError(f"lengths has shape {tuple(self.lengths.shape)} for {sum(self.sizes)} rows")
        elif self.length_aware:
            self.lengths = torch.from_numpy(np.concatenate([text_lengths(d) for d in dataset.datasets]))
        global_rows = self.main_size * self.world_size
        self.steps_per_task = [n // global_rows for n in self.units]
        for name, n, steps in zip(self.task_names, self.units, self.steps_per_task, strict=True):
            if steps == 0:
                logger.warning(
                    "TaskHomogeneousBatchSampler: task %r has %d rows (queries), fewer than one global batch (%d x %d "
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
        needed = self.fill_size * self.world_size
        if smallest_rest < needed:
            raise ValueError(
                f"homogeneous_ratio={self.homogeneous_ratio} needs {self.fill_size} distinct rows from other tasks "
                f"per batch, {needed} per world batch of {self.world_size} processes, but only {smallest_rest} "
                "exist for some task"
            )

    def _task_batches(self, task: int, generator: torch.Generator) -> torch.Tensor:
        """The main rows of each batch of one task (global indices): ``(steps * world_size, main_size)``."""
        n, offset = self.units[task], self.offsets[task]
        usable = self.steps_per_task[task] * self.world_size * self.main_size
        order = torch.randperm(n, generator=generator)[:usable]
        starts = self.group_starts[task]
        if starts is not None:  # a permutation of the groups -> the row each group trains this epoch
            members = draw_members(starts, self.sizes[task], int(self.seed), int(self.epoch))
            order = torch.from_numpy(members)[order]
        if self.length_aware and self.lengths is not None:
            window = self.length_window * self.world_size * self.main_size
            order = _sort_in_windows(order, self.lengths[offset + order], window)
        batches = (order + offset).view(-1, self.main_size)
        if self.length_aware:
            # keep global batches (world_size consecutive batches) together; shuffle their order within the task
            groups = batches.view(-1, self.world_size, self.main_size)
            batches = groups[torch.randperm(groups.shape[0], generator=generator)].reshape(-1, self.main_size)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(int(self.seed) + int(self.epoch))
        per_task = [self._task_batches(t, generator) for t in range(len(self.sizes))]
        steps = torch.tensor(self.steps_per_task)
        step_tasks = torch.repeat_interleave(torch.arange(len(self.sizes)), steps)
        if self.task_order == "even":  # step k of a task with s steps at (k + u) / s: prefixes hold each task's share
            within = torch.arange(step_tasks.numel()) - torch.repeat_interleave(torch.cumsum(steps, 0) - steps, steps)
            places = (within + torch.rand(step_tasks.numel(), generator=generator, dtype=torch.float64)) / steps[
                step_tasks
            ].to(torch.float64)
            step_tasks = step_tasks[torch.argsort(places, stable=True)]
        else:
            step_tasks = step_tasks[torch.randperm(step_tasks.numel(), generator=generator)]
        cursors = [0] * len(self.sizes)
        for task in step_tasks.tolist():
            rows = per_task[task][cursors[task] : cursors[task] + self.world_size]  # (world_size, main_size)
            cursors[task] += self.world_size
            if self.fill_size:
                rows = torch.cat([rows, self._fill(task, generator).view(self.world_size, self.fill_size)], dim=1)
            yield from rows.tolist()

    def _fill(self, task: int, generator: torch.Generator) -> torch.Tensor:
        """``fill_size * world_size`` distinct rows of the other tasks for one step, uniformly without replacement."""
        needed = self.fill_size * self.world_size
        others = sum(self.sizes) - self.sizes[task]
        if 4 * needed >= others:  # a large share of the pool: one permutation is cheaper than rejection
            picks = torch.randperm(others, generator=generator)[:needed]
        else:  # draw with replacement, keep first occurrences (a uniform ordered sample without replacement)
            picks = torch.empty(0, dtype=torch.long)
            while picks.numel() < needed:
                drawn = torch.randint(others, (2 * needed,), generator=generator)
                picks = _first_occurrences(torch.cat([picks, drawn]))[:needed]
        start = self.offsets[task]
        return torch.where(picks < start, picks, picks + self.sizes[task])  # skip over the step task's rows

    def __len__(self) -> int:
        return sum(self.steps_per_task) * self.world_size


class SamplerEpochCallback(TrainerCallback):
    """Sets the epoch on the train dataloader and on every batch sampler it wraps, at the start of each epoch.

    The order of :class:`TaskHomogeneousBatchSampler` is a function of ``(seed, epoch)``, so an epoch that never
    reaches it replays epoch 0's order. accelerate's ``DataLoaderShard.set_epoch`` stops at its ``BatchSamplerShard``
    (multi-process) and at the ``SkipBatchSampler`` of a resumed epoch; transformers 5.24's trainer reaches one level
    deeper (not enough on a multi-process resume), a trainer without that code not at all. This callback walks the
    public ``batch_sampler`` chain (DataLoader -> BatchSamplerShard -> sampler) and calls
    ``set_epoch(floor(state.epoch))`` on each object that has it; ``state.epoch`` is the epoch being started
    (fractional when resuming inside it). The trainer calls ``on_epoch_begin`` before it wraps the loader to skip the
    trained batches of a resumed epoch; the wrapper iterates the same sampler object.

    Example::

        trainer = SentenceTransformerTrainer(..., args=SentenceTransformerTrainingArguments(
            multi_dataset_batch_sampler=TaskHomogeneousBatchSampler, ...), callbacks=[SamplerEpochCallback()])
    """

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if train_dataloader is None:
            return
        epoch = math.floor(state.epoch or 0)
        for target in _epoch_targets(train_dataloader):
            target.set_epoch(epoch)


def _epoch_targets(dataloader: Any, max_objects: int = 16) -> list[Any]:
    """The dataloader and the (batch) samplers below it that have ``set_epoch``, outermost first."""
    found: list[Any] = []
    queue, seen = [dataloader], set()
    while queue and len(seen) < max_objects:
        obj = queue.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if callable(getattr(obj, "set_epoch", None)):
            found.append(obj)
        queue.append(getattr(obj, "batch_sampler", None))  # DataLoader, SkipBatchSampler, BatchSamplerShard
        inner = getattr(obj, "sampler", None)  # accelerate may hold a batch sampler as the loader's ``sampler``
        if isinstance(inner, BatchSampler):
            queue.append(inner)
    return found


__all__ = ["SamplerEpochCallback", "TaskHomogeneousBatchSampler", "text_lengths"]
