"""The ``kalm-st`` command. Each subcommand lives in its own module of this package, which defines
``register(subparsers)``; imports of torch and friends happen inside the handlers, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kalm-st", description="The KaLM-Embedding-V2 recipe on sentence-transformers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # kalm-st reports progress at INFO; other libraries stay at WARNING unless --verbose (sentence-transformers
    # logs, e.g., every prompt key of the instruction table at INFO).
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kalm_st").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, TypeError, ImportError) as error:
        # Bad input and the machine's faults (missing files, permissions, a full disk) are reported in one line;
        # unexpected errors keep their traceback.
        print(f"kalm-st {args.command}: error: {error}", file=sys.stderr)  # noqa: T201
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
