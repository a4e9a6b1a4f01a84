"""What each step kind of a recipe does: one runner per kind (declared by :func:`kalm_st.recipe.recipe.step_kind`).

Every function takes a :class:`StepContext` (the step with its ``@step`` references already replaced by paths) and
returns a small summary (row counts, scores) that goes into the step's manifest. Outputs are written atomically, so a
killed step leaves either nothing or a complete output; an interrupted step is resumed by the runner (training from
its last checkpoint, teacher scores and mined embeddings from their caches under the step's folder).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kalm_st.recipe.config import ConfigError, StageConfig, parse_yaml

if TYPE_CHECKING:  # recipe.py declares each kind with its runner from here: it imports this module, not back
    from kalm_st.recipe.recipe import Step

logger = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
"""Curation steps write ``{step_dir}/data.parquet`` (a ``task`` column keeps the tasks apart)."""
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class StepContext:
    """One step, ready to run: settings with references resolved, and its folders."""

    step: Step
    settings: Any
    """``step.settings`` with every ``@name`` replaced by that step's output path."""
    step_dir: Path
    output: Path | None
    """Where the step's output goes (None for steps without one, e.g. push)."""
    builtin_dir: Path
    """Where built-in backbones (``builtin:...``) are materialised once per recipe output folder."""
    resume: bool
    """True when an interrupted run of this very step (same fingerprint) left work to continue."""
    seed: int = 0
    """The recipe's seed (sources draw their positives and ragged negatives with it, as training does)."""
    is_main: bool = True
    """Global rank 0 (always, without a launcher): the process that writes outputs shared by all ranks."""
    cache_dir: Path | None = None
    """The command line's ``--cache-dir`` (a one-step recipe): the embedding store or teacher cache, instead of the
    recipe's."""
    device: str | None = None
    """The command line's ``--device`` for the step's models (None: sentence-transformers' choice)."""

    @property
    def embeddings_dir(self) -> Path:
        """The recipe's embedding store (:mod:`kalm_st.data.embedding_store`), shared by its curation steps: a
        ``mine`` after a ``filter`` of the same corpus with the same model reads the filter's embeddings."""
        return self.cache_dir or self.builtin_dir.parent / "embeddings"

    @property
    def teacher_cache(self) -> Path:
        return self.cache_dir or self.step_dir / "cache"


# ----------------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------------


def load_encoder(value: str, ctx: StepContext, max_seq_length: int | None = None) -> Any:
    """A step's model (:func:`kalm_st.model_source.resolve_model`; a built-in is written once per recipe)."""
    from kalm_st.model_source import resolve_model

    what = f"step {ctx.step.name!r}: model"
    return resolve_model(
        value, what=what, builtin_dir=ctx.builtin_dir, max_seq_length=max_seq_length, device=ctx.device
    )


@dataclass(frozen=True)
class CurationInputs:
    """A curation step's tasks: their rows, their types, and which are converted sources."""

    data: Any
    """``DatasetDict`` by task."""
    types: dict[str, str | None]
    converted: frozenset[str]
    """Tasks read from KaLM / FlagEmbedding / F2LLM sources: their texts carry their instructions already."""


def _load_data(settings: Any, ctx: StepContext) -> CurationInputs:
    """Every task of the step's ``data`` files and ``sources``, through the one reader a stage uses."""
    from datasets import DatasetDict

    from kalm_st.data.load import LoadOptions, load_files, load_tasks
    from kalm_st.data.tasks import expand_sources
    from kalm_st.io import check_output_path

    if ctx.is_main and ctx.output is not None:
        check_output_path(ctx.output)  # before any encoding

    task_types = dict(settings.task_types)
    options = LoadOptions(row_instructions=settings.instructions, seed=ctx.seed)
    data, resolved = load_files(list(settings.data), options, task_types) if settings.data else ({}, {})
    if settings.sources:
        where = f"step {ctx.step.name!r}"
        specs = expand_sources(settings.sources, where, "sources")
        more, more_resolved = load_tasks(specs, dataclasses.replace(options, source=where))
        for task in more:
            if task in data:
                raise ConfigError(f"step {ctx.step.name!r}: task {task!r} comes from both data and sources.")
        data, resolved = {**data, **more}, {**resolved, **more_resolved}
    unknown = sorted(set(task_types) - set(data))
    if unknown:
        raise ConfigError(f"task_types names task(s) {unknown} that the data does not have (tasks: {list(data)}).")
    types = {task: task_types.get(task) or resolved[task].type for task in data}  # None: Retrieval, or as named
    converted = frozenset(task for task, spec in resolved.items() if spec.converted)
    return CurationInputs(DatasetDict(data), types, converted)


def _corpus(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from kalm_st.data import read_table

    table = read_table(path)
    if "text" not in table.column_names:
        raise ConfigError(f"corpus {path!r}: needs a 'text' column (have {table.column_names}).")
    return list(table["text"])


def _prompts(dataset: Any, task: str, inputs: CurationInputs, instructions: bool) -> tuple[str, str]:
    """(query prompt, document prompt) of a task for curation: the one resolver training uses too; none for a
    converted source, whose texts already carry their instructions."""
    from kalm_st.instructions import encoding_prompts

    if task in inputs.converted:
        return "", ""
    return encoding_prompts(dataset, task, inputs.types.get(task), instructions=instructions)


def _passes_through(task: str, inputs: CurationInputs, ctx: StepContext) -> bool:
    """Classification-like tasks (Classification, Clustering, a FlagEmbedding ``no_in_batch_neg`` folder) are not
    retrieval: their negatives are other classes (example-based labelling), so mining and ranking filters leave them
    as they are (METHOD.md §5)."""
    from kalm_st.data.tasks import NO_IN_BATCH_SUFFIX
    from kalm_st.recipe.build import CLASSIFICATION_TYPES

    # Without an explicit type (a curation output read back from a file), MTEB's naming says it:
    # Banking77Classification, RedditClustering, ... (the instruction table's names follow it).
    named = next((t for t in ("Classification", "Clustering") if task.endswith(t)), None)
    kind = inputs.types.get(task) or named
    if kind in CLASSIFICATION_TYPES or task.endswith(NO_IN_BATCH_SUFFIX):
        kind = kind or "no in-batch negatives"
        logger.info("step %s: task %r (%s) is not retrieval: kept as it is", ctx.step.name, task, kind)
        return True
    return False


def _write(data: Any, output: Path) -> dict[str, int]:
    from kalm_st.data import write_training_data

    write_training_data(data, output)
    return {task: len(dataset) for task, dataset in data.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Step kinds
# ----------------------------------------------------------------------------------------------------------------------


def _encoding_in_cpu_bf16(run: Callable[[StepContext], dict[str, Any]]) -> Callable[[StepContext], dict[str, Any]]:
    """Run an encoding step under CPU bf16 autocast where the CPU computes bf16 fast (AMX), as training does with
    ``args.bf16: auto``; fp32 elsewhere (``kalm_st.precision``). A GPU model is already in its own dtype. Teacher
    scores and embeddings stay in fp32."""

    def wrapped(ctx: StepContext) -> dict[str, Any]:
        import torch

        from kalm_st.precision import cpu_autocast

        with cpu_autocast("auto" if not torch.cuda.is_available() else False):
            return run(ctx)

    return wrapped


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in, JSON merge-patch style (RFC 7386): mappings merge key by key, a ``null``
    value deletes the key (e.g. ``data: {tasks: {sts: null}}`` drops a task of the stage file), anything else
    replaces."""
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def stage_config(settings: Any, step: Step, step_dir: Path) -> StageConfig:
    """The train step's stage config: the stage file, merged with ``set:``, writing into the step's folder."""
    path = Path(settings.config)
    if not path.is_file():
        raise FileNotFoundError(f"step {step.name!r}: config {settings.config!r} does not exist.")
    raw = parse_yaml(path.read_text(encoding="utf8"), str(path))
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a stage config must be a mapping.")
    merged = deep_merge(raw, settings.set)
    merged["output_dir"] = str(step_dir)
    return StageConfig.from_dict(merged, f"{path} (step {step.name!r} of the recipe)")


def plan_train(
    settings: Any, hashed: Any, step: Step, step_dir: Path
) -> tuple[list[tuple[str, bool]], dict[str, Any]]:
    """A train step's inputs (starting model, data files, stage file; each with whether it is a model) and the config
    its fingerprint hashes: the merged stage config (``hashed``: the settings with ``@step`` as ``@step#fingerprint``)."""
    config = stage_config(settings, step, step_dir)
    inputs = [(config.model.init_from, True)] if config.model is not None else []
    if config.data is not None:
        reads = [*config.data.tasks.values(), *config.data.eval_tasks.values(), *config.data.sources]
        inputs += [(task.path, False) for task in reads]
    resolved = stage_config(hashed, step, step_dir).to_dict()
    resolved.pop("output_dir")
    return [*inputs, (settings.config, False)], resolved


def run_train(ctx: StepContext) -> dict[str, Any]:
    from kalm_st.io import atomic_directory
    from kalm_st.model_source import builtin_folder
    from kalm_st.recipe.backbones import BUILTIN_PREFIX
    from kalm_st.recipe.build import last_complete_checkpoint, run_stage

    config = stage_config(ctx.settings, ctx.step, ctx.step_dir)
    if config.model is not None and config.model.init_from.startswith(BUILTIN_PREFIX):
        folder = builtin_folder(config.model.init_from, ctx.builtin_dir)  # converted once, not per stage
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=str(folder)))
    resume = ctx.resume and last_complete_checkpoint(ctx.step_dir) is not None
    final = run_stage(config, resume=resume)
    assert final is not None
    if ctx.is_main and ctx.output is not None and ctx.output != final:
        import shutil

        with atomic_directory(ctx.output) as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
    if ctx.is_main and ctx.output is not None and ctx.output != final:  # run_stage wrote final/'s card
        _write_cards(ctx.output)
    return {"resumed": resume}


def _write_cards(*folders: Path | None) -> None:
    """kalm-st's model card (stages, data, base model) in each model folder, in place of the automatic one."""
    from kalm_st.evaluation.card import write_model_card

    for folder in dict.fromkeys(f for f in folders if f is not None and (Path(f) / "modules.json").is_file()):
        write_model_card(folder)


@_encoding_in_cpu_bf16
def run_mine(ctx: StepContext) -> dict[str, Any]:
    from datasets import DatasetDict

    from kalm_st.data import mine_hard_negatives

    s = ctx.settings
    inputs = _load_data(s, ctx)
    model, corpus, out = load_encoder(s.model, ctx), _corpus(s.corpus), DatasetDict()
    for task, dataset in inputs.data.items():
        if _passes_through(task, inputs, ctx):
            out[task] = dataset
            continue
        query_prompt, corpus_prompt = _prompts(dataset, task, inputs, s.instructions)
        out[task] = mine_hard_negatives(
            dataset,
            model,
            corpus=corpus,
            range_min=s.range_min,
            range_max=s.range_max,
            num_negatives=s.num_negatives,
            sampling_strategy=s.sampling,
            query_prompt=query_prompt,
            corpus_prompt=corpus_prompt,
            output_scores=s.scores,
            batch_size=s.batch_size,
            use_faiss=s.faiss,
            cache_folder=ctx.embeddings_dir,
            chunk_size=s.chunk_size,
            seed=s.seed,
        )
    return {"rows": _write(out, ctx.output)}


@_encoding_in_cpu_bf16
def run_filter(ctx: StepContext) -> dict[str, Any]:
    from datasets import DatasetDict

    from kalm_st.data import filter_by_rank

    s = ctx.settings
    inputs = _load_data(s, ctx)
    model, corpus, out = load_encoder(s.model, ctx), _corpus(s.corpus), DatasetDict()
    dropped = {}
    for task, dataset in inputs.data.items():
        if _passes_through(task, inputs, ctx):
            out[task] = dataset
            continue
        query_prompt, corpus_prompt = _prompts(dataset, task, inputs, s.instructions)
        out[task], report = filter_by_rank(
            dataset,
            model,
            top_k=s.top_k,
            corpus=corpus,
            query_prompt=query_prompt,
            corpus_prompt=corpus_prompt,
            batch_size=s.batch_size,
            cache_folder=ctx.embeddings_dir,
            chunk_size=s.chunk_size,
            use_faiss=s.faiss,
        )
        dropped[task] = report.dropped
    return {"rows": _write(out, ctx.output), "dropped": dropped}


def run_label(ctx: StepContext) -> dict[str, Any]:
    from datasets import DatasetDict, concatenate_datasets

    from kalm_st.data import label_examples
    from kalm_st.data.shards import local_shards, read_table

    s = ctx.settings
    # every shard of every path (a file, a glob, a folder), labelled as one table: positives and negatives may
    # come from any shard
    tables = [read_table(shard) for path in s.data for shard in local_shards(path)]
    table = concatenate_datasets(tables) if len(tables) > 1 else tables[0]
    labelled = label_examples(
        table, text_column=s.text_column, label_column=s.label_column, num_negatives=s.num_negatives, seed=s.seed
    )
    return {"rows": _write(DatasetDict({s.task: labelled}), ctx.output)}


def run_teacher_score(ctx: StepContext) -> dict[str, Any]:
    from datasets import DatasetDict
    from sentence_transformers import CrossEncoder

    from kalm_st.data import score_with_teacher

    s = ctx.settings
    inputs = _load_data(s, ctx)
    if s.cross_encoder:
        from kalm_st.model import resolve_dtype

        teacher = CrossEncoder(s.teacher, model_kwargs={"dtype": resolve_dtype(s.dtype)}, device=ctx.device)
    else:
        teacher = load_teacher(s, ctx)
    out = DatasetDict()
    for task, dataset in inputs.data.items():
        # A reranker reads (query, text) pairs as they are; an embedding teacher gets the task's instructions.
        prompts = (None, None) if s.cross_encoder else _prompts(dataset, task, inputs, s.instructions)
        out[task] = score_with_teacher(
            dataset,
            teacher,
            query_prompt=prompts[0],
            document_prompt=prompts[1],
            batch_size=s.batch_size,
            cache_dir=ctx.teacher_cache,
            teacher_id=s.teacher_id,
            chunk_size=s.chunk_size,
        )
    kind = "cross-encoder" if s.cross_encoder else "embedding"
    summary = {"rows": _write(out, ctx.output), "teacher": s.teacher, "teacher_kind": kind}
    if s.flag_embedding:  # FlagEmbedding's layout: a folder of jsonl files, one per task
        from kalm_st.data.teacher_scores import write_flag_embedding

        summary["flag_embedding"] = str(write_flag_embedding(out, ctx.step_dir / "flag_embedding"))
    return summary


def run_teacher_embed(ctx: StepContext) -> dict[str, Any]:
    from kalm_st.data.teacher_embeddings import embed_training_data

    s = ctx.settings
    out = embed_training_data(
        _load_data(s, ctx).data, load_teacher(s, ctx), ctx.teacher_cache,
        teacher_name=s.teacher_id or s.teacher, chunk_size=s.chunk_size, batch_size=s.batch_size,
    )  # fmt: skip
    return {"rows": _write(out, ctx.output), "teacher": s.teacher}


def load_teacher(settings: Any, ctx: StepContext) -> Any:
    """An embedding teacher: a sentence-transformers model (local folder or Hub id, e.g. Qwen/Qwen3-Embedding-8B,
    with its own prompts and pooling), a built-in, or a recipe's own model (``@step``)."""
    from kalm_st.model_source import resolve_model

    what = f"step {ctx.step.name!r}: teacher"
    return resolve_model(
        settings.teacher,
        what=what,
        hub="embedder",
        builtin_dir=ctx.builtin_dir,
        dtype=settings.dtype,
        device=ctx.device,
    )


def run_soup(ctx: StepContext) -> dict[str, Any]:
    import yaml

    from kalm_st.io import write_text_atomic
    from kalm_st.recipe.soup import soup

    s = ctx.settings
    soup(list(s.models), ctx.output, list(s.weights) if s.weights is not None else None)
    if ctx.output is not None:  # the soup's own stage record: the card follows it back to every souped stage
        record = {
            "stage": "soup",
            "soup": {"models": [str(Path(m).resolve()) for m in s.models], "weights": s.weights},
        }
        write_text_atomic(ctx.output / "resolved_config.yaml", yaml.safe_dump(record, sort_keys=False))
        _write_cards(ctx.output)
    return {"models": list(s.models)}


@_encoding_in_cpu_bf16
def run_eval(ctx: StepContext) -> dict[str, Any]:
    from kalm_st.evaluation import evaluate_model
    from kalm_st.io import write_json_atomic

    s = ctx.settings
    model = load_encoder(s.model, ctx, max_seq_length=s.max_seq_length)
    run = evaluate_model(
        model,
        list(s.tasks),
        output_dir=ctx.output,
        data_dir=s.data_dir,
        batch_size=s.batch_size,
        instructions=s.instructions,
        model_name=f"kalm-st/{ctx.step.name}",
    )
    scores = {task: round(100 * score, 4) for task, score in run.scores.items()}
    for task, score in scores.items():
        if score != score:  # NaN: every pair scored the same
            logger.warning(
                "step %s: %s scored NaN: the embeddings are constant (is max_seq_length shorter than the "
                "instruction, so every text is truncated to the prompt?)",
                ctx.step.name,
                task,
            )
    write_json_atomic(ctx.step_dir / SCORES_FILE, scores)
    return {"scores": scores}


def run_push(ctx: StepContext) -> dict[str, Any]:
    from kalm_st.evaluation.hub import push_model

    s = ctx.settings
    result = push_model(s.model, s.repo_id, private=s.private, results_dir=s.results)
    return {"url": result.url, "files": len(result.files)}


def read_scores(step_dir: Path) -> dict[str, float]:
    path = step_dir / SCORES_FILE
    return json.loads(path.read_text(encoding="utf8")) if path.is_file() else {}


__all__ = [
    "DATA_FILE",
    "StepContext",
    "deep_merge",
    "load_encoder",
    "plan_train",
    "read_scores",
    "stage_config",
]
