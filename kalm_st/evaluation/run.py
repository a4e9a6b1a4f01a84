"""Run MTEB on a sentence-transformers model with KaLM instructions applied per task and per side.

The instructions come from one table, :mod:`kalm_st.instructions`. A kalm-st model carries it in ``model.prompts``
(``build_model`` installs it), so the default ``instructions="model"`` uses what the model ships with; ``"kalm"``
applies the table to a model that lacks it, ``"none"`` evaluates without any prompt (reference models such as
all-MiniLM-L6-v2), and a mapping is used as given. Prompts are looked up by mteb (``"{task}-{side}"``, ``"{task}"``,
``"{type}-{side}"``, ``"{type}"``, ``"{side}"``) in :class:`InstructedEncoder`, a
:class:`mteb.models.SentenceTransformerEncoderWrapper` whose prompt table is set explicitly.

Results are written by mteb's own :class:`mteb.ResultCache` under ``output_dir`` (``results/{org__name}/{revision}/
{Task}.json``); each task's file is saved as soon as it finishes, and a rerun skips tasks already there. Runs with a
``truncate_dim`` or non-default instructions are mteb "experiments" (``experiments/{kwargs}/``), so they never
overwrite the full-dimension results.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mteb.models import ModelMeta, SentenceTransformerEncoderWrapper

from kalm_st.evaluation.tasks import resolve_tasks
from kalm_st.instructions import build_prompts

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.results import ModelResult
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Instructions = Literal["model", "kalm", "none"] | Mapping[str, str]
NO_PROMPTS: dict[str, str] = {"query": "", "document": ""}
"""Explicit empty prompts: both sides get ``prompt=""`` so no prompt saved in the model leaks in."""


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


def check_writable(output_dir: str | os.PathLike[str]) -> Path:
    """Create ``output_dir`` if needed and prove it is writable, with a clear ``PermissionError`` if not."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"Output directory {str(folder)!r} is not writable: {error.strerror or error}") from None
    return folder


def default_model_name(model: SentenceTransformer, path: str | os.PathLike[str] | None = None) -> str:
    """``org/name`` for the results folder: the model card's name, else ``local/{folder name}``."""
    name = getattr(model.model_card_data, "model_name", None) or getattr(model.model_card_data, "model_id", None)
    if name:
        return name if "/" in name else f"local/{name}"
    if path is not None:
        return f"local/{Path(os.fspath(path)).resolve().name}"
    return "local/unnamed-model"


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
    output = check_writable(output_dir)
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

    if truncate_dim is not None:
        full_dim = st_model.get_embedding_dimension()
        if not 0 < truncate_dim <= (full_dim or truncate_dim):
            raise ValueError(f"truncate_dim must be in 1..{full_dim}, got {truncate_dim}")

    if model_meta is None:
        from kalm_st.evaluation.meta import build_model_meta

        model_meta = build_model_meta(
            st_model,
            name=model_name or default_model_name(st_model, path),
            revision=revision or "local",
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
    scores = {r.task_name: float(r.get_score()) for r in result.task_results}
    for name, score in scores.items():
        logger.info("%s: %.2f", name, 100 * score)
    return EvaluationRun(
        result=result,
        results_dir=cache.get_task_result_path("x", model_meta).parent,
        model_meta=model_meta,
        scores=scores,
        seconds=seconds,
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
    "NO_PROMPTS",
    "EvaluationRun",
    "InstructedEncoder",
    "check_writable",
    "default_model_name",
    "evaluate_model",
    "resolve_prompts",
]
