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
from tests.losses._helpers import ANCHORS, NEGATIVES_1, NEGATIVES_2, POSITIVES, featurize  # noqa: E402


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
    }


def main() -> None:
    model_dir, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build_model(model_dir, dtype="float32", device="cpu")
    model.eval()
    columns = [ANCHORS, POSITIVES, NEGATIVES_1, NEGATIVES_2]
    per_rank = len(ANCHORS) // world
    local = [column[rank * per_rank : (rank + 1) * per_rank] for column in columns]
    results = {}
    for name, loss in make_losses(model, gather=True).items():
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
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
