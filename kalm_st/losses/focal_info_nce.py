"""``FocalInfoNCE``: KaLM-V2's focal-reweighted InfoNCE with in-batch, hard and mixed negatives."""

from __future__ import annotations

import logging
import math
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

logger = logging.getLogger(__name__)

NO_TEXT = -1
"""Fingerprint of a candidate without a text (a synthetic negative): never equal to a real one (those are >= 0)."""


@dataclass
class FocalBatch:
    """One batch's embeddings laid out for :meth:`FocalInfoNCE.rows_loss` (built by :meth:`FocalInfoNCE.prepare`)."""

    queries: Tensor  # (N, d), this process's anchors
    docs: list[Tensor]  # 1 + M tensors (N, d): positive, negative_1..M (local)
    docs_all: Tensor | None  # ((1 + M) * N * world, d) column-major [P..P, N1..N1, ...], if in-batch negatives
    offset: int  # index of local row 0's positive in docs_all
    mix_weights: Tensor | None  # (N, K, M) hard-negative mixing weights, or None
    doc_keys: list[Tensor] | None = None  # 1 + M text fingerprints (N,) of the local docs, for the false-negative mask
    doc_keys_all: Tensor | None = None  # their gathered layout, as docs_all
    num_masked: Tensor | None = None  # candidates masked as false negatives so far (sum over rows_loss calls)

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
        false_negative_mask: bool = False,
        false_negative_margin: float = 0.1,
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
            false_negative_mask: Beyond the paper (off by default, which is the paper's loss): drop from ``Z_i`` every
                candidate ``c`` (never the positive) that (a) is the same text as query i's positive, or (b) scores
                ``s(q_i, c) > s(q_i, p_i) + false_negative_margin``, as Qwen3-Embedding does; see below.
            false_negative_margin: The margin of rule (b), on the similarity's scale (cosine), ``>= 0``; default 0.1
                (Qwen3-Embedding). With cosine similarity, 2 or more turns rule (b) off.

        False-negative mask:
            With mined negatives taken from other rows' positives, row j's hard negative can be row i's positive, which
            caps ``p_i`` at 0.5. Masked candidates get the logit ``-inf`` (:func:`~kalm_st.losses.functional.
            false_negative_mask`). Rule (a) compares texts by identity without strings: :meth:`forward` fingerprints
            each column's unpadded ``input_ids`` (:func:`~kalm_st.losses.functional.text_fingerprints`), so equal
            token ids, i.e. the same text with the same prompt, mean "same text"; the fingerprints are gathered with
            the candidates under ``gather_across_devices``. It covers in-batch candidates and the row's own hard
            negatives; synthetic (mixed) negatives have no text and are subject to rule (b) only.
            ``compute_loss_from_embeddings`` without ``text_keys`` applies rule (b) only (and warns once).
            The number of masked candidates of the last call is ``last_false_negative_count`` (a tensor, no device
            sync); :class:`~kalm_st.losses.FalseNegativeLoggingCallback` puts its mean per loss call into the
            Trainer's logs as ``false_negatives_masked``.

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
            - ``gamma=0`` without mixing and mask is
              :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` with
              ``scale = 1 / temperature`` (the same float32 operations; tested, gradients included). MNRL has no
              false-negative mask;
              :class:`~sentence_transformers.sentence_transformer.losses.GISTEmbedLoss` masks by a guide model's
              scores instead (``margin_strategy``), not by text identity.
            - Logits, mixing and the softmax run in at least float32 whatever the embeddings' dtype.
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
        margin = false_negative_margin
        if isinstance(margin, bool) or not (isinstance(margin, int | float) and 0 <= margin < math.inf):
            raise ValueError(f"false_negative_margin must be a finite number >= 0, got {margin!r}")
        self.false_negative_mask = bool(false_negative_mask)
        self.false_negative_margin = float(margin)
        self.last_false_negative_count: Tensor | None = None
        self._false_negative_sum: Tensor | None = None  # since the last pop_false_negative_stats(), training only
        self._false_negative_calls = 0
        self._warned_without_text_keys = False

    @property
    def scale(self) -> float:
        """``1 / temperature``, sentence-transformers' name for it."""
        return 1.0 / self.temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        text_keys = self.text_keys(sentence_features) if self.false_negative_mask else None
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, text_keys=text_keys)

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None = None, *, text_keys: list[Tensor] | None = None
    ) -> Tensor:
        """The loss of one batch of column embeddings ``[anchor, positive, negative_1, ...]`` (labels unused).

        ``text_keys``: for the false-negative mask's rule (a), one ``(N,)`` fingerprint tensor per candidate column
        (positive, negative_1, ...), as :meth:`text_keys` makes them; ``None`` applies rule (b) only.
        """
        batch = self.prepare(embeddings, text_keys)
        loss = self.rows_loss(batch, 0, batch.batch_size, reduction="sum") / batch.batch_size
        self.record_false_negatives(batch)
        return loss

    def text_keys(self, sentence_features: list[dict[str, Tensor]]) -> list[Tensor]:
        """Text fingerprints ``(N,)`` of the candidate columns (positive, negative_1, ...) from their token ids."""
        keys = []
        for index, features in enumerate(sentence_features[1:]):
            column = functional._candidate_name(index)
            if "cu_seq_lens_q" in features or not isinstance(features.get("input_ids"), Tensor):
                raise ValueError(
                    f"{type(self).__name__}(false_negative_mask=True) recognises duplicate texts by their padded "
                    f"'input_ids' (with 'attention_mask'), which the features of column {index + 1} ({column}) "
                    "lack (flattened or non-text inputs): use padded text inputs or turn the mask off."
                )
            keys.append(functional.text_fingerprints(features["input_ids"], features.get("attention_mask")))
        return keys

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

    def prepare(self, embeddings: list[Tensor], text_keys: list[Tensor] | None = None) -> FocalBatch:
        """Validate the columns, gather candidates across processes and draw this batch's mixing weights."""
        self.check_columns(embeddings)
        queries, docs = embeddings[0], list(embeddings[1:])
        doc_keys = self._check_text_keys(text_keys, docs) if self.false_negative_mask else None
        # Both are 0 and 1 when torch.distributed is not initialised.
        rank, world_size = util.get_rank(), util.get_world_size()
        docs_all, offset, doc_keys_all = None, 0, None
        if self.in_batch_negatives:
            gather = self.gather_across_devices and world_size > 1
            docs_all = torch.cat([util.all_gather_with_grad(d) for d in docs] if gather else docs, dim=0)
            offset = rank * queries.size(0) if gather else 0
            if doc_keys is not None:
                doc_keys_all = torch.cat([util.all_gather(k) for k in doc_keys] if gather else doc_keys)
        mix_weights = None
        mixing = self.hard_negative_mixing
        if mixing is not None and mixing.num_synthetic(len(docs) - 1) > 0:
            # Every rank draws the world batch's mixes and keeps its rows (gathering or not): see HardNegativeMixing.
            with torch.no_grad():
                mix_weights = mixing.draw(queries, torch.stack(docs[1:], dim=1), self.similarity_fct, rank, world_size)
        return FocalBatch(
            queries=queries,
            docs=docs,
            docs_all=docs_all,
            offset=offset,
            mix_weights=mix_weights,
            doc_keys=doc_keys,
            doc_keys_all=doc_keys_all,
        )

    def _check_text_keys(self, text_keys: list[Tensor] | None, docs: list[Tensor]) -> list[Tensor] | None:
        if text_keys is None:
            if not self._warned_without_text_keys:
                logger.warning(
                    "%s(false_negative_mask=True) got no text fingerprints (compute_loss_from_embeddings without "
                    "text_keys): only the margin rule applies, duplicates of the positive's text are not masked.",
                    type(self).__name__,
                )
                self._warned_without_text_keys = True
            return None
        if len(text_keys) != len(docs) or any(k.shape != (d.size(0),) for k, d in zip(text_keys, docs, strict=False)):
            raise ValueError(
                f"{type(self).__name__}: text_keys must hold one (batch,) tensor per candidate column "
                f"({len(docs)} columns of {docs[0].size(0)} rows), got shapes {[tuple(k.shape) for k in text_keys]}."
            )
        return [k.to(device=d.device, dtype=torch.long) for k, d in zip(text_keys, docs, strict=True)]

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
        num_synthetic = 0
        if batch.mix_weights is not None and self.hard_negative_mixing is not None:
            negatives = torch.stack([d[begin:end] for d in batch.docs[1:]], dim=1)
            synthetic = self.hard_negative_mixing.apply(negatives, batch.mix_weights[begin:end])
            synthetic_logits = functional.rowwise_logits(queries, synthetic, self.scale, self.similarity_fct)
            logits = torch.cat([logits, synthetic_logits.to(logits.dtype)], dim=1)
            num_synthetic = synthetic_logits.size(1)
        if self.false_negative_mask:
            logits = self._mask_false_negatives(batch, logits, target, begin, end, num_synthetic)
        return functional.focal_info_nce(logits, target, self.gamma, reduction=reduction)

    def _mask_false_negatives(
        self, batch: FocalBatch, logits: Tensor, target: Tensor, begin: int, end: int, num_synthetic: int
    ) -> Tensor:
        positive_keys = candidate_keys = None
        if batch.doc_keys is not None:
            positive_keys = batch.doc_keys[0][begin:end]
            if batch.doc_keys_all is not None:  # in-batch: one layout for every row, as docs_all
                candidate_keys = batch.doc_keys_all
            else:  # own candidates only: (rows, 1 + M)
                candidate_keys = torch.stack([k[begin:end] for k in batch.doc_keys], dim=1)
            if num_synthetic:
                no_text = candidate_keys.new_full((*candidate_keys.shape[:-1], num_synthetic), NO_TEXT)
                candidate_keys = torch.cat([candidate_keys, no_text], dim=-1)
        mask = functional.false_negative_mask(
            logits,
            target,
            margin=self.false_negative_margin,
            scale=self.scale,
            positive_keys=positive_keys,
            candidate_keys=candidate_keys,
        )
        count = mask.sum()
        batch.num_masked = count if batch.num_masked is None else batch.num_masked + count
        return logits.masked_fill(mask, float("-inf"))

    def record_false_negatives(self, batch: FocalBatch) -> None:
        """Keep the batch's count of masked candidates (``last_false_negative_count``; summed while training for
        :meth:`pop_false_negative_stats`). Called once per loss computation (the cached loss: once for all chunks)."""
        if batch.num_masked is None:
            return
        count = batch.num_masked.detach()
        self.last_false_negative_count = count
        if self.model.training:
            self._false_negative_sum = count if self._false_negative_sum is None else self._false_negative_sum + count
            self._false_negative_calls += 1
        if logger.isEnabledFor(logging.DEBUG):  # .item() syncs the device: only when asked for
            logger.debug("%s masked %d false-negative candidates", type(self).__name__, int(count.item()))

    def pop_false_negative_stats(self) -> tuple[float, int]:
        """``(masked candidates summed over training calls, number of calls)`` since the last pop; resets both."""
        total = 0.0 if self._false_negative_sum is None else float(self._false_negative_sum.item())
        calls = self._false_negative_calls
        self._false_negative_sum, self._false_negative_calls = None, 0
        return total, calls

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "temperature": self.temperature,
            "gamma": self.gamma,
            "in_batch_negatives": self.in_batch_negatives,
            "gather_across_devices": self.gather_across_devices,
            "similarity_fct": util.similarity_fct_name(self.similarity_fct),
            "false_negative_mask": self.false_negative_mask,
            "false_negative_margin": self.false_negative_margin,
        }
        if self.hard_negative_mixing is not None:
            config["hard_negative_mixing"] = self.hard_negative_mixing.get_config_dict()
        return config

    @property
    def citation(self) -> str:
        return KALM_V2_BIBTEX + FOCAL_LOSS_BIBTEX + (MOCHI_BIBTEX if self.hard_negative_mixing is not None else "")


__all__ = ["FocalBatch", "FocalInfoNCE"]
