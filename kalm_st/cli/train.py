"""``kalm-st train CONFIG [--set key=value ...] [--dry-run] [--resume]``: run one stage of the recipe.

Runs unchanged under ``torchrun`` / ``accelerate launch`` (the Trainer handles the process group; only rank 0 writes
the resolved config and the final model). Logging goes through the Trainer (``args.report_to`` in the YAML).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run one training stage (pretrain, finetune, distill) from a YAML config",
        description="Run one stage of the KaLM recipe from a YAML config (training/configs/*.yaml). The resolved "
        "config is saved as OUTPUT_DIR/resolved_config.yaml, checkpoints as OUTPUT_DIR/checkpoint-N, the final "
        "model (atomically) as OUTPUT_DIR/final.",
    )
    parser.add_argument("config", help="stage YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.kwargs.gamma=2 --set args.max_steps=10 (value parsed as "
        "YAML; repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="build model, data, losses and trainer, then exit")
    parser.add_argument(
        "--resume", action="store_true", help="resume from the last complete checkpoint in output_dir (error if none)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    from kalm_st.recipe.build import run_stage
    from kalm_st.recipe.config import load_config

    config = load_config(args.config, args.overrides)
    final = run_stage(config, resume=args.resume, dry_run=args.dry_run)
    if final is not None:
        logging.getLogger("kalm_st.cli.train").info("Stage %r done: %s", config.stage, final)
    return 0
