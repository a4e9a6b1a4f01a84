"""Run MTEB on a sentence-transformers model with KaLM instructions applied per task and per side.

The instructions come from one table, :mod:`kalm_st.instructions`. A kalm-st model carries it in ``model.prompts``
(``build_model`` installs it), so the default ``instructions="model"`` uses what the model ships with; ``"kalm"``
applies the table to a model that lacks it, ``"none"`` evaluates without any prompt (reference models such as
all-MiniLM-L6-v2), and a mapping is used as given. Prompts are looked up by mteb (``"{task}-{side}"``, ``"{task}"``,
``"{type}-{side}"``, ``"{type}"``, ``"{side}"``) in :class:`InstructedEncoder`, a
:class:`mteb.models.SentenceTransformerEncoderWrapper` whose prompt table is set explicitly.

Results are written by mteb's own :class:`mteb.ResultCache` under ``output_dir`` (``results/{org__name}/{revision}/
{Task}.json``); each task's file is saved as soon as it finishes, and a rerun skips tasks already there. The folder is
keyed by the model's identity: ``org/name`` from the model's path (``local/soup-final``) and, unless a revision is
given, a fingerprint of its weights and prompts as the revision, so a second model evaluated into the same output
never reads the first one's scores; a folder that holds another model's results is refused (:data:`IDENTITY_FILE`).
Runs with a ``truncate_dim`` or non-default instructions are mteb "experiments" (``experiments/{kwargs}/``), so they
never overwrite the full-dimension results. Which data each task read (the whole test split, or a subset of it) is
recorded in :data:`PROVENANCE_FILE`, so a model card never labels a subset as the MTEB task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from mteb.models import ModelMeta, SentenceTransformerEncoderWrapper

from kalm_st.evaluation.meta import mteb_reading_st_meta
from kalm_st.evaluation.tasks import LOCAL_TASKS, resolve_tasks
from kalm_st.instructions import build_prompts
from kalm_st.io import check_output_path, write_text_atomic

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.results import ModelResult
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Instructions = Literal["model", "kalm", "none"] | Mapping[str, str]
NO_PROMPTS: dict[str, str] = {"query": "", "document": ""}
"""Explicit empty prompts: both sides get ``prompt=""`` so no prompt saved in the model leaks in."""
IDENTITY_FILE = "kalm_st_model.yaml"
"""In a model's results folder: the fingerprint and path of the model whose results it holds (YAML: mteb reads every
``*.json`` there as a task result)."""
PROVENANCE_FILE = "kalm_st_provenance.yaml"
"""In a model's results folder: per task, the data folder read and its sample counts against the MTEB task's."""


def resolve_prompts(model: SentenceTransformer, instructions: Instructions = "model") -> dict[str, str]:
    """The prompt table an evaluation uses (see the module docstring for the modes)."""
    if isinstance(instructions, Mapping):
        return dict(instructions)
    if instructions == "model":
        return {k: v for k, v in (model.prompts or {}).items() if v is not None} or dict(NO_PROMPTS)
    if instructions == "kalm":
        return build_prompts()
    if instructions == "none":
        return dict(NO_PROMPTS)
    raise ValueError(f"instructions must be 'model', 'kalm', 'none' or a mapping, got {instructions!r}")


class InstructedEncoder(SentenceTransformerEncoderWrapper):
    """mteb's sentence-transformers wrapper with an explicit prompt table.

    The stock wrapper validates ``model.prompts`` against mteb's task registry and drops keys of tasks it does not
    know (our offline ``TrecQA*`` tasks); here the table is taken as given, and mteb's own ``get_prompt_name``
    resolves it per task and side. The model's ``prompts`` attribute is left untouched.

    Args:
        model: The sentence-transformers model.
        prompts: Prompt table (``"{task}"``, ``"{task}-document"``, ``"{type}"``, ``"query"``, ...).
        model_meta: mteb metadata (names the results folder); default ``ModelMeta.from_sentence_transformer_model``.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        prompts: Mapping[str, str] | None = None,
        model_meta: ModelMeta | None = None,
    ) -> None:
        saved = model.prompts
        model.prompts = {}  # keep the stock validation (and its warnings) off the table; restored below
        try:
            with mteb_reading_st_meta():  # the stock wrapper builds its own ModelMeta from the model
                super().__init__(model)
        finally:
            model.prompts = saved
        self.model_prompts = dict(prompts) if prompts else dict(NO_PROMPTS)
        if model_meta is not None:
            self.mteb_model_meta = model_meta


@dataclass
class EvaluationRun:
    """What :func:`evaluate_model` did: mteb's ``ModelResult`` plus where the files are."""

    result: ModelResult
    results_dir: Path
    """Folder of this model's (and experiment's) ``{Task}.json`` files."""
    model_meta: ModelMeta
    scores: dict[str, float] = field(default_factory=dict)
    """Task name -> main score (0-1, mteb's scale)."""
    seconds: float = 0.0
    fingerprint: str = ""
    """:func:`model_fingerprint` of the evaluated model."""
    reused: list[str] = field(default_factory=list)
    """Tasks whose scores were read back from an earlier run of this same model (not recomputed)."""


def model_fingerprint(model: SentenceTransformer) -> str:
    """16 hex digits identifying what an evaluation measures: every weight (name, dtype, shape, bytes), the prompt
    table and the maximum sequence length. Two saves of the same weights agree; any changed weight differs."""
    import torch

    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps([model.prompts or {}, model.max_seq_length], sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_GENERIC_FOLDER_NAMES = ("final", "model", "best", "last")


def default_model_name(model: SentenceTransformer, path: str | os.PathLike[str] | None = None) -> str:
    """``org/name`` for the results folder: a path's folder name (with its parent's when the name says nothing by
    itself: ``outputs/run/soup/final`` -> ``local/soup-final``), else the model card's name, else ``local/unnamed``."""
    if path is not None and Path(os.fspath(path)).exists():
        folder = Path(os.fspath(path)).resolve()
        name = folder.name
        if (name in _GENERIC_FOLDER_NAMES or name.startswith("checkpoint-")) and folder.parent.name:
            name = f"{folder.parent.name}-{name}"
        return f"local/{name}"
    name = getattr(model.model_card_data, "model_name", None) or getattr(model.model_card_data, "model_id", None)
    if name:
        return name if "/" in name else f"local/{name}"
    if path is not None:  # a Hub id
        return os.fspath(path) if "/" in os.fspath(path) else f"local/{os.fspath(path)}"
    return "local/unnamed-model"


def _claim_results_folder(folder: Path, fingerprint: str, source: str, overwrite: bool) -> None:
    """Refuse a results folder that holds another model's results (or clear it with ``overwrite``); record ours."""
    identity = folder / IDENTITY_FILE
    if identity.is_file():
        recorded = yaml.safe_load(identity.read_text(encoding="utf8")) or {}
        if recorded.get("fingerprint") != fingerprint:
            if not overwrite:
                raise ValueError(
                    f"{folder} holds the results of another model ({recorded.get('model')}, fingerprint "
                    f"{recorded.get('fingerprint')}; this one is {source}, fingerprint {fingerprint}): give another "
                    "--output or --model-name, or --overwrite to replace them."
                )
            for stale in folder.rglob("*.json"):
                stale.unlink()
    elif folder.is_dir() and any(p.name != "model_meta.json" for p in folder.glob("*.json")) and not overwrite:
        raise ValueError(
            f"{folder} holds results of an unknown model (written before kalm-st recorded model fingerprints): give "
            "another --output or --model-name, or --overwrite to replace them."
        )
    write_text_atomic(identity, yaml.safe_dump({"fingerprint": fingerprint, "model": source}))


def task_provenance(task: AbsTask) -> dict[str, Any] | None:
    """What data a local task read: its folder and, per split, its sample count against the MTEB task's (``full``
    only when every count matches). ``None`` for a task that is not a local one or did not load data this run."""
    name = task.metadata.name
    counts = getattr(task, "sample_counts", None)
    if name not in LOCAL_TASKS or counts is None:
        return None
    import mteb

    try:
        official = dict(mteb.get_task(name).metadata.n_samples or {})
        in_mteb = True
    except KeyError:
        official, in_mteb = {}, False
    counts = {split: n for split, n in counts.items() if split in official or split in task.metadata.eval_splits}
    return {
        "data": str(getattr(task, "data_folder_read", "")),
        "in_mteb": in_mteb,
        "samples": counts,
        "mteb_samples": {split: official[split] for split in counts if split in official},
        "full": in_mteb and bool(counts) and all(official.get(split) == n for split, n in counts.items()),
    }


def _record_provenance(folder: Path, tasks: Sequence[AbsTask]) -> None:
    path = folder / PROVENANCE_FILE
    recorded = (yaml.safe_load(path.read_text(encoding="utf8")) or {}) if path.is_file() else {}
    for task in tasks:
        entry = task_provenance(task)
        if entry is not None:
            recorded[task.metadata.name] = entry
    if recorded:
        write_text_atomic(path, yaml.safe_dump(recorded))


def evaluate_model(
    model: str | os.PathLike[str] | SentenceTransformer,
    tasks: Sequence[str | AbsTask] | None = None,
    *,
    output_dir: str | os.PathLike[str],
    benchmark: str | None = None,
    instructions: Instructions = "model",
    truncate_dim: int | None = None,
    batch_size: int = 32,
    data_dir: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    revision: str | None = None,
    model_meta: ModelMeta | None = None,
    overwrite: bool = False,
    device: str | None = None,
    show_progress_bar: bool = False,
) -> EvaluationRun:
    """Evaluate ``model`` on MTEB tasks and write mteb's results layout under ``output_dir``.

    Args:
        model: A model folder (or Hub id when online) or a loaded ``SentenceTransformer``.
        tasks: Task names (``"local"`` = every offline task of :mod:`kalm_st.evaluation.tasks`; other names are
            mteb's), or task objects. Exclusive with ``benchmark``.
        output_dir: Results root (mteb ``ResultCache``); created if needed. Never ``~/.cache``.
        benchmark: An mteb benchmark name (e.g. ``"MTEB(eng, v2)"``), or ``"local"``.
        instructions: ``"model"`` (the model's own prompts), ``"kalm"`` (kalm-st's table), ``"none"``, or a table.
        truncate_dim: Matryoshka dimension; recorded as an mteb experiment so full-dim results are kept apart.
        batch_size: Encoding batch size.
        data_dir: Folder with the offline data (``stsb/``, ``sick/``, ``banking77/``, ``trecqa/``); default the
            bundled ``data/`` per task, else ``$KALM_SHARED_DATA``, else ``../shared/data``.
        model_name: ``org/name`` of the results folder; default from the model card or the folder name.
        revision: Revision recorded in the results; default ``"local"`` for a local model.
        model_meta: Full mteb metadata (e.g. :func:`kalm_st.evaluation.meta.build_model_meta`); overrides the two above.
        overwrite: Rerun tasks whose results exist (default: skip them, which resumes a crashed run).
        device: Torch device when ``model`` is a path.
        show_progress_bar: Show mteb's and sentence-transformers' progress bars.

    Returns:
        An :class:`EvaluationRun` with mteb's ``ModelResult`` and the main scores by task.
    """
    import mteb

    if (tasks is None) == (benchmark is None):
        raise ValueError("Give either `tasks` or `benchmark`.")
    output = check_output_path(output_dir, folder=True, name="Output directory")
    if benchmark is not None:
        task_objects = resolve_tasks(benchmark=benchmark, data_dir=data_dir)
    else:
        names = [t for t in tasks if isinstance(t, str)]  # type: ignore[union-attr]
        task_objects = resolve_tasks(names, data_dir=data_dir) if names else []
        task_objects += [t for t in tasks if not isinstance(t, str)]  # type: ignore[union-attr]

    path = None
    if isinstance(model, (str, os.PathLike)):
        path = model
        from kalm_st.model_source import resolve_model

        model = resolve_model(model, hub="embedder", device=device)
    st_model: SentenceTransformer = model  # type: ignore[assignment]
    fingerprint = model_fingerprint(st_model)

    if truncate_dim is not None:
        full_dim = st_model.get_embedding_dimension()
        if not 0 < truncate_dim <= (full_dim or truncate_dim):
            raise ValueError(f"truncate_dim must be in 1..{full_dim}, got {truncate_dim}")

    if model_meta is None:
        from kalm_st.evaluation.meta import build_model_meta

        model_meta = build_model_meta(
            st_model,
            name=model_name or default_model_name(st_model, path),
            revision=revision or fingerprint,
            matryoshka=False,
            reference=None,
            license=None,
        )
    experiment: dict[str, Any] = dict(model_meta.experiment_kwargs or {})
    if truncate_dim is not None:
        experiment["truncate_dim"] = truncate_dim
    if not (isinstance(instructions, str) and instructions == "model"):
        experiment["instructions"] = instructions if isinstance(instructions, str) else "custom"
    if experiment:
        model_meta = model_meta.model_copy(update={"experiment_kwargs": experiment})

    prompts = resolve_prompts(st_model, instructions)
    encoder = InstructedEncoder(st_model, prompts, model_meta=model_meta)
    cache = mteb.ResultCache(output)
    results_dir = cache.get_task_result_path("x", model_meta).parent
    source = (
        os.fspath(Path(os.fspath(path)).resolve()) if path is not None and Path(path).exists() else str(path or "")
    )
    _claim_results_folder(results_dir, fingerprint, source or model_meta.name, overwrite)
    task_names = [t.metadata.name for t in task_objects]
    reused = [] if overwrite else [t for t in task_names if (results_dir / f"{t}.json").is_file()]
    if reused:
        logger.warning(
            "%s: reusing the results of %s from an earlier run of this model (fingerprint %s; --overwrite recomputes)",
            results_dir,
            ", ".join(reused),
            fingerprint,
        )
    start = time.perf_counter()
    with _truncated(st_model, truncate_dim):
        result = mteb.evaluate(
            encoder,
            task_objects,
            cache=cache,
            overwrite_strategy="always" if overwrite else "only-missing",
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
            show_progress_bar=show_progress_bar,
        )
    seconds = time.perf_counter() - start
    _record_provenance(results_dir, task_objects)
    scores = {r.task_name: float(r.get_score()) for r in result.task_results}
    for name, score in scores.items():
        logger.info("%s: %.2f", name, 100 * score)
    return EvaluationRun(
        result=result,
        results_dir=results_dir,
        model_meta=model_meta,
        scores=scores,
        seconds=seconds,
        fingerprint=fingerprint,
        reused=reused,
    )


@contextmanager
def _truncated(model: SentenceTransformer, truncate_dim: int | None) -> Iterator[None]:
    """Set ``model.truncate_dim`` for the run (sentence-transformers truncates in ``encode``), then restore it."""
    if truncate_dim is None:
        yield
        return
    saved = model.truncate_dim
    model.truncate_dim = truncate_dim
    try:
        yield
    finally:
        model.truncate_dim = saved


__all__ = [
    "IDENTITY_FILE",
    "NO_PROMPTS",
    "PROVENANCE_FILE",
    "EvaluationRun",
    "InstructedEncoder",
    "default_model_name",
    "evaluate_model",
    "model_fingerprint",
    "resolve_prompts",
    "task_provenance",
]
