"""``kalm-st push``: model card + upload to the Hugging Face Hub (same as ``evaluation/push_to_hub.py``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder")
    parser.add_argument("repo_id", help="org/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    parser.add_argument("--results", default=None, help="evaluation folder whose MTEB results go into the card")
    parser.add_argument("--results-model-name", default=None, help="org/name of the results in that folder")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--language", nargs="+", default=None, help="language codes for the card (e.g. en)")


def run(args: argparse.Namespace) -> int:
    from kalm_st.evaluation.hub import HubPushError, push_model

    try:
        result = push_model(
            args.model,
            args.repo_id,
            private=args.private,
            dry_run=args.dry_run,
            results_dir=args.results,
            results_model_name=args.results_model_name,
            license=args.license,
            languages=args.language,
        )
    except HubPushError as error:
        print(f"kalm-st push: error: {error}", file=sys.stderr)  # noqa: T201
        return 2
    for name in result.files:
        print(name)  # noqa: T201
    if args.dry_run:
        print("\n" + result.card)  # noqa: T201
    else:
        print(f"pushed: {result.url}", file=sys.stderr)  # noqa: T201
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="push a model with a kalm-st model card to the Hub")
    add_arguments(parser)
    parser.set_defaults(func=run)
