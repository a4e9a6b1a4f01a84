"""``kalm-st convert SOURCE DESTINATION``: a decoder checkpoint or KaLM ST folder -> portable kalm-st model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="turn a decoder checkpoint or a released KaLM folder into a portable kalm-st model",
        description="Convert a decoder checkpoint folder, or a sentence-transformers folder whose first module wraps "
        "a decoder (the released KaLM-V2 layout), into a folder that plain SentenceTransformer(path) loads "
        "bidirectionally without trust_remote_code.",
    )
    parser.add_argument("source", help="decoder checkpoint folder or sentence-transformers folder")
    parser.add_argument("destination", help="output folder (written atomically)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument(
        "--max-seq-length", type=int, default=None, help="truncation length (default: source's or 512)"
    )
    parser.add_argument("--keep-prompts", action="store_true", help="keep the source's prompts, not kalm-st's table")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kalm_st.convert import convert

    model = convert(
        args.source,
        args.destination,
        dtype=args.dtype,
        max_seq_length=args.max_seq_length,
        keep_prompts=args.keep_prompts,
    )
    print(  # noqa: T201
        f"Wrote {args.destination}: {type(model[0].auto_model).__name__}, bidirectional, "
        f"dim {model.get_embedding_dimension()}, max_seq_length {model.max_seq_length}. "
        f"Load it with SentenceTransformer({args.destination!r})."
    )
    return 0
