"""``kalm-st mine | filter | label | teacher-score | teacher-embed``: the curation tools of :mod:`kalm_st.data` on files.

Each reads training data (jsonl/csv/parquet, see :mod:`kalm_st.data.formats`), applies the tool per task and writes
one output file atomically (a ``task`` column keeps the tasks apart).

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
from typing import Any

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser, model_help: str | None = "embedding model (path or Hub id)") -> None:
    parser.add_argument("input", nargs="+", help="training data file(s)")
    parser.add_argument("-o", "--output", required=True, help="output file (.jsonl, .csv or .parquet)")
    if model_help:
        parser.add_argument("--model", required=True, help=model_help)
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
            "text; default Retrieval: queries only)",
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


def _load(args: argparse.Namespace):  # noqa: ANN202 - lazily imported types
    """The input data (row instructions written into the texts unless --no-instructions) and the task types."""
    from kalm_st.data import load_training_data

    task_types = _task_types(args)
    data = load_training_data(args.input, task_types=task_types, row_instructions=not args.no_instructions)
    unknown = sorted(set(task_types) - set(data))
    if unknown:
        raise ValueError(f"--task-type names task(s) {unknown} that the input does not have (tasks: {list(data)})")
    return data, task_types


def _prompts(dataset: Any, task: str, task_types: dict[str, str], args: argparse.Namespace) -> tuple[str, str]:
    """``(query_prompt, document_prompt)`` of a task: training's prompts (always strings, ``""`` for none)."""
    from kalm_st.instructions import encoding_prompts

    query_prompt, document_prompt = encoding_prompts(
        dataset, task, task_types.get(task), instructions=not args.no_instructions
    )
    logger.info("task %r: query prompt %r, document prompt %r", task, query_prompt, document_prompt)
    return query_prompt, document_prompt


def _load_model(args: argparse.Namespace):  # noqa: ANN202 - lazily imported types
    # kalm-st's class: a bidirectional decoder then encodes on real tokens only; any other model loads as stock
    from kalm_st.model import KaLMSentenceTransformer

    return KaLMSentenceTransformer(args.model, device=args.device)


def _mine(args: argparse.Namespace) -> int:
    from datasets import DatasetDict

    from kalm_st.data import mine_hard_negatives, write_training_data

    (data, task_types), model, out = _load(args), _load_model(args), DatasetDict()
    for task, dataset in data.items():
        query_prompt, corpus_prompt = _prompts(dataset, task, task_types, args)
        out[task] = mine_hard_negatives(
            dataset,
            model,
            range_min=args.range_min,
            range_max=args.range_max,
            num_negatives=args.num_negatives,
            sampling_strategy=args.sampling,
            query_prompt=query_prompt,
            corpus_prompt=corpus_prompt,
            output_scores=args.scores,
            batch_size=args.batch_size,
            use_faiss=True if args.faiss else None,
            cache_folder=args.cache_dir,
            chunk_size=args.chunk_size,
            seed=args.seed,
        )
        logger.info(
            "mine: task %r: %d of %d rows with %d negatives", task, len(out[task]), len(dataset), args.num_negatives
        )
    write_training_data(out, args.output)
    return 0


def _filter(args: argparse.Namespace) -> int:
    from datasets import DatasetDict

    from kalm_st.data import filter_by_rank, write_training_data

    (data, task_types), model, out = _load(args), _load_model(args), DatasetDict()
    total = dropped = 0
    for task, dataset in data.items():
        query_prompt, corpus_prompt = _prompts(dataset, task, task_types, args)
        out[task], report = filter_by_rank(
            dataset, model, top_k=args.top_k, query_prompt=query_prompt, corpus_prompt=corpus_prompt,
            batch_size=args.batch_size, cache_folder=args.cache_dir, chunk_size=args.chunk_size,
            use_faiss=True if args.faiss else None,
        )  # fmt: skip
        logger.info("filter: task %r: %s", task, report)
        total, dropped = total + report.total, dropped + report.dropped
    print(f"filter: dropped {dropped} of {total} rows whose positive is not in the top {args.top_k}")  # noqa: T201
    write_training_data(out, args.output)
    return 0


def _label(args: argparse.Namespace) -> int:
    from datasets import DatasetDict

    from kalm_st.data import label_examples, write_training_data
    from kalm_st.data.formats import read_table

    out = DatasetDict()
    for path in args.input:
        raw = read_table(path)
        labelled = label_examples(
            raw, text_column=args.text_column, label_column=args.label_column, num_negatives=args.num_negatives,
            seed=args.seed,
        )  # fmt: skip
        out[args.task] = labelled if args.task not in out else _concat(out[args.task], labelled)
    write_training_data(out, args.output)
    print(  # noqa: T201
        f"label: {len(out[args.task])} rows for task {args.task!r}; train it with type Classification "
        f"(instruction on every column) and no in-batch negatives, and curate it with "
        f"--task-type {args.task}=Classification"
    )
    return 0


def _concat(a, b):  # noqa: ANN001, ANN202
    from datasets import concatenate_datasets

    return concatenate_datasets([a, b])


def _teacher_score(args: argparse.Namespace) -> int:
    from datasets import DatasetDict

    from kalm_st.data import score_with_teacher, write_training_data

    data, task_types = _load(args)
    if args.cross_encoder:
        from sentence_transformers import CrossEncoder

        teacher = CrossEncoder(args.model, device=args.device)
    else:
        teacher = _load_model(args)
    out = DatasetDict()
    for task, dataset in data.items():
        # a cross-encoder takes no prompts: it scores the texts as loaded (rerankers have their own input format)
        query_prompt, document_prompt = (
            (None, None) if args.cross_encoder else _prompts(dataset, task, task_types, args)
        )
        out[task] = score_with_teacher(
            dataset, teacher, query_prompt=query_prompt, document_prompt=document_prompt,
            batch_size=args.batch_size, cache_dir=args.cache_dir, teacher_id=args.teacher_id,
        )  # fmt: skip
    write_training_data(out, args.output)
    if args.flag_embedding:
        from kalm_st.data.teacher_scores import write_flag_embedding

        write_flag_embedding(out, args.flag_embedding)
    return 0


def _teacher_embed(args: argparse.Namespace) -> int:
    from kalm_st.data import write_training_data
    from kalm_st.data.teacher_embeddings import embed_training_data

    data, _ = _load(args)
    out = embed_training_data(
        data, _load_model(args), args.cache_dir, teacher_name=args.teacher_id or args.model,
        chunk_size=args.chunk_size, batch_size=args.batch_size,
    )  # fmt: skip
    write_training_data(out, args.output)
    return 0


def _search_options(parser: argparse.ArgumentParser) -> None:
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
    teacher.add_argument("--cache-dir", default=".kalm_cache/teacher_scores", help="score cache folder")
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
    embed.add_argument("--cache-dir", default=".kalm_cache/teacher_embeddings", help="embedding cache folder")
    embed.add_argument("--teacher-id", default=None, help="teacher identity for the cache key (default --model)")
    embed.add_argument("--chunk-size", type=int, default=1024, help="texts per resumable chunk")
    embed.set_defaults(func=_teacher_embed)
