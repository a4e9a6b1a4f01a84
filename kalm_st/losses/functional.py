"""The maths of kalm-st's losses, as pure functions of tensors (no model, no module state).

Every loss class (plain and cached) calls these, so each formula of METHOD.md §3 is written exactly once:

- :func:`similarity_logits` / :func:`rowwise_logits`: scaled similarities against all or per-row candidates;
- :func:`focal_info_nce`: ``mean_i -(1 - p_i)^gamma * log p_i`` with ``log(1 - p_i)`` taken from the log-sum-exp
  of the non-positive logits, so the value and gradient stay finite when ``p_i -> 1`` (fp32 and bf16);
- :func:`sample_mixing_weights` / :func:`mix_hard_negatives`: online hard-negative mixing (MoCHi-style);
- :func:`false_negative_mask` / :func:`text_fingerprints`: the optional false-negative mask (beyond the paper, after
  Qwen3-Embedding);
- :func:`kl_distill` and :func:`check_teacher_scores`: contrastive distillation from precomputed teacher scores;
- :func:`project_truncated` / :func:`embedding_distill` / :func:`check_teacher_embeddings`: embedding-level
  distillation to precomputed teacher embeddings through a trainable projection.

Precision: every similarity, blend and softmax here runs in at least float32, whatever the embeddings' dtype and
even inside an autocast region (:func:`_full_precision`): at ``tau = 0.01`` a bf16 logit near 50 is only known to
+-0.125 (the loss then moves by ~1e-2), which is the size of the effects training is after.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from sentence_transformers import util
from torch import Tensor

SimilarityFct = Callable[[Tensor, Tensor], Tensor]
Reduction = Literal["mean", "sum", "none"]


def _full_precision(x: Tensor) -> AbstractContextManager[None]:
    """Autocast off on ``x``'s device: inside a bf16/fp16 autocast region, ``mm``/``einsum`` of float32 inputs would
    run in half precision again."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def similarity_logits(
    queries: Tensor, docs: Tensor, scale: float, similarity_fct: SimilarityFct = util.cos_sim
) -> Tensor:
    """``similarity_fct(queries, docs) * scale``: logits of every query against every document, shape ``(N, D)``.

    The inputs are upcast to (at least) float32 before the product, and autocast is off, so the logits are float32
    for bf16/fp16 embeddings (float64 ones stay float64).
    """
    with _full_precision(queries):
        return _at_least_float32(similarity_fct(_at_least_float32(queries), _at_least_float32(docs))) * scale


def rowwise_logits(
    queries: Tensor, candidates: Tensor, scale: float, similarity_fct: SimilarityFct = util.cos_sim
) -> Tensor:
    """Logits of query ``i`` against its own candidates only: ``(N, d)`` x ``(N, C, d)`` -> ``(N, C)``.

    ``cos_sim`` and ``dot_score`` are computed row-wise in ``O(N C d)``; any other similarity function falls back
    to one ``similarity_fct(q_i, candidates_i)`` call per row. Computed in at least float32 (inputs upcast before the
    product, autocast off), as :func:`similarity_logits`.
    """
    queries, candidates = _at_least_float32(queries), _at_least_float32(candidates)
    if candidates.size(1) == 0:
        return queries.new_zeros(queries.size(0), 0)
    with _full_precision(queries):
        if similarity_fct is util.cos_sim:
            normalized_queries = F.normalize(queries, p=2, dim=-1)
            scores = torch.einsum("nd,ncd->nc", normalized_queries, F.normalize(candidates, p=2, dim=-1))
        elif similarity_fct is util.dot_score:
            scores = torch.einsum("nd,ncd->nc", queries, candidates)
        else:
            scores = torch.stack([similarity_fct(q[None], c)[0] for q, c in zip(queries, candidates, strict=True)])
        return _at_least_float32(scores) * scale


def _at_least_float32(x: Tensor) -> Tensor:
    """Upcast half-precision tensors (the softmax statistics run in float32); keep float32/float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def focal_info_nce(logits: Tensor, target: Tensor, gamma: float, reduction: Reduction = "mean") -> Tensor:
    """Focal-reweighted InfoNCE over rows of logits (METHOD.md §3).

    ``p_i = softmax(logits_i)[target_i]`` and the loss is ``-(1 - p_i)^gamma * log p_i``. With
    ``x_i = logsumexp(non-positive logits) - positive logit = log((1 - p_i) / p_i)``, ``-log p_i = softplus(x_i)`` and
    ``log(1 - p_i) = -softplus(-x_i)``: no ``1 - p`` subtraction, so neither the value nor the gradient (bounded by
    sigmoids and softmax weights) blows up or loses precision when the positive dominates. The
    computation runs in at least float32 (fp16/bf16 logits are upcast). ``gamma = 0`` is the cross-entropy (InfoNCE), in MultipleNegativesRankingLoss's operations.

    Args:
        logits: ``(N, C)`` scaled similarities.
        target: ``(N,)`` column index of each row's positive.
        gamma: Focal exponent, ``>= 0``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per row).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    with _full_precision(logits):
        return _focal_info_nce(_at_least_float32(logits), target, gamma, reduction)


def _focal_info_nce(logits: Tensor, target: Tensor, gamma: float, reduction: Reduction) -> Tensor:
    target = target.long()[:, None]
    positive = logits.gather(1, target).squeeze(1)
    if gamma == 0:
        # Plain InfoNCE, with MultipleNegativesRankingLoss's exact operations (the two agree to the last bit).
        return _reduce(torch.logsumexp(logits, dim=-1) - positive, reduction)
    # The positive is masked with the most negative finite value (not -inf) so that a row without any negative keeps
    # a finite log-sum-exp gradient; it then has p = 1 and contributes 0.
    negatives_only = logits.scatter(1, target, torch.finfo(logits.dtype).min)
    x = torch.logsumexp(negatives_only, dim=-1) - positive  # log((1 - p) / p)
    nll = F.softplus(x)  # -log p = log(1 + e^x), accurate even when p -> 1
    weight = torch.exp(-gamma * F.softplus(-x))  # (1 - p)^gamma, as log(1 - p) = -softplus(-x)
    return _reduce(weight * nll, reduction)


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _beta_or_dirichlet(concentration: Tensor, generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    """Dirichlet(concentration) samples of shape ``shape + concentration.shape`` drawn from ``generator`` only.

    ``torch.distributions`` has no generator argument, so a seed is drawn from ``generator`` and the samplers run on a
    forked CPU RNG: the global RNG state (which GradCache replays for dropout) is left untouched.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return torch.distributions.Dirichlet(concentration).sample(shape)


def sample_mixing_weights(
    num_rows: int,
    num_hard_negatives: int,
    num_mixed: int,
    *,
    alpha: float,
    mode: Literal["pairwise", "listwise"],
    pair_selection: Literal["random", "hardest"],
    generator: torch.Generator,
    scores: Tensor | None = None,
    rows: slice | None = None,
) -> Tensor:
    """Convex weights over each row's hard negatives, ``(num_rows, num_mixed, num_hard_negatives)``, on the CPU.

    - ``pairwise``: each synthetic negative blends two distinct hard negatives ``a != b`` with ``lambda ~ Beta(alpha,
      alpha)``: weight ``lambda`` on ``a``, ``1 - lambda`` on ``b``. ``pair_selection="random"`` draws the pair
      uniformly per synthetic negative; ``"hardest"`` uses the two highest-scoring hard negatives of the row (needs
      ``scores``, ``(num_rows, M)``; only the lambdas differ between that row's synthetic negatives).
    - ``listwise``: Dirichlet(alpha, ..., alpha) weights over all ``M`` hard negatives.

    All randomness comes from ``generator``. ``rows`` selects a slice of a larger draw: pass the world batch size as
    ``num_rows`` and this rank's rows as ``rows`` so every rank advances the generator identically and a multi-process
    run draws exactly what one process on the concatenated batch draws.
    """
    if num_hard_negatives < 2:
        raise ValueError(f"Hard-negative mixing needs at least 2 hard-negative columns, got {num_hard_negatives}.")
    if mode == "listwise":
        weights = _beta_or_dirichlet(torch.full((num_hard_negatives,), float(alpha)), generator, (num_rows, num_mixed))
        return weights if rows is None else weights[rows]
    lam = _beta_or_dirichlet(torch.full((2,), float(alpha)), generator, (num_rows, num_mixed))[..., 0]
    if pair_selection == "random":
        pair = torch.rand(num_rows, num_mixed, num_hard_negatives, generator=generator).argsort(dim=-1)[..., :2]
        if rows is not None:
            lam, pair = lam[rows], pair[rows]
    elif pair_selection == "hardest":
        if rows is not None:
            lam = lam[rows]
        if scores is None:
            raise ValueError("pair_selection='hardest' needs the query/hard-negative scores.")
        top2 = scores.detach().float().cpu().topk(2, dim=-1).indices  # (rows, 2)
        pair = top2[:, None, :].expand(lam.size(0), num_mixed, 2)
    else:
        raise ValueError(f"pair_selection must be 'random' or 'hardest', got {pair_selection!r}")
    weights = torch.zeros(lam.size(0), num_mixed, num_hard_negatives)
    weights.scatter_(-1, pair[..., :1], lam[..., None])
    weights.scatter_(-1, pair[..., 1:], (1 - lam)[..., None])
    return weights


def mix_hard_negatives(negatives: Tensor, weights: Tensor) -> Tensor:
    """Synthetic negatives ``normalize(sum_m w_{i,k,m} n_{i,m})``: ``(N, M, d)`` x ``(N, K, M)`` -> ``(N, K, d)``.

    The blend and the normalisation run in at least float32 (bf16 negatives are upcast, autocast is off): in bf16
    the weights and every entry of the blend would be rounded to 8 bits of mantissa.
    """
    negatives = _at_least_float32(negatives)
    with _full_precision(negatives):
        mixed = torch.einsum("nkm,nmd->nkd", weights.to(device=negatives.device, dtype=negatives.dtype), negatives)
        return F.normalize(mixed, p=2, dim=-1)


def false_negative_mask(
    logits: Tensor,
    target: Tensor,
    *,
    margin: float,
    scale: float,
    positive_keys: Tensor | None = None,
    candidate_keys: Tensor | None = None,
) -> Tensor:
    """Which candidates count as false negatives of their row: ``(N, C)`` bool, never True at the positive.

    Beyond the paper, after Qwen3-Embedding (DATA_AND_SERVING.md §4). Candidate ``c`` of row ``i`` is masked when

    (a) it is the same text as row ``i``'s positive: ``candidate_keys[.., c] == positive_keys[i]`` (fingerprints from
        :func:`text_fingerprints`; ``-1`` marks a candidate without a text, e.g. a synthetic negative), or
    (b) it scores above the positive by more than ``margin``: ``s(q_i, c) > s(q_i, p_i) + margin``, i.e.
        ``logits[i, c] > logits[i, target_i] + margin * scale`` (``margin`` is on the similarity's scale, e.g.
        cosine, as Qwen3-Embedding's 0.1; ``scale = 1 / temperature``).

    The caller sets the masked logits to ``-inf``, which removes them from the softmax's denominator: the focal
    InfoNCE is then computed over the remaining candidates.

    Args:
        logits: ``(N, C)`` scaled similarities (only compared, no gradient flows through the mask).
        target: ``(N,)`` column of each row's positive.
        margin: Similarity margin of rule (b), ``>= 0``.
        scale: The factor the similarities were multiplied by.
        positive_keys: ``(N,)`` fingerprints of the rows' positives; ``None`` skips rule (a).
        candidate_keys: ``(C,)`` fingerprints shared by every row (in-batch candidates) or ``(N, C)`` per row.
    """
    if not margin >= 0:
        raise ValueError(f"false-negative margin must be >= 0, got {margin!r}")
    logits = logits.detach()
    target = target.long()[:, None]
    with torch.no_grad():
        mask = logits > logits.gather(1, target) + margin * scale
        if positive_keys is not None:
            if candidate_keys is None:
                raise ValueError("false_negative_mask got positive_keys without candidate_keys.")
            mask |= candidate_keys.expand_as(mask) == positive_keys[:, None]
        return mask.scatter(1, target, False)


# Polynomial hashes modulo two primes below 2^31, so the product of two residues fits in int64 (no overflow).
_HASH_MODULI = (2_147_483_647, 2_147_483_629)
_HASH_BASES = (911_382_323, 972_663_749)


@functools.lru_cache(maxsize=64)
def _hash_powers(base: int, modulus: int, length: int) -> Tensor:
    """``base**k mod modulus`` for ``k < length`` (int64, CPU), by doubling: ``log2(length)`` vector steps."""
    powers = torch.ones(1, dtype=torch.long)
    while powers.numel() < length:
        powers = torch.cat([powers, powers * pow(base, powers.numel(), modulus) % modulus])
    return powers[:length]


def text_fingerprints(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """A 62-bit fingerprint per row of token ids, padding excluded: ``(B, L)`` -> ``(B,)`` int64, all ``>= 0``.

    Two rows get equal fingerprints when their unpadded token sequences are equal (the same text under the same
    tokenizer and prompt), whatever the padding side or the batch's padded length. It is the pair of polynomial
    hashes ``sum_k (id_k + 1) * b**k mod P`` over the row's real tokens (``k`` counts real tokens only) for two primes
    ``P < 2**31``: two different sequences of ``L`` tokens collide with probability about ``(L / 2**31) ** 2``
    (~1e-13 at 512 tokens), so a wrongly masked candidate is not a practical concern. Vectorised, on the ids' device.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"text_fingerprints expects (batch, length) token ids, got shape {tuple(input_ids.shape)}")
    ids = input_ids.long()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rank = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # index among the row's real tokens (left or right padding)
    fingerprint = torch.zeros(ids.size(0), dtype=torch.long, device=ids.device)
    for base, modulus in zip(_HASH_BASES, _HASH_MODULI, strict=True):
        powers = _hash_powers(base, modulus, max(ids.size(1), 1)).to(ids.device)
        terms = (ids % modulus + 1) * powers[rank] % modulus  # each < 2^31; a row's sum < L * 2^31
        fingerprint = fingerprint * 2**31 + torch.where(real, terms, 0).sum(dim=1) % modulus
    return fingerprint


def kl_distill(
    student_scores: Tensor,
    teacher_scores: Tensor,
    student_temperature: float,
    teacher_temperature: float,
    reduction: Reduction = "mean",
) -> Tensor:
    """``KL(softmax(teacher / tau_T) || softmax(student / tau_S))`` per row (METHOD.md §3).

    Both inputs are raw scores ``(N, C)`` over the same candidates; the teacher side is detached; computed in at least float32. No ``tau_S^2``
    factor (sentence-transformers' ``DistillKLDivLoss`` multiplies by it; scale ``alpha`` instead).
    """
    with _full_precision(student_scores):
        log_u = torch.log_softmax(_at_least_float32(student_scores) / student_temperature, dim=-1)
        log_t = torch.log_softmax(_at_least_float32(teacher_scores.detach()) / teacher_temperature, dim=-1)
        t = log_t.exp()
        kl = torch.where(t > 0, t * (log_t - log_u), torch.zeros_like(t)).sum(dim=-1)
        return _reduce(kl, reduction)


def _candidate_name(index: int) -> str:
    return "positive" if index == 0 else f"negative_{index}"


def check_teacher_scores(
    labels: Tensor | Sequence[Sequence[float]] | None, batch_size: int, num_candidates: int, owner: str
) -> Tensor:
    """Validate teacher scores ``(batch_size, num_candidates)`` (positive first) and return them as a float tensor.

    Raises a ``ValueError`` naming the row (and candidate column) for missing, ragged, wrong-length, NaN or
    infinite scores.
    """
    expected = f"{num_candidates} scores per row (positive + {num_candidates - 1} negatives)"
    if labels is None:
        raise ValueError(f"{owner} needs teacher scores in the 'label' column: {expected}.")
    if not isinstance(labels, Tensor):
        rows = list(labels)
        for index, row in enumerate(rows):
            length = len(row) if hasattr(row, "__len__") else 1
            if length != num_candidates:
                raise ValueError(f"{owner}: teacher scores of row {index} have {length} values; expected {expected}.")
        labels = torch.tensor([[float(v) for v in row] for row in rows]) if rows else torch.zeros(0, num_candidates)
    if labels.ndim != 2 or labels.size(1) != num_candidates:
        got = labels.size(1) if labels.ndim == 2 else f"shape {tuple(labels.shape)}"
        raise ValueError(f"{owner}: teacher scores of row 0 have {got} values; expected {expected}.")
    if labels.size(0) != batch_size:
        raise ValueError(
            f"{owner}: got teacher scores for {labels.size(0)} rows, but the batch has {batch_size} rows."
        )
    bad = ~torch.isfinite(labels)
    if bad.any():
        row, column = (int(i) for i in bad.nonzero()[0])
        value = labels[row, column].item()
        raise ValueError(
            f"{owner}: teacher score of row {row}, candidate {column} ({_candidate_name(column)}) is {value}; "
            "teacher scores must be finite."
        )
    return _at_least_float32(labels) if labels.is_floating_point() else labels.float()


def project_truncated(embeddings: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``embeddings @ weight[:, :d].T + bias`` for ``d = embeddings.size(-1) <= weight.size(1)``, in >= float32.

    One ``(d_teacher, d_student)`` projection serves every Matryoshka dimension: a ``d``-dim truncation uses the first
    ``d`` input columns, i.e. the truncated embedding zero-padded back to ``d_student``.
    """
    dim = embeddings.size(-1)
    if dim > weight.size(1):
        raise ValueError(f"embeddings have {dim} dims, but the projection takes at most {weight.size(1)}")
    embeddings = _at_least_float32(embeddings)
    with _full_precision(embeddings):
        w = weight[:, :dim].to(embeddings.dtype)
        return F.linear(embeddings, w, None if bias is None else bias.to(embeddings.dtype))


def embedding_distill(
    student: Tensor, teacher: Tensor, metric: Literal["cosine", "mse"], reduction: Reduction = "mean"
) -> Tensor:
    """Distance of projected student embeddings ``(N, d_T)`` to teacher embeddings ``(N, d_T)``, per row.

    ``cosine``: ``1 - cos(s_i, t_i)`` (jina-embeddings-v5's embedding distillation); ``mse``: ``mean_k (s_ik - t_ik)^2``
    (F2LLM-v2's embedding term; ``reduction="mean"`` equals ``F.mse_loss``). The teacher side is detached; computed
    in at least float32.
    """
    student, teacher = _at_least_float32(student), _at_least_float32(teacher.detach()).to(student.dtype)
    with _full_precision(student):
        if metric == "cosine":
            values = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
        elif metric == "mse":
            values = (student - teacher).pow(2).mean(dim=-1)
        else:
            raise ValueError(f"metric must be 'cosine' or 'mse', got {metric!r}")
        return _reduce(values, reduction)


def check_teacher_embeddings(labels: object, batch_size: int, num_columns: int, owner: str) -> Tensor:
    """Validate teacher embeddings ``(batch_size, num_columns, d_teacher)`` (one per input column, in column order:
    anchor, positive, negative_1, ...) and return them as a float tensor; ``ValueError`` naming the row and column."""
    if not isinstance(labels, Tensor) or labels.ndim != 3 or tuple(labels.shape[:2]) != (batch_size, num_columns):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"{owner} needs the teacher's embeddings in the 'label' column, shape ({batch_size}, {num_columns}, "
            f"d_teacher) for (anchor, positive, negatives) (kalm-st teacher-embed writes it); got {got}."
        )
    bad = ~torch.isfinite(labels)
    if bad.any():
        row, column = (int(i) for i in bad.nonzero()[0, :2])
        raise ValueError(f"{owner}: teacher embedding of row {row}, column {column} is not finite.")
    return _at_least_float32(labels) if labels.is_floating_point() else labels.float()


def check_temperature(name: str, value: float) -> None:
    """``ValueError`` naming the argument unless ``0 < value < inf``."""
    if not (isinstance(value, int | float) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


__all__ = [
    "check_teacher_embeddings",
    "check_teacher_scores",
    "check_temperature",
    "embedding_distill",
    "false_negative_mask",
    "focal_info_nce",
    "kl_distill",
    "mix_hard_negatives",
    "project_truncated",
    "rowwise_logits",
    "sample_mixing_weights",
    "similarity_logits",
    "text_fingerprints",
]
