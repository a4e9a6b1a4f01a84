"""``HardNegativeMixing``: the online hard-negative mixing option of :class:`~kalm_st.losses.FocalInfoNCE`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from sentence_transformers import util
from torch import Tensor

from kalm_st.losses import functional
from kalm_st.losses.functional import SimilarityFct


class HardNegativeMixing:
    """Online synthesis of extra hard negatives from each query's own hard negatives (METHOD.md §3, after MoCHi).

    Objective (pair-wise): ``lambda ~ Beta(alpha, alpha)``, ``a != b`` among query i's hard negatives,
    ``n~_i = normalize(lambda * n_{i,a} + (1 - lambda) * n_{i,b})``; each ``n~_i`` adds the logit
    ``s(q_i, n~_i) / tau`` to query i's InfoNCE denominator (own query only).

    This is an option object, not a loss: pass it to :class:`~kalm_st.losses.FocalInfoNCE` (or
    :class:`~kalm_st.losses.CachedFocalInfoNCE`), which adds the synthetic logits; the InfoNCE code exists once.

    Args:
        num_mixed_negatives: Synthetic negatives per query; ``None`` (default) = M, the number of hard-negative
            columns [inferred default, METHOD.md]. ``0`` disables mixing.
        alpha: Concentration of ``Beta(alpha, alpha)`` (pair-wise) or ``Dirichlet(alpha, ..., alpha)`` (list-wise);
            default 2 [2nd].
        mode: ``"pairwise"`` (blend two hard negatives, default) or ``"listwise"`` (Dirichlet weights over all M).
        pair_selection: Pair-wise only: ``"random"`` pairs (default) or the ``"hardest"`` two by the query's score.
        detach: Stop gradients through the synthetic negatives (default True, as MoCHi).
        seed: Seed of this object's own ``torch.Generator``. Two objects with the same seed draw the same mixes, so a
            cached and an uncached loss (or a rerun) can be compared exactly; the global RNG is never touched.

    Note:
        Under multi-process training every rank draws the mixes of the whole world batch and keeps its own rows, so
        N processes draw exactly what one process draws on the concatenated batch.

    Example:
        ::

            loss = FocalInfoNCE(model, hard_negative_mixing=HardNegativeMixing(alpha=2.0, seed=42))
    """

    def __init__(
        self,
        num_mixed_negatives: int | None = None,
        alpha: float = 2.0,
        mode: Literal["pairwise", "listwise"] = "pairwise",
        pair_selection: Literal["random", "hardest"] = "random",
        detach: bool = True,
        seed: int = 0,
    ) -> None:
        if num_mixed_negatives is not None and (isinstance(num_mixed_negatives, bool) or num_mixed_negatives < 0):
            raise ValueError(f"num_mixed_negatives must be None or an integer >= 0, got {num_mixed_negatives!r}")
        functional.check_temperature("alpha", alpha)
        if mode not in ("pairwise", "listwise"):
            raise ValueError(f"mode must be 'pairwise' or 'listwise', got {mode!r}")
        if pair_selection not in ("random", "hardest"):
            raise ValueError(f"pair_selection must be 'random' or 'hardest', got {pair_selection!r}")
        self.num_mixed_negatives = num_mixed_negatives
        self.alpha = float(alpha)
        self.mode = mode
        self.pair_selection = pair_selection
        self.detach = detach
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        """Re-seed the generator: the next draws repeat the first ones."""
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        """The random state (torch convention), checkpointed so that a resumed run draws the same mixes."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"HardNegativeMixing state was saved with seed {state.get('seed')}, this one has {self.seed}"
            )
        self.generator.set_state(state["generator"])

    # kalm_st.loss_state: the generator is checkpointed into each checkpoint-N and restored on resume
    loss_state_file: ClassVar[str] = "hard_negative_mixing.pt"
    loss_state_noun: ClassVar[str] = "hard-negative mixing states"
    loss_state_missing: ClassVar[str] = (
        "hard-negative mixing restarts from its seed, so the resumed run will not replay the uninterrupted run's "
        "mixes exactly."
    )

    def loss_state(self) -> dict[str, Any]:
        return self.state_dict()

    def load_loss_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    def num_synthetic(self, num_hard_negatives: int) -> int:
        """Synthetic negatives per query for ``num_hard_negatives`` hard-negative columns."""
        return num_hard_negatives if self.num_mixed_negatives is None else self.num_mixed_negatives

    def draw(
        self,
        queries: Tensor,
        negatives: Tensor,
        similarity_fct: SimilarityFct = util.cos_sim,
        rank: int = 0,
        world_size: int = 1,
    ) -> Tensor:
        """Mixing weights ``(N, K, M)`` for local queries ``(N, d)`` and their hard negatives ``(N, M, d)``.

        Draws for ``N * world_size`` rows and keeps rows ``rank * N .. (rank + 1) * N``.
        """
        num_rows, num_negatives = negatives.size(0), negatives.size(1)
        num_mixed = self.num_synthetic(num_negatives)
        scores = None
        if self.mode == "pairwise" and self.pair_selection == "hardest":
            with torch.no_grad():
                scores = functional.rowwise_logits(queries, negatives, 1.0, similarity_fct)
        return functional.sample_mixing_weights(
            num_rows * world_size,
            num_negatives,
            num_mixed,
            alpha=self.alpha,
            mode=self.mode,
            pair_selection=self.pair_selection,
            generator=self.generator,
            scores=scores,
            rows=slice(rank * num_rows, (rank + 1) * num_rows),
        )

    def apply(self, negatives: Tensor, weights: Tensor) -> Tensor:
        """Synthetic negatives ``(N, K, d)`` from hard negatives ``(N, M, d)`` and weights ``(N, K, M)``."""
        if self.detach:
            negatives = negatives.detach()
        return functional.mix_hard_negatives(negatives, weights)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "num_mixed_negatives": self.num_mixed_negatives,
            "alpha": self.alpha,
            "mode": self.mode,
            "pair_selection": self.pair_selection,
            "detach": self.detach,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())
        return f"HardNegativeMixing({args})"


__all__ = ["HardNegativeMixing"]
