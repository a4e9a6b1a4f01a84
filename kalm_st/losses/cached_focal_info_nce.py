"""``CachedFocalInfoNCE``: :class:`~kalm_st.losses.FocalInfoNCE` with GradCache, for batches larger than memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers import SentenceTransformer, util
from sentence_transformers.base.losses import CachedLossMixin
from torch import Tensor, nn

from kalm_st.losses._citations import GRADCACHE_BIBTEX
from kalm_st.losses.focal_info_nce import FocalInfoNCE
from kalm_st.losses.functional import SimilarityFct
from kalm_st.losses.hard_negative_mixing import HardNegativeMixing


class CachedFocalInfoNCE(CachedLossMixin, nn.Module):
    # The hyperparameters live on the wrapped FocalInfoNCE; assignments are forwarded to it (see __setattr__).
    _delegated_to_wrapped_loss = (
        "temperature",
        "gamma",
        "in_batch_negatives",
        "hard_negative_mixing",
        "gather_across_devices",
        "similarity_fct",
        "false_negative_mask",
        "false_negative_margin",
    )

    def __init__(
        self,
        model: SentenceTransformer,
        mini_batch_size: int = 32,
        temperature: float = 0.01,
        gamma: float = 0.5,
        in_batch_negatives: bool = True,
        hard_negative_mixing: HardNegativeMixing | None = None,
        gather_across_devices: bool = False,
        similarity_fct: SimilarityFct = util.cos_sim,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        false_negative_mask: bool = False,
        false_negative_margin: float = 0.1,
    ) -> None:
        """:class:`FocalInfoNCE` with gradient caching (GradCache): same loss and gradients, memory bounded by
        ``mini_batch_size`` rather than the batch size.

        Objective: ``L = mean_i -(1 - p_i)^gamma * log p_i`` over in-batch, hard and synthetic negatives
        (METHOD.md §3). The embeddings are computed without gradients mini-batch by mini-batch, the loss is computed
        (and back-propagated to the embeddings) in chunks of ``mini_batch_size`` rows, then each mini-batch is
        re-embedded with gradients. Dropout masks are replayed (``RandContext``) and the mixing weights come from
        :class:`HardNegativeMixing`'s own generator, drawn once per step, so with equal seeds the result equals
        :class:`FocalInfoNCE`.

        Args:
            model: The SentenceTransformer to train.
            mini_batch_size: Rows per embedding mini-batch and per loss chunk (memory knob, not a hyperparameter).
            temperature, gamma, in_batch_negatives, hard_negative_mixing, gather_across_devices, similarity_fct,
            false_negative_mask, false_negative_margin: As :class:`FocalInfoNCE`, which validates and owns them (the
                mask is applied per loss chunk with the whole batch's candidates and text fingerprints, so it is the
                same mask; its count is kept on the wrapped loss, ``loss.last_false_negative_count``).
            mini_batch_num_tokens: Pack embedding mini-batches by token count instead (sentence-transformers).
            show_progress_bar: Show the mini-batch progress.

        References:
            - GradCache: Gao et al., 2021 (https://arxiv.org/abs/2101.06983); KaLM-V2; focal loss.

        Inputs:
            +-------------------------------------------------+--------+
            | Inputs                                          | Labels |
            +=================================================+========+
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Relations:
            - Equal to :class:`FocalInfoNCE` (loss and gradients) with dropout off or replayed.

        Example:
            ::

                loss = CachedFocalInfoNCE(model, mini_batch_size=32, gamma=0.5)
        """
        super().__init__()
        if not (isinstance(mini_batch_size, int) and mini_batch_size > 0):
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and mini_batch_num_tokens <= 0:
            raise ValueError(
                f"mini_batch_num_tokens must be a positive integer or None, got {mini_batch_num_tokens!r}"
            )
        self.model = model
        self.loss = FocalInfoNCE(
            model,
            temperature=temperature,
            gamma=gamma,
            in_batch_negatives=in_batch_negatives,
            hard_negative_mixing=hard_negative_mixing,
            gather_across_devices=gather_across_devices,
            similarity_fct=similarity_fct,
            false_negative_mask=false_negative_mask,
            false_negative_margin=false_negative_margin,
        )
        self._text_keys: list[Tensor] | None = None  # the current forward's fingerprints, read by calculate_loss
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._delegated_to_wrapped_loss and isinstance(getattr(self, "loss", None), nn.Module):
            setattr(self.loss, name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in type(self)._delegated_to_wrapped_loss:
            return getattr(self._modules["loss"], name)
        return super().__getattr__(name)

    @property
    def scale(self) -> float:
        return self.loss.scale

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The focal InfoNCE of the whole batch from its mini-batch embeddings, chunked over ``mini_batch_size`` rows
        (each chunk back-propagated at once when ``with_backward``)."""
        batch = self.loss.prepare([torch.cat(column) for column in reps], self._text_keys)
        batch_size = batch.batch_size
        total: Tensor | None = None
        for begin in range(0, batch_size, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, batch_size)
            chunk = self.loss.rows_loss(batch, begin, end, reduction="sum") / batch_size
            if with_backward:
                chunk.backward()
                chunk = chunk.detach()
            total = chunk if total is None else total + chunk
        assert total is not None  # batch_size >= 1
        self.loss.record_false_negatives(batch)
        return total

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(
                f"{type(self).__name__} expects the columns (anchor, positive, negative_1, ..., negative_n), "
                f"got {len(sentence_features)} column(s)."
            )
        # The fingerprints come from the token ids, which calculate_loss (called by forward_cached, once per
        # Matryoshka dim) never sees.
        self._text_keys = self.loss.text_keys(sentence_features) if self.loss.false_negative_mask else None
        try:
            return self.forward_cached(sentence_features, labels)
        finally:
            self._text_keys = None

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **self.loss.get_config_dict(),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def citation(self) -> str:
        return self.loss.citation + GRADCACHE_BIBTEX


__all__ = ["CachedFocalInfoNCE"]
