"""``FocalInfoNCE``: KaLM-V2's focal-reweighted InfoNCE with in-batch, hard and mixed negatives."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer, util
from torch import Tensor, nn

from kalm_st.losses import functional
from kalm_st.losses._citations import FOCAL_LOSS_BIBTEX, KALM_V2_BIBTEX, MOCHI_BIBTEX
from kalm_st.losses._compat import embed_columns
from kalm_st.losses.functional import SimilarityFct
from kalm_st.losses.hard_negative_mixing import HardNegativeMixing


@dataclass
class FocalBatch:
    """One batch's embeddings laid out for :meth:`FocalInfoNCE.rows_loss` (built by :meth:`FocalInfoNCE.prepare`)."""

    queries: Tensor  # (N, d), this process's anchors
    docs: list[Tensor]  # 1 + M tensors (N, d): positive, negative_1..M (local)
    docs_all: Tensor | None  # ((1 + M) * N * world, d) column-major [P..P, N1..N1, ...], if in-batch negatives
    offset: int  # index of local row 0's positive in docs_all
    mix_weights: Tensor | None  # (N, K, M) hard-negative mixing weights, or None

    @property
    def batch_size(self) -> int:
        return self.queries.size(0)


class FocalInfoNCE(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        temperature: float = 0.01,
        gamma: float = 0.5,
        in_batch_negatives: bool = True,
        hard_negative_mixing: HardNegativeMixing | None = None,
        gather_across_devices: bool = False,
        similarity_fct: SimilarityFct = util.cos_sim,
    ) -> None:
        """Focal-reweighted InfoNCE: ``L = mean_i -(1 - p_i)^gamma * log p_i`` (METHOD.md §3).

        ``p_i = exp(s(q_i, p_i) / tau) / Z_i``, where ``Z_i`` sums over the positive, the other queries' positives and
        every hard negative in the (gathered) batch, plus the synthetic negatives of :class:`HardNegativeMixing`.
        With ``in_batch_negatives=False``, ``Z_i`` holds only query i's own positive, hard and synthetic negatives.
        ``(1 - p_i)^gamma`` is computed from the log-sum-exp of the non-positive logits, so the value and gradient
        stay finite as ``p_i -> 1`` in fp32 and bf16.

        Args:
            model: The SentenceTransformer to train.
            temperature: tau; logits are ``similarity / temperature``. Default 0.01, KaLM's released setting [read].
            gamma: Focal exponent (default 0.5 [2nd]); ``gamma=0`` is plain InfoNCE.
            in_batch_negatives: Use other rows' positives and hard negatives as negatives (default). Turn off for
                classification-style data, where same-class texts elsewhere in the batch are false negatives.
            hard_negative_mixing: Optional :class:`HardNegativeMixing` adding synthetic negatives per query.
            gather_across_devices: Share candidates across processes (``torch.distributed``); gradients flow back
                to the owning rank. Queries stay local; the positive of local row i is at ``rank * N + i``.
            similarity_fct: Similarity function (default cosine).

        References:
            - KaLM-Embedding-V2 (Zhao et al., ICLR 2026); focal loss (Lin et al., 2017); MoCHi (Kalantidis et al., 2020).

        Requirements:
            1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) n-tuples, n >= 0.

        Inputs:
            +-------------------------------------------------+--------+
            | Inputs                                          | Labels |
            +=================================================+========+
            | (anchor, positive) pairs                        | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Relations:
            - ``gamma=0`` without mixing is :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`
              with ``scale = 1 / temperature`` (tested to 1e-6, gradients included).
            - :class:`~kalm_st.losses.CachedFocalInfoNCE` is the same loss with GradCache.
            - :class:`~kalm_st.losses.ContrastiveDistillation` adds a KL term from teacher scores.

        Example:
            ::

                from kalm_st.losses import FocalInfoNCE, HardNegativeMixing

                loss = FocalInfoNCE(model, temperature=0.01, gamma=0.5, hard_negative_mixing=HardNegativeMixing())
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
        """
        super().__init__()
        functional.check_temperature("temperature", temperature)
        if not (isinstance(gamma, int | float) and 0 <= gamma < float("inf")):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if hard_negative_mixing is not None and not isinstance(hard_negative_mixing, HardNegativeMixing):
            raise ValueError(
                f"hard_negative_mixing must be a HardNegativeMixing or None, got {type(hard_negative_mixing).__name__}"
            )
        self.model = model
        self.temperature = float(temperature)
        self.gamma = float(gamma)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.hard_negative_mixing = hard_negative_mixing
        self.gather_across_devices = bool(gather_across_devices)
        self.similarity_fct = similarity_fct

    @property
    def scale(self) -> float:
        """``1 / temperature``, sentence-transformers' name for it."""
        return 1.0 / self.temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss of one batch of column embeddings ``[anchor, positive, negative_1, ...]`` (labels unused)."""
        batch = self.prepare(embeddings)
        return self.rows_loss(batch, 0, batch.batch_size, reduction="sum") / batch.batch_size

    def check_columns(self, embeddings: list[Tensor]) -> None:
        """``ValueError`` for fewer than 2 columns, ragged columns, or a configuration without any negative."""
        if len(embeddings) < 2:
            raise ValueError(
                f"{type(self).__name__} expects the columns (anchor, positive, negative_1, ..., negative_n), "
                f"got {len(embeddings)} column(s)."
            )
        sizes = [e.size(0) for e in embeddings]
        if len(set(sizes)) != 1:
            raise ValueError(f"{type(self).__name__}: every column needs the same number of rows, got {sizes}.")
        num_hard = len(embeddings) - 2
        mixing = self.hard_negative_mixing
        num_mixed = mixing.num_synthetic(num_hard) if mixing is not None else 0
        if num_mixed > 0 and num_hard < 2:
            raise ValueError(
                f"{type(self).__name__}: hard_negative_mixing needs at least 2 hard-negative columns "
                f"(negative_1, negative_2), got {num_hard}."
            )
        if not self.in_batch_negatives and num_hard == 0 and num_mixed == 0:
            raise ValueError(
                f"{type(self).__name__}(in_batch_negatives=False) needs at least one negative column "
                "(anchor, positive, negative_1, ...): with only a positive, the loss is constant."
            )

    def prepare(self, embeddings: list[Tensor]) -> FocalBatch:
        """Validate the columns, gather candidates across processes and draw this batch's mixing weights."""
        self.check_columns(embeddings)
        queries, docs = embeddings[0], list(embeddings[1:])
        # Both are 0 and 1 when torch.distributed is not initialised.
        rank, world_size = util.get_rank(), util.get_world_size()
        docs_all, offset = None, 0
        if self.in_batch_negatives:
            gather = self.gather_across_devices and world_size > 1
            docs_all = torch.cat([util.all_gather_with_grad(d) for d in docs] if gather else docs, dim=0)
            offset = rank * queries.size(0) if gather else 0
        mix_weights = None
        mixing = self.hard_negative_mixing
        if mixing is not None and mixing.num_synthetic(len(docs) - 1) > 0:
            # Every rank draws the world batch's mixes and keeps its rows (gathering or not): see HardNegativeMixing.
            with torch.no_grad():
                mix_weights = mixing.draw(queries, torch.stack(docs[1:], dim=1), self.similarity_fct, rank, world_size)
        return FocalBatch(queries=queries, docs=docs, docs_all=docs_all, offset=offset, mix_weights=mix_weights)

    def rows_loss(
        self, batch: FocalBatch, begin: int, end: int, reduction: Literal["mean", "sum", "none"] = "sum"
    ) -> Tensor:
        """The focal InfoNCE of local rows ``begin:end`` (the cached loss calls this per chunk)."""
        queries = batch.queries[begin:end]
        if batch.docs_all is not None:
            logits = functional.similarity_logits(queries, batch.docs_all, self.scale, self.similarity_fct)
            target = torch.arange(batch.offset + begin, batch.offset + end, device=queries.device)
        else:
            candidates = torch.stack([d[begin:end] for d in batch.docs], dim=1)
            logits = functional.rowwise_logits(queries, candidates, self.scale, self.similarity_fct)
            target = torch.zeros(queries.size(0), dtype=torch.long, device=queries.device)
        if batch.mix_weights is not None and self.hard_negative_mixing is not None:
            negatives = torch.stack([d[begin:end] for d in batch.docs[1:]], dim=1)
            synthetic = self.hard_negative_mixing.apply(negatives, batch.mix_weights[begin:end])
            synthetic_logits = functional.rowwise_logits(queries, synthetic, self.scale, self.similarity_fct)
            logits = torch.cat([logits, synthetic_logits.to(logits.dtype)], dim=1)
        return functional.focal_info_nce(logits, target, self.gamma, reduction=reduction)

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "temperature": self.temperature,
            "gamma": self.gamma,
            "in_batch_negatives": self.in_batch_negatives,
            "gather_across_devices": self.gather_across_devices,
            "similarity_fct": util.similarity_fct_name(self.similarity_fct),
        }
        if self.hard_negative_mixing is not None:
            config["hard_negative_mixing"] = self.hard_negative_mixing.get_config_dict()
        return config

    @property
    def citation(self) -> str:
        return KALM_V2_BIBTEX + FOCAL_LOSS_BIBTEX + (MOCHI_BIBTEX if self.hard_negative_mixing is not None else "")


__all__ = ["FocalBatch", "FocalInfoNCE"]
