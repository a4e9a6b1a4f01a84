"""``SentenceTransformerTrainer`` over an FSDP2-sharded model: sharded checkpoints, resume, one portable final save.

- The model is sharded in place after the Trainer is built (:func:`~kalm_st.distributed.sharding.shard_model`), and
  the Trainer is told that the model owns its placement and gradient reduction (transformers' flag for a model sharded
  at load time), so it neither wraps it in DDP nor shards it again; each loss keeps calling the same model object.
- A ``checkpoint-N`` holds the model and optimizer as ``torch.distributed.checkpoint`` shards (``model_shards/``,
  ``optimizer_shards/``: every process writes its own part, nothing is gathered), the scheduler, each process's RNG
  state and ``trainer_state.json`` (the Trainer's), and the losses' state (:mod:`kalm_st.loss_state`). Resuming
  loads the shards into the sharded model and optimizer, with the same number of processes.
- The final save gathers the full weights once (to rank 0's CPU memory) and writes the same portable folder as an
  unsharded run, loadable by plain ``SentenceTransformer``.

transformers internals used (checked by :func:`check_trainer_hooks` against the version in use, and by the tests in
``tests/distributed/``): the ``is_distributed_loading_by_transformers`` flag and the checkpoint methods
``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``, ``_load_from_checkpoint`` and
``_defer_fsdp_gradient_reduction`` (gradient accumulation).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from kalm_st.distributed.sharding import meta_copy, shard_model
from kalm_st.recipe.config import ShardingConfig
from kalm_st.recipe.trainer import KaLMTrainer

logger = logging.getLogger(__name__)

MODEL_SHARDS = "model_shards"
OPTIMIZER_SHARDS = "optimizer_shards"
SCHEDULER_NAME = "scheduler.pt"

_HOOKS = {
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_from_checkpoint": ("resume_from_checkpoint",),
    "save_model": ("output_dir", "_internal_call"),
    "_sync_replicated_trainable_parameters": ("model",),
    "_defer_fsdp_gradient_reduction": (),
}
"""The transformers Trainer methods this module overrides or relies on, with the parameters it passes them."""


def check_trainer_hooks(source: str = "<config>") -> None:
    """Fail with a clear message when the installed transformers lacks what FSDP2 training relies on (tested with
    transformers 5.24: the Trainer honours ``is_distributed_loading_by_transformers``)."""
    import transformers

    source = inspect.getsource(Trainer.__init__)
    problems = (
        [] if "is_distributed_loading_by_transformers" in source else ["no is_distributed_loading_by_transformers"]
    )
    for name, params in _HOOKS.items():
        method = getattr(Trainer, name, None)
        if method is None or not set(params) <= set(inspect.signature(method).parameters):
            problems.append(f"no Trainer.{name}({', '.join(params)})")
    if problems:
        raise RuntimeError(
            f"{source}: sharding.strategy fsdp2 needs a transformers Trainer with {'; '.join(problems)} (transformers "
            f"{transformers.__version__} installed; tested with 5.24). Use strategy ddp or install transformers 5.24."
        )


def _state_module(trainer: Trainer) -> nn.Module:
    """The model and the losses as one module, so the optimizer's parameters (the losses' projections included)
    have stable names in the sharded optimizer state."""
    losses = trainer.loss if isinstance(trainer.loss, dict) else {"loss": trainer.loss}
    return nn.ModuleDict({"model": trainer.model, "losses": nn.ModuleDict(losses)})


class ShardedTrainer(KaLMTrainer):
    """A ``SentenceTransformerTrainer`` that trains its model under FSDP2 (``sharding: {strategy: fsdp2}``)."""

    def __init__(self, *args: Any, sharding: ShardingConfig, source: str = "<config>", **kwargs: Any) -> None:
        check_trainer_hooks(source)
        super().__init__(*args, **kwargs)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{source}: sharding.strategy fsdp2 needs several processes: launch with torchrun "
                "--nproc_per_node N (or accelerate launch)."
            )
        self.sharding = sharding
        self._skeleton = meta_copy(self.model)  # what the final save loads the gathered weights into
        shard_model(self.model, sharding, cuda=self.args.device.type == "cuda")
        # The model owns its placement and gradient reduction: no DDP wrapper, no second sharding by accelerate.
        self.is_distributed_loading_by_transformers = True

    def get_optimizer_cls_and_kwargs(self, args: Any, model: Any = None) -> tuple[Any, Any]:
        """The losses' own parameters (a distillation projection: plain tensors, replicated) get their own groups: a
        fused or foreach optimizer step cannot mix them with the model's sharded ``DTensor`` parameters."""
        from torch.distributed.tensor import DTensor

        optimizer_cls, optimizer_kwargs = super().get_optimizer_cls_and_kwargs(args, model)
        groups = optimizer_kwargs.get("optimizer_dict")
        if groups:
            split = []
            for group in groups:
                sharded = [p for p in group["params"] if isinstance(p, DTensor)]
                plain = [p for p in group["params"] if not isinstance(p, DTensor)]
                split.extend({**group, "params": params} for params in (sharded, plain) if params)
            optimizer_kwargs["optimizer_dict"] = split
        return optimizer_cls, optimizer_kwargs

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self) -> Iterator[None]:
        """Gradient accumulation: FSDP2's reduce-scatter waits for the last micro-batch (DDP's ``no_sync``). The
        Trainer's own version reads a ``distributed_config`` that only a model sharded by transformers has."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    # -- checkpoints ---------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Inside a checkpoint: the model's shards (no gather). Otherwise: the full portable model on rank 0."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save(get_model_state_dict(self.model), checkpoint_id=os.path.join(output_dir, MODEL_SHARDS))
            return
        self.save_full_model(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(_state_module(self), self.optimizer)
        dcp.save(state, checkpoint_id=os.path.join(output_dir, OPTIMIZER_SHARDS))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = get_model_state_dict(self.model)
        dcp.load(state, checkpoint_id=os.path.join(resume_from_checkpoint, MODEL_SHARDS))
        set_model_state_dict(self.model, state)
        logger.info("Loaded the model's shards from %s", resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        module = _state_module(self)
        state = get_optimizer_state_dict(module, self.optimizer)
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, OPTIMIZER_SHARDS))
        set_optimizer_state_dict(module, self.optimizer, state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    # -- the final model -----------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on rank 0's CPU (empty on the other ranks); a collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def unsharded_model(self) -> nn.Module | None:
        """On rank 0: a plain (unsharded) copy of the model with the trained weights; None on the other ranks."""
        state = self.full_state_dict()
        if not self.is_world_process_zero():
            return None
        self._skeleton.load_state_dict(state, assign=True)
        return self._skeleton

    def save_full_model(self, output_dir: str | os.PathLike[str]) -> None:
        """Write the portable model folder (rank 0; a collective, every rank calls it)."""
        model = self.unsharded_model()
        if model is not None:
            model.save(str(output_dir))
        self.accelerator.wait_for_everyone()


__all__ = ["MODEL_SHARDS", "OPTIMIZER_SHARDS", "ShardedTrainer", "check_trainer_hooks"]
