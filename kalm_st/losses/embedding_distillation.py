"""``EmbeddingDistillation``: a base loss plus the distance of projected student embeddings to teacher embeddings."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from sentence_transformers import SentenceTransformer, util
from sentence_transformers.base.losses import CachedLossMixin
from sentence_transformers.base.losses.gradcache import uses_gradient_cache
from torch import Tensor, nn

from kalm_st.losses import functional
from kalm_st.losses._compat import embed_columns

logger = logging.getLogger(__name__)


class EmbeddingDistillation(CachedLossMixin, nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        base_loss: nn.Module,
        teacher_dim: int,
        weight: float = 1.0,
        metric: Literal["cosine", "mse"] = "cosine",
        columns: Sequence[int] | None = None,
        bias: bool = True,
        projection_init: Literal["random", "ridge"] = "random",
        projection_init_rows: int = 256,
        projection_ridge: float = 0.01,
    ) -> None:
        """Embedding-level distillation through a trainable projection: ``L = L_base + weight * L_emb``.

        ``L_emb = mean_c mean_i dist(W e_ic + b, t_ic)`` over the chosen input columns ``c`` (default every column:
        anchor, positive, negatives) and rows ``i``, where ``e_ic`` is the student's embedding, ``t_ic`` the teacher's
        precomputed embedding (the ``label`` column, ``(2 + n, d_teacher)`` per row) and ``dist`` is ``1 - cos``
        or the mean squared error (:func:`~kalm_st.losses.functional.embedding_distill`). After
        jina-embeddings-v5-text (embedding distillation through a projection) and F2LLM-v2 (embedding MSE); beyond
        KaLM-V2, whose distillation uses scores only.

        The projection ``W: d_student -> d_teacher`` belongs to the loss, not the model: the saved model is the plain
        student (no kalm-st module, no extra weights). The SentenceTransformerTrainer puts the loss's parameters into
        its optimizer (``get_optimizer_cls_and_kwargs`` collects ``loss.named_parameters()``), so the projection
        trains and its optimizer state is checkpointed; its *weights* are loss state (:mod:`kalm_st.loss_state`), which
        :class:`~kalm_st.loss_state.LossStateCallback` saves and :func:`~kalm_st.loss_state.load_loss_state` restores.

        Args:
            model: The student.
            base_loss: The contrastive loss computed in the same forward pass, on the same embeddings:
                :class:`~kalm_st.losses.FocalInfoNCE`, :class:`~kalm_st.losses.ContrastiveDistillation` (which reads
                the same teacher embeddings; use ``include_in_batch=True`` or its per-row mode) or
                :class:`~kalm_st.losses.CachedFocalInfoNCE` (GradCache; this loss then caches too).
            teacher_dim: The teacher's embedding dimension (768 for all-mpnet-base-v2).
            weight: Weight of ``L_emb`` (default 1.0).
            metric: ``"cosine"`` (default) or ``"mse"``.
            columns: Indices of the input columns to distill (default all).
            bias: Whether the projection has a bias.
            projection_init: ``random`` (``nn.Linear``'s) or ``ridge``: start at the ridge fit of the teacher's
                embeddings on the starting student's over ``projection_init_rows`` training rows, ridge
                ``projection_ridge`` (:func:`~kalm_st.losses.fit_projection`; docs/distillation.md measured it).
                kalm-st's recipe fits it on the task's training rows before training; with your own trainer call
                ``fit_projection(loss, train_dataset, prompts)`` first.
            projection_init_rows: Rows (each with all its texts) of the ridge fit.
            projection_ridge: ``lambda`` of the fit, relative to the mean eigenvalue of the student's covariance.

        Matryoshka:
            Under :class:`~sentence_transformers.sentence_transformer.losses.MatryoshkaLoss` the loss sees truncated
            embeddings ``e[:d]``; one projection serves every ``d`` through its first ``d`` input columns
            (:func:`~kalm_st.losses.functional.project_truncated`: the truncation zero-padded), so each Matryoshka
            prefix is trained to carry the teacher's information and the projection's size does not grow with the
            number of dims. ``MatryoshkaLoss`` also truncates ``label`` tensors whose last dimension equals the
            student's: a teacher of the student's own dimension is refused under it (clear error).

        GradCache:
            With a cached base loss the step runs GradCache (embeddings without gradients, the loss and its embedding
            gradients, then re-embedding). The projection's gradient is computed during the loss step, kept aside and
            added when the outer backward reaches the loss, scaled by its incoming gradient (gradient accumulation,
            fp16 scaling) and by the Matryoshka weight of the dimension; so it equals the uncached gradient.

        Inputs:
            +-------------------------------------------------+------------------------------------------------+
            | Inputs                                          | Labels                                         |
            +=================================================+================================================+
            | (anchor, positive, negative_1, ..., negative_n) | teacher embeddings ``(2 + n, d_teacher)``      |
            +-------------------------------------------------+------------------------------------------------+

        Several processes: the projection is outside the DDP-wrapped (or FSDP2-sharded) model, so neither averages its
        gradients; :class:`~kalm_st.loss_state.LossStateCallback` does (and starts every rank from rank 0's weights).
        A multi-process run without it raises. ``kalm-st train`` adds it.

        Example:
            ::

                base = ContrastiveDistillation(model, FocalInfoNCE(model), include_in_batch=True)
                loss = EmbeddingDistillation(model, base, teacher_dim=768, weight=1.0)
        """
        super().__init__()
        if base_loss is None or not isinstance(base_loss, nn.Module):
            raise ValueError(f"base_loss must be a loss module, got {type(base_loss).__name__}")
        if getattr(base_loss, "model", model) is not model:
            raise ValueError("base_loss must wrap the same model as EmbeddingDistillation.")
        if not (isinstance(teacher_dim, int) and teacher_dim > 0):
            raise ValueError(f"teacher_dim must be a positive integer, got {teacher_dim!r}")
        if not (isinstance(weight, int | float) and 0 <= weight < float("inf")):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if metric not in ("cosine", "mse"):
            raise ValueError(f"metric must be 'cosine' or 'mse', got {metric!r}")
        if projection_init not in ("random", "ridge"):
            raise ValueError(f"projection_init must be 'random' or 'ridge', got {projection_init!r}")
        if not (isinstance(projection_init_rows, int) and projection_init_rows > 0):
            raise ValueError(f"projection_init_rows must be a positive integer, got {projection_init_rows!r}")
        if not (isinstance(projection_ridge, int | float) and 0 <= projection_ridge < float("inf")):
            raise ValueError(f"projection_ridge must be a finite number >= 0, got {projection_ridge!r}")
        student_dim = model.get_embedding_dimension()
        if student_dim is None:
            raise ValueError("The model does not report its embedding dimension.")
        self.model = model
        self.base_loss = base_loss
        self.teacher_dim = teacher_dim
        self.student_dim = int(student_dim)
        self.weight = float(weight)
        self.metric = metric
        self.columns = None if columns is None else [int(c) for c in columns]
        self.projection_init = projection_init
        self.projection_init_rows = projection_init_rows
        self.projection_ridge = float(projection_ridge)
        self.projection = nn.Linear(self.student_dim, teacher_dim, bias=bias)
        # The projection starts on the model's device and dtype (at least float32: its updates are small).
        param = next(model.parameters(), None)
        if param is not None:
            dtype = param.dtype if param.dtype == torch.float64 else torch.float32
            self.projection.to(device=param.device, dtype=dtype)
        self.uses_gradient_cache = uses_gradient_cache(base_loss)
        self._pending_grads: list[Tensor] | None = None
        # set by LossStateCallback when training begins; required in several processes (see forward)
        self.gradients_synced = False

    # kalm_st.loss_state: the projection's weights are checkpointed, and kept identical on every process
    loss_state_file: ClassVar[str] = "loss_projections.pt"
    loss_state_noun: ClassVar[str] = "projection(s)"
    loss_state_missing: ClassVar[str] = "the distillation projection restarts from its initialisation."

    def loss_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.projection.state_dict().items()}

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the projection in place (the optimizer keeps its references)."""
        own = self.projection.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in own.items()}:
            raise ValueError(
                f"projection shapes {shapes} do not fit this run's ({self.student_dim} -> {self.teacher_dim})."
            )
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(state[name])

    def replicated_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    # GradCache settings are the cached base loss's.
    @property
    def mini_batch_size(self) -> int:  # type: ignore[override]
        return self.base_loss.mini_batch_size

    @property
    def mini_batch_num_tokens(self) -> int | None:  # type: ignore[override]
        return getattr(self.base_loss, "mini_batch_num_tokens", None)

    @property
    def show_progress_bar(self) -> bool:  # type: ignore[override]
        return getattr(self.base_loss, "show_progress_bar", False)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if util.get_world_size() > 1 and not self.gradients_synced:
            raise ValueError(
                "EmbeddingDistillation in several processes: its projection is not part of the DDP-wrapped model, "
                "so its gradients must be averaged by kalm_st.loss_state.LossStateCallback; pass "
                "callbacks=[LossStateCallback(loss_state_holders(loss))] to the trainer (kalm-st train does)."
            )
        sentence_features = list(sentence_features)
        if self.uses_gradient_cache:
            base = self.base_loss
            if getattr(base, "false_negative_mask", False):  # CachedFocalInfoNCE reads them in calculate_loss
                base._text_keys = base.loss.text_keys(sentence_features)
            self._pending_grads = None
            try:
                loss = self.forward_cached(sentence_features, labels)
            finally:
                if hasattr(base, "_text_keys"):
                    base._text_keys = None
            pending, self._pending_grads = self._pending_grads, None
            if pending is not None and loss.requires_grad:
                loss.register_hook(lambda grad: self._apply_pending(pending, grad))
            return loss
        text_keys = None
        if getattr(self.base_loss, "false_negative_mask", False) or getattr(
            getattr(self.base_loss, "base_loss", None), "false_negative_mask", False
        ):
            owner = self.base_loss if hasattr(self.base_loss, "text_keys") else self.base_loss.base_loss
            text_keys = owner.text_keys(sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, text_keys=text_keys)

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None, *, text_keys: list[Tensor] | None = None
    ) -> Tensor:
        """``L_base + weight * L_emb`` from the column embeddings (a plain, not cached, base loss)."""
        distill = self.distillation_loss(embeddings, labels)  # validates the labels first
        base = self.base_loss
        if hasattr(base, "compute_loss_from_embeddings"):
            base_value = base.compute_loss_from_embeddings(embeddings, labels, text_keys=text_keys)
        else:
            raise ValueError(
                f"{type(self).__name__}: base_loss {type(base).__name__} cannot compute its loss from given "
                "embeddings; use FocalInfoNCE, ContrastiveDistillation or CachedFocalInfoNCE."
            )
        return base_value + self.weight * distill

    def distillation_loss(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        """``L_emb`` alone: mean over the distilled columns of the mean row distance in the teacher's space."""
        owner = type(self).__name__
        batch_size = embeddings[0].size(0)
        teacher = functional.check_teacher_embeddings(labels, batch_size, len(embeddings), owner)
        if teacher.size(-1) != self.teacher_dim:
            hint = ""
            if teacher.size(-1) < self.teacher_dim and self.teacher_dim == self.student_dim:
                hint = (
                    " (MatryoshkaLoss truncates label tensors whose last dimension equals the student's: a teacher "
                    "of the student's dimension cannot be used under MatryoshkaLoss)"
                )
            raise ValueError(
                f"{owner}: the teacher embeddings in 'label' have {teacher.size(-1)} dims, but teacher_dim is "
                f"{self.teacher_dim}{hint}."
            )
        teacher = teacher.to(embeddings[0].device)
        columns = range(len(embeddings)) if self.columns is None else self.columns
        values = []
        for column in columns:
            if not 0 <= column < len(embeddings):
                raise ValueError(f"{owner}: column {column} does not exist (the batch has {len(embeddings)} columns).")
            projected = functional.project_truncated(embeddings[column], self.projection.weight, self.projection.bias)
            values.append(functional.embedding_distill(projected, teacher[:, column], self.metric))
        return torch.stack(values).mean()

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """GradCache step (2): the base loss (its own chunked backward) plus ``weight * L_emb``."""
        total = self.base_loss.calculate_loss(reps, labels, with_backward=with_backward)
        distill = self.weight * self.distillation_loss([torch.cat(column) for column in reps], labels)
        if not with_backward:
            return total + distill
        params = [p for p in self.projection.parameters() if p.requires_grad]
        leaves = [r for column in reps for r in column if r.requires_grad]
        grads = torch.autograd.grad(distill, [*leaves, *params], allow_unused=True)
        for leaf, grad in zip(leaves, grads[: len(leaves)], strict=True):
            if grad is not None:
                leaf.grad = grad if leaf.grad is None else leaf.grad + grad
        # The projection's gradient waits for the outer backward (see forward), weighted like this dim's embeddings.
        scale = self._matryoshka_weight(reps[0][0].size(-1))
        param_grads = [
            torch.zeros_like(p) if g is None else g * scale for p, g in zip(params, grads[len(leaves) :], strict=True)
        ]
        if self._pending_grads is None:
            self._pending_grads = param_grads
        else:
            self._pending_grads = [a + b for a, b in zip(self._pending_grads, param_grads, strict=True)]
        return total + distill.detach()

    def _matryoshka_weight(self, dim: int) -> float:
        """The weight MatryoshkaLoss's ``CachedLossDecorator`` (if it wraps ``calculate_loss``) gives ``dim``: it
        scales the embedding gradients it receives, but cannot reach a parameter of the loss itself."""
        decorator = self.__dict__.get("calculate_loss")
        dims = getattr(decorator, "matryoshka_dims", None)
        weights = getattr(decorator, "matryoshka_weights", None)
        if decorator is None:
            return 1.0
        if dims is None or weights is None:  # pragma: no cover - guards a changed sentence-transformers
            raise RuntimeError(
                "EmbeddingDistillation: calculate_loss is wrapped by an object without matryoshka_dims/weights "
                f"({type(decorator).__name__}); this sentence-transformers version is not supported with GradCache."
            )
        return float(weights[list(dims).index(dim)])

    def _apply_pending(self, pending: list[Tensor], grad: Tensor) -> None:
        params = [p for p in self.projection.parameters() if p.requires_grad]
        with torch.no_grad():
            for param, value in zip(params, pending, strict=True):
                value = value * grad.to(value.dtype)
                param.grad = value if param.grad is None else param.grad + value

    def get_config_dict(self) -> dict[str, Any]:
        config = getattr(self.base_loss, "get_config_dict", dict)()
        return {
            "base_loss": type(self.base_loss).__name__,
            **config,
            "teacher_dim": self.teacher_dim,
            "weight": self.weight,
            "metric": self.metric,
            "columns": self.columns,
            "projection_init": self.projection_init,
        }

    @property
    def citation(self) -> str:
        return getattr(self.base_loss, "citation", "")


def distillation_losses(
    losses: nn.Module | Mapping[str, nn.Module] | Iterable[nn.Module],
) -> list[EmbeddingDistillation]:
    """Every distinct ``EmbeddingDistillation`` reachable from ``losses`` (wrappers such as MatryoshkaLoss included),
    in :func:`kalm_st.loss_state.loss_state_holders`' order."""
    from kalm_st.loss_state import loss_state_holders

    return [holder for holder in loss_state_holders(losses) if isinstance(holder, EmbeddingDistillation)]


__all__ = ["EmbeddingDistillation", "distillation_losses"]
