"""``ContrastiveDistillation``: focal InfoNCE plus KL distillation from precomputed teacher scores."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from sentence_transformers import SentenceTransformer, util
from torch import Tensor, nn

from kalm_st.losses import functional
from kalm_st.losses._compat import embed_columns
from kalm_st.losses.focal_info_nce import FocalInfoNCE


class ContrastiveDistillation(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        base_loss: FocalInfoNCE | None = None,
        alpha: float = 1.0,
        teacher_temperature: float | None = None,
        student_temperature: float | None = None,
        include_in_batch: bool = False,
    ) -> None:
        """Contrastive distillation with fine-grained soft signals: ``L = L_focal + alpha * L_kd`` (METHOD.md §3).

        ``L_kd = mean_i KL(softmax(t_i / tau_T) || softmax(u_i / tau_S))``, where ``t_i`` are the teacher's scores
        of query i's candidates (precomputed offline, in the ``label`` column) and ``u_i`` the student's
        similarities (``base_loss.similarity_fct``, no scale). The model embeds each batch once; both terms use
        those embeddings, so :class:`~sentence_transformers.sentence_transformer.losses.MatryoshkaLoss` applies
        both at every dimension with the same weight.

        Args:
            model: The SentenceTransformer to train (the student).
            base_loss: The contrastive term; default ``FocalInfoNCE(model)`` (tau 0.01, gamma 0.5).
            alpha: Weight of the KD term (default 1.0; unknown in the paper).
            teacher_temperature: tau_T. Default ``None`` = the student temperature.
            student_temperature: tau_S. Default ``None`` = ``base_loss.temperature`` (0.01), so the KD term shapes
                the same distribution the contrastive term trains. Equal temperatures suit an embedding teacher whose
                scores are cosine similarities (the paper's Qwen3-Embedding-8B): the student then matches the
                teacher's cosine gaps. For a reranker teacher emitting logits, set ``teacher_temperature`` near 1.
            include_in_batch: Also distill over in-batch candidates (other rows' positives and negatives). Teacher
                scores for those cannot be stored per row, so ``label`` must then hold the teacher's *embeddings*
                ``(batch, 2 + n, d_teacher)`` of (anchor, positive, negative_1..n); the teacher score matrix is
                ``base_loss.similarity_fct`` of them, in the layout of the student's in-batch logits, and row i's
                target is the softmax of its row of that ``N x (1 + n) N`` matrix (beyond the paper, whose targets are
                query i's own candidates only; default off, the paper's). ``kalm-st teacher-embed`` writes that
                ``label`` column from a cache of teacher embeddings.

        Inputs:
            +-------------------------------------------------+-----------------------------------------------------+
            | Inputs                                          | Labels                                              |
            +=================================================+=====================================================+
            | (anchor, positive, negative_1, ..., negative_n) | teacher scores ``[s(q, p), s(q, n_1), ...]``, 1 + n |
            +-------------------------------------------------+-----------------------------------------------------+
            | (anchor, positive, negative_1, ..., negative_n) | teacher embeddings ``(2 + n, d_teacher)`` per row   |
            +-------------------------------------------------+-----------------------------------------------------+

            With teacher embeddings and ``include_in_batch=False``, the teacher scores are
            ``base_loss.similarity_fct(t_anchor, t_candidate)`` of each row's own candidates (the paper's targets,
            from an embedding teacher).

        False negatives:
            ``base_loss``'s ``false_negative_mask`` (if on) masks the contrastive term only; the KD term keeps every
            candidate, since the teacher's score of a duplicate or a near-positive is the soft signal to learn.

        Relations:
            - The KD term equals sentence-transformers' ``DistillKLDivLoss(similarity_fct=pairwise_cos_sim,
              student_temperature=tau_S, teacher_temperature=tau_T)`` divided by ``tau_S ** 2`` (tested); that loss
              cannot add the contrastive term in the same forward pass nor use in-batch candidates.

        Example:
            ::

                loss = ContrastiveDistillation(model, FocalInfoNCE(model, gamma=0.5), alpha=1.0)
        """
        super().__init__()
        if base_loss is None:
            base_loss = FocalInfoNCE(model)
        if not isinstance(base_loss, FocalInfoNCE):
            raise ValueError(f"base_loss must be a FocalInfoNCE, got {type(base_loss).__name__}")
        if base_loss.model is not model:
            raise ValueError("base_loss must wrap the same model as ContrastiveDistillation.")
        if not (isinstance(alpha, int | float) and 0 <= alpha < float("inf")):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.model = model
        self.base_loss = base_loss
        self.alpha = float(alpha)
        self._student_temperature = student_temperature
        self._teacher_temperature = teacher_temperature
        for name in ("student_temperature", "teacher_temperature"):
            functional.check_temperature(name, getattr(self, name))
        self.include_in_batch = bool(include_in_batch)

    @property
    def student_temperature(self) -> float:
        value = self._student_temperature
        return self.base_loss.temperature if value is None else float(value)

    @property
    def teacher_temperature(self) -> float:
        value = self._teacher_temperature
        return self.student_temperature if value is None else float(value)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        text_keys = self.base_loss.text_keys(sentence_features) if self.base_loss.false_negative_mask else None
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, text_keys=text_keys)

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        labels: Tensor | Sequence[Sequence[float]] | None,
        *,
        text_keys: list[Tensor] | None = None,
    ) -> Tensor:
        """``L_focal + alpha * L_kd``; ``text_keys`` feed the base loss's false-negative mask (if on)."""
        kd = self.distillation_loss(embeddings, labels)  # validates the labels first
        return self.base_loss.compute_loss_from_embeddings(embeddings, text_keys=text_keys) + self.alpha * kd

    def distillation_loss(self, embeddings: list[Tensor], labels: Tensor | Sequence[Sequence[float]] | None) -> Tensor:
        """``L_kd`` alone: mean over rows of KL(teacher || student)."""
        self.base_loss.check_columns(embeddings)
        owner = type(self).__name__
        queries, docs = embeddings[0], list(embeddings[1:])
        batch_size, num_candidates = queries.size(0), len(docs)
        similarity_fct = self.base_loss.similarity_fct
        if not self.include_in_batch:
            if isinstance(labels, Tensor) and labels.ndim == 3:  # teacher embeddings: score each row's own group
                teacher_embeddings = functional.check_teacher_embeddings(labels, batch_size, num_candidates + 1, owner)
                teacher_embeddings = teacher_embeddings.to(queries.device)
                teacher = functional.rowwise_logits(
                    teacher_embeddings[:, 0], teacher_embeddings[:, 1:], 1.0, similarity_fct
                )
            else:
                teacher = functional.check_teacher_scores(labels, batch_size, num_candidates, owner)
                teacher = teacher.to(queries.device)
            student = functional.rowwise_logits(queries, torch.stack(docs, dim=1), 1.0, similarity_fct)
        else:
            owner = f"{owner}(include_in_batch=True)"
            teacher_embeddings = functional.check_teacher_embeddings(labels, batch_size, num_candidates + 1, owner)
            teacher_embeddings = teacher_embeddings.to(queries.device)
            teacher_docs = list(teacher_embeddings[:, 1:].unbind(1))
            if self.base_loss.gather_across_devices and util.get_world_size() > 1:
                docs = [util.all_gather_with_grad(d) for d in docs]
                teacher_docs = [util.all_gather_with_grad(d) for d in teacher_docs]
            # Row i's targets cover every in-batch candidate, in the layout of FocalInfoNCE's logits:
            # [P_1..P_N, N1_1..N1_N, ...] (column-major over the candidate columns).
            teacher = functional.similarity_logits(
                teacher_embeddings[:, 0], torch.cat(teacher_docs), 1.0, similarity_fct
            )
            student = functional.similarity_logits(queries, torch.cat(docs), 1.0, similarity_fct)
        return functional.kl_distill(student, teacher, self.student_temperature, self.teacher_temperature)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "base_loss": type(self.base_loss).__name__,
            **self.base_loss.get_config_dict(),
            "alpha": self.alpha,
            "student_temperature": self.student_temperature,
            "teacher_temperature": self.teacher_temperature,
            "include_in_batch": self.include_in_batch,
        }

    @property
    def citation(self) -> str:
        return self.base_loss.citation


__all__ = ["ContrastiveDistillation"]
