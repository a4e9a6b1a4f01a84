"""``kalm-st mine | filter | label | teacher-score | teacher-embed``: a one-step recipe on files.

Each command builds the settings of the recipe step of the same kind (:mod:`kalm_st.recipe.recipe`) and runs it
through the runner its kind declares (:data:`kalm_st.recipe.recipe.STEP_KINDS`): the same reader (:mod:`kalm_st.data.load`), the same
pass-through of Classification / Clustering tasks, the same output (one file, written atomically, a ``task`` column
keeping the tasks apart).

Instructions: ``mine``, ``filter`` and ``teacher-score`` encode every text with the prompt training gives it
(:func:`kalm_st.instructions.column_prompts`), so give each task the type its training config has
(``--task-type my_sts=STS``; a task without one is treated like type ``Retrieval``, training's default). A task's
``instruction`` column is written into its texts, once; ``--no-instructions`` encodes every text exactly as
written (empty prompts, not the model's own default prompts) and ignores the ``instruction`` column. See
``docs/instructions.md``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser, model_help: str | None = "embedding model (path or Hub id)") -> None:
    parser.add_argument("input", nargs="*", help="training data file(s), globs or folders")
    parser.add_argument("-o", "--output", required=True, help="output file (.jsonl, .csv or .parquet)")
    if model_help:
        parser.add_argument("--model", required=True, help=model_help)
        parser.add_argument(
            "--source",
            action="append",
            default=[],
            metavar="PATH",
            help="a data source as in a recipe step's 'sources' (folder, glob, hf://datasets/...; repeatable)",
        )
        parser.add_argument(
            "--source-tasks", choices=["one", "subfolders", "column"], default="one", help="tasks of each --source"
        )
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size")
    parser.add_argument("--device", default=None, help="torch device (default: auto)")
    if model_help:
        parser.add_argument(
            "--task-type",
            action="append",
            default=[],
            metavar="TASK=TYPE",
            help="MTEB type of a task, as in its training config (repeatable; e.g. my_sts=STS): decides which texts "
            "get the task's instruction (STS / PairClassification: both sides; Classification / Clustering: every "
            "text, and mine / filter pass the task through; default Retrieval: queries only)",
        )
    parser.add_argument(
        "--no-instructions",
        action="store_true",
        help="encode every text exactly as written: no task instruction, no model default prompt, the "
        "'instruction' column ignored",
    )


def _task_types(args: argparse.Namespace) -> dict[str, str]:
    """``--task-type TASK=TYPE`` options as a dict, each type checked against the known task types."""
    from kalm_st.instructions import check_task_type

    types: dict[str, str] = {}
    for item in args.task_type:
        task, sep, task_type = item.partition("=")
        if not sep or not task.strip() or not task_type.strip():
            raise ValueError(f"--task-type {item!r}: expected TASK=TYPE, e.g. my_sts=STS")
        try:
            check_task_type(task_type.strip())
        except ValueError as error:
            raise ValueError(f"--task-type {item!r}: {error}") from None
        types[task.strip()] = task_type.strip()
    return types


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every data-reading step shares: files, sources, task types, instructions."""
    from kalm_st.recipe.config import SourceConfig

    if not args.input and not args.source:
        raise ValueError("give input file(s) or --source")
    return {
        "data": tuple(args.input),
        "sources": tuple(SourceConfig(path=path, tasks=args.source_tasks) for path in args.source),
        "task_types": _task_types(args),
        "instructions": not args.no_instructions,
    }


def _run(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``settings`` as a one-step recipe through its kind's runner, in a temporary step folder; its summary."""
    from kalm_st.io import check_output_path
    from kalm_st.recipe.recipe import Step
    from kalm_st.recipe.steps import StepContext

    kind = settings.step_kind.name
    check_output_path(args.output)  # before any loading or encoding: a bad path fails now, not after hours of work
    work = Path(tempfile.mkdtemp(prefix=f"kalm-st-{kind}-"))
    cache = getattr(args, "cache_dir", None)
    if not cache and kind.startswith("teacher-"):  # teacher caches outlive the run: beside the output, never the cwd
        folder = "teacher_scores" if kind == "teacher-score" else "teacher_embeddings"
        cache = Path(args.output).parent / ".kalm_cache" / folder
    ctx = StepContext(
        step=Step(name=kind, kind=kind, settings=settings),
        settings=settings,
        step_dir=work / kind,
        output=Path(args.output),
        builtin_dir=work / "builtin",
        resume=False,
        seed=getattr(args, "seed", 0),
        cache_dir=Path(cache) if cache else None,
        device=args.device,
    )
    ctx.step_dir.mkdir(parents=True)
    try:
        summary = settings.step_kind.run(ctx)
        if getattr(args, "flag_embedding", None):  # written into the step folder: copied out before it goes
            shutil.copytree(summary["flag_embedding"], args.flag_embedding, dirs_exist_ok=True)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mine(args: argparse.Namespace) -> int:
    from kalm_st.recipe.recipe import MineStep

    settings = MineStep(
        model=args.model, corpus=args.corpus, range_min=args.range_min, range_max=args.range_max,
        num_negatives=args.num_negatives, sampling=args.sampling, scores=args.scores, batch_size=args.batch_size,
        faiss=True if args.faiss else None, chunk_size=args.chunk_size, seed=args.seed, **_inputs(args),
    )  # fmt: skip
    logger.info("mine: rows per task %s", _run(settings, args)["rows"])
    return 0


def _filter(args: argparse.Namespace) -> int:
    from kalm_st.recipe.recipe import FilterStep

    settings = FilterStep(
        model=args.model, corpus=args.corpus, top_k=args.top_k, batch_size=args.batch_size,
        faiss=True if args.faiss else None, chunk_size=args.chunk_size, **_inputs(args),
    )  # fmt: skip
    summary = _run(settings, args)
    dropped = sum(summary["dropped"].values())
    total = dropped + sum(summary["rows"][task] for task in summary["dropped"])
    print(f"filter: dropped {dropped} of {total} rows whose positive is not in the top {args.top_k}")  # noqa: T201
    return 0


def _label(args: argparse.Namespace) -> int:
    from kalm_st.recipe.recipe import LabelStep

    if not args.input:
        raise ValueError("label: give the labelled input file(s)")
    settings = LabelStep(
        data=tuple(args.input), task=args.task, text_column=args.text_column, label_column=args.label_column,
        num_negatives=args.num_negatives, seed=args.seed,
    )  # fmt: skip
    summary = _run(settings, args)
    print(  # noqa: T201
        f"label: {summary['rows'][args.task]} rows for task {args.task!r}; train it with type Classification "
        f"(instruction on every column) and no in-batch negatives, and curate it with "
        f"--task-type {args.task}=Classification"
    )
    return 0


def _teacher_score(args: argparse.Namespace) -> int:
    from kalm_st.recipe.recipe import TeacherScoreStep

    settings = TeacherScoreStep(
        teacher=args.model, cross_encoder=args.cross_encoder, batch_size=args.batch_size, teacher_id=args.teacher_id,
        flag_embedding=bool(args.flag_embedding), dtype="float32", **_inputs(args),
    )  # fmt: skip
    _run(settings, args)
    return 0


def _teacher_embed(args: argparse.Namespace) -> int:
    from kalm_st.recipe.recipe import TeacherEmbedStep

    settings = TeacherEmbedStep(
        teacher=args.model, batch_size=args.batch_size, chunk_size=args.chunk_size, teacher_id=args.teacher_id,
        dtype="float32", **_inputs(args),
    )  # fmt: skip
    _run(settings, args)
    return 0


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None, help="a file with a 'text' column to search (default: the data)")
    parser.add_argument("--faiss", action="store_true", help="require faiss for retrieval (default: when installed)")
    parser.add_argument(
        "--cache-dir", default=None, help="embedding store: encoded chunks are kept here, a rerun resumes"
    )
    parser.add_argument("--chunk-size", type=int, default=8192, help="texts per resumable chunk")


def register(subparsers: argparse._SubParsersAction) -> None:
    mine = subparsers.add_parser("mine", help="mine hard negatives (KaLM: ranks 50-100, 7 negatives, random)")
    _common(mine, "the previous-stage embedding model")
    mine.add_argument("--range-min", type=int, default=50)
    mine.add_argument("--range-max", type=int, default=100)
    mine.add_argument("--num-negatives", type=int, default=7)
    mine.add_argument("--sampling", choices=["random", "top"], default="random")
    mine.add_argument("--scores", action="store_true", help="store the miner's scores in the label column")
    _search_options(mine)
    mine.add_argument("--seed", type=int, default=0)
    mine.set_defaults(func=_mine)

    filt = subparsers.add_parser("filter", help="drop examples whose positive is not in the top k (default 50)")
    _common(filt)
    filt.add_argument("--top-k", type=int, default=50)
    _search_options(filt)
    filt.set_defaults(func=_filter)

    label = subparsers.add_parser("label", help="labelled texts -> (text, same-class example, other-class examples)")
    _common(label, model_help=None)
    label.add_argument("--task", required=True, help="task name (its instruction comes from the KaLM table)")
    label.add_argument("--text-column", default="text")
    label.add_argument("--label-column", default="label")
    label.add_argument("--num-negatives", type=int, default=7)
    label.add_argument("--seed", type=int, default=0)
    label.set_defaults(func=_label)

    teacher = subparsers.add_parser("teacher-score", help="teacher scores of positive + negatives into 'label'")
    _common(teacher, "teacher model (SentenceTransformer, or CrossEncoder with --cross-encoder)")
    teacher.add_argument("--cross-encoder", action="store_true", help="load the teacher as a CrossEncoder")
    teacher.add_argument(
        "--cache-dir", default=None, help="score cache folder (default: .kalm_cache/ beside the output file)"
    )
    teacher.add_argument("--teacher-id", default=None, help="teacher identity for the cache key")
    teacher.add_argument(
        "--flag-embedding",
        default=None,
        metavar="FOLDER",
        help="also write FlagEmbedding jsonl (pos_scores/neg_scores)",
    )
    teacher.set_defaults(func=_teacher_score)

    embed = subparsers.add_parser(
        "teacher-embed", help="cache teacher embeddings of every text; their (2 + n, d) per row into 'label'"
    )
    _common(embed, "teacher model (SentenceTransformer)")
    embed.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default: .kalm_cache/ beside the output file)"
    )
    embed.add_argument("--teacher-id", default=None, help="teacher identity for the cache key (default --model)")
    embed.add_argument("--chunk-size", type=int, default=1024, help="texts per resumable chunk")
    embed.set_defaults(func=_teacher_embed)
