"""Run by tests/losses/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank embeds its half of the batch and computes the loss with ``gather_across_devices=True``; gradients and
losses are averaged over ranks as DDP does. Rank 0 saves them for the test to compare with one process on the
concatenated batch.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kalm_st import build_model  # noqa: E402
from kalm_st.losses import CachedFocalInfoNCE, FocalInfoNCE, HardNegativeMixing  # noqa: E402
from tests.losses._helpers import (  # noqa: E402
    ANCHORS,
    NEGATIVES_1,
    NEGATIVES_2,
    POSITIVES,
    duplicate_columns,
    featurize,
)

MASKED = ("masked", "masked_cached")
"""The losses with the false-negative mask, run on :func:`duplicate_columns` (a duplicate across the two ranks)."""


def columns_for(name: str) -> list[list[str]]:
    return duplicate_columns() if name in MASKED else [ANCHORS, POSITIVES, NEGATIVES_1, NEGATIVES_2]


def make_losses(model, gather: bool) -> dict[str, torch.nn.Module]:
    return {
        "focal": FocalInfoNCE(model, temperature=0.05, gamma=0.5, gather_across_devices=gather),
        "mixing": FocalInfoNCE(
            model,
            temperature=0.05,
            gamma=0.5,
            gather_across_devices=gather,
            hard_negative_mixing=HardNegativeMixing(seed=4),
        ),
        "cached": CachedFocalInfoNCE(
            model,
            mini_batch_size=2,
            temperature=0.05,
            gamma=0.5,
            gather_across_devices=gather,
            hard_negative_mixing=HardNegativeMixing(seed=4),
        ),
        # margin 0.002: the tiny random model's cosines are close together, so the margin rule fires too
        "masked": FocalInfoNCE(
            model,
            temperature=0.05,
            gamma=0.5,
            gather_across_devices=gather,
            false_negative_mask=True,
            false_negative_margin=0.002,
        ),
        "masked_cached": CachedFocalInfoNCE(
            model,
            mini_batch_size=2,
            temperature=0.05,
            gamma=0.5,
            gather_across_devices=gather,
            hard_negative_mixing=HardNegativeMixing(seed=4),
            false_negative_mask=True,
            false_negative_margin=0.002,
        ),
    }


def main() -> None:
    model_dir, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build_model(model_dir, dtype="float32", device="cpu")
    model.eval()
    per_rank = len(ANCHORS) // world
    results = {}
    for name, loss in make_losses(model, gather=True).items():
        local = [column[rank * per_rank : (rank + 1) * per_rank] for column in columns_for(name)]
        model.zero_grad()
        value = loss(featurize(model, local), None)
        value.backward()
        value = value.detach().clone()
        dist.all_reduce(value)
        grads = {}
        for param_name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            dist.all_reduce(grad)
            grads[param_name] = grad / world
        results[name] = {"loss": (value / world).item(), "grads": grads}
        inner = getattr(loss, "loss", loss)
        if inner.last_false_negative_count is not None:  # masked candidates of this rank's rows, summed over ranks
            count = inner.last_false_negative_count.clone()
            dist.all_reduce(count)
            results[name]["masked"] = int(count)
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
