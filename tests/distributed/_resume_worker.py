"""Run by tests/distributed/test_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): ``kalm-st train`` of a
stage with ``sharding: {strategy: fsdp2}`` (:func:`kalm_st.recipe.build.run_stage`).

Arguments: ``CONFIG RESUME KILL_AT OVERRIDE...``. With ``KILL_AT > 0`` every process SIGKILLs itself when step
``KILL_AT`` ends (no Python cleanup, as ``kill -9``); ``RESUME=1`` continues from the last complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from kalm_st.recipe.build import run_stage  # noqa: E402
from kalm_st.recipe.config import load_config  # noqa: E402


class Kill(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    config_path, resume, kill_at, overrides = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)  # the test reads 'Resuming from'
    run_stage(load_config(config_path, overrides), resume=resume, callbacks=[Kill(kill_at)] if kill_at else [])


if __name__ == "__main__":
    main()
