"""Run by tests/losses/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a real ``kalm-st train``
stage (:func:`kalm_st.recipe.build.build_stage`) with ``embedding_distillation``, each rank on its own rows.

Rank r shifts its projection by ``0.5 * r`` before training (so the ranks start apart), records its
projection at the start, its local gradient before the sync and the synced gradient after it at every step, and
saves them with its final projection to ``{out}/rank{r}.pt``. Before training it checks that the loss refuses to run
in several processes without the sync callback.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from kalm_st.losses import distillation_losses  # noqa: E402
from kalm_st.recipe.build import build_stage  # noqa: E402
from kalm_st.recipe.config import load_config  # noqa: E402


class Recorder(TrainerCallback):
    """Runs before LossStateCallback (build_stage puts the caller's callbacks first)."""

    def __init__(self) -> None:
        self.losses: list = []
        self.record: dict[str, list] = {"local_grads": [], "synced_grads": []}

    def on_train_begin(self, args, state, control, **kwargs):
        self.record["init"] = [p.detach().clone() for loss in self.losses for p in loss.projection.parameters()]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.record["local_grads"].append(
            [p.grad.clone() for loss in self.losses for p in loss.projection.parameters()]
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.record["synced_grads"].append(
            [p.grad.clone() for loss in self.losses for p in loss.projection.parameters()]
        )


def main() -> None:
    config_path, out_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    rank = int(os.environ["RANK"])
    recorder = Recorder()
    run = build_stage(load_config(config_path, overrides), callbacks=[recorder])
    recorder.losses = distillation_losses(run.losses)
    (loss,) = recorder.losses
    with torch.no_grad():  # the ranks start from different projections: the sync must broadcast rank 0's
        for param in loss.projection.parameters():
            param.add_(0.5 * rank)
    model = run.model
    features = [model.tokenize(["a first text", "a second one"]) for _ in range(5)]  # anchor, positive, 3 negatives
    try:  # not yet synced: the loss refuses to train in several processes
        loss(features, torch.zeros(2, 5, loss.teacher_dim))
        refused = False
    except ValueError as error:
        refused = "LossStateCallback" in str(error)
    run.trainer.train()
    record = {
        **recorder.record,
        "refused_without_sync": refused,
        "final": [p.detach().clone() for p in loss.projection.parameters()],
    }
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
