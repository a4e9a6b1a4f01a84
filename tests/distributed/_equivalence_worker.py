"""Run by tests/distributed/test_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

For each case of the spec (a JSON file: ``{"config": ..., "out": ..., "cases": {name: [override, ...]}}``) it trains
the same ``kalm-st train`` stage twice in this process group, with DDP and with ``sharding: {strategy: fsdp2}``
(plus the case's overrides prefixed ``fsdp2:``),
and rank 0 saves the logged losses and the final full weights of both (the losses' projections too) to ``out``.
The FSDP2 runs of the first case and of ``lora`` also write their final model folder (``{out_dir}/final``) through
the stage's save.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kalm_st.distributed.final_save import save_final_model  # noqa: E402
from kalm_st.losses import distillation_losses  # noqa: E402
from kalm_st.recipe.build import build_stage  # noqa: E402
from kalm_st.recipe.config import load_config  # noqa: E402


def weights_of(run) -> dict[str, torch.Tensor]:
    """The full weights (gathered on rank 0 under FSDP2: a collective)."""
    if hasattr(run.trainer, "full_state_dict"):
        return run.trainer.full_state_dict()
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def train(config_path: str, overrides: list[str], save_to: str | None) -> dict:
    config = load_config(config_path, overrides)
    torch.manual_seed(0)  # the projection's random start: as in a fresh process, whatever ran before
    run = build_stage(config)
    initial = weights_of(run)
    run.trainer.train()
    weights = weights_of(run)
    if save_to is not None:
        save_final_model(run.trainer, run.model, save_to, config)
    projections = [
        p.detach().clone() for loss in distillation_losses(run.losses) for p in loss.projection.parameters()
    ]
    losses = [entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "initial": initial, "weights": weights, "projections": projections}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(1)
    results = {}
    for index, (name, overrides) in enumerate(spec["cases"].items()):
        out_dir = os.path.join(spec["out"], name)
        common = [f"output_dir={out_dir}", *(o for o in overrides if not o.startswith("fsdp2:"))]
        only_fsdp = [o.removeprefix("fsdp2:") for o in overrides if o.startswith("fsdp2:")]
        ddp = train(spec["config"], common, None)
        save_to = os.path.join(out_dir, "final") if index == 0 or name == "lora" else None
        fsdp = train(spec["config"], [*common, "sharding.strategy=fsdp2", *only_fsdp], save_to)
        results[name] = {"ddp": ddp, "fsdp2": fsdp}
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(spec["out"], "results.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
