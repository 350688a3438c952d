"""Online clustering targets and the swapped prediction loss (SwAV; HVP-MTL §3.2, Eq. 2-3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math
from ssl_zoo.utils.distributed import all_reduce_max, all_reduce_sum, world_size

__all__ = ["SwappedPredictionLoss", "sinkhorn_clamped_fraction", "sinkhorn_knopp", "swapped_prediction_loss"]


def _global_logsumexp_rows(log_q: Tensor) -> Tensor:
    """``log(sum_b exp(log_q[k, b]))`` over the samples of every rank: ``[K, b] -> [K, 1]``.

    The shift by the global row maximum keeps ``exp`` in range; the sums are all-reduced exactly as
    SwAV all-reduces ``sum_of_rows``.
    """
    row_max = all_reduce_max(log_q.amax(dim=1, keepdim=True))  # [K, 1]
    row_sum = all_reduce_sum((log_q - row_max).exp().sum(dim=1, keepdim=True))  # [K, 1]
    return row_max + row_sum.log()


@float32_math
@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, epsilon: float = 0.05, iterations: int = 3, clamp_max: float | None = 10.0
) -> Tensor:
    """Equipartitioned soft assignments of samples to prototypes (SwAV Eq. 3, HVP-MTL §3.2).

    ``Q = exp(clamp(scores / epsilon, max=clamp_max))`` viewed as ``[K, B]`` is divided by its total;
    then, ``iterations`` times, each prototype row is scaled to sum ``1/K`` and each sample column to
    sum ``1/B``. The result is ``Q * B`` transposed back, so every sample's codes sum to 1 and each
    prototype receives about ``B/K`` of the mass.

    The iterations run on ``log Q``, which is mathematically identical to the multiplicative updates
    but cannot underflow to an all-zero column (0/0 = NaN) when a sample's scores are far below the
    others'. The initial division by the total is a constant factor that the first row
    normalisation removes, so it is folded into it. Ours, not lightly's ``sinkhorn``: lightly iterates on
    ``Q`` itself, and one underflowed sample turns every sample's codes into NaN (test in ``tests/losses/test_sinkhorn.py``).

    Sees the global batch under DDP: the row sums run over all ranks (all-reduce) and ``B`` is the
    global batch size; every rank returns the codes of its own samples.

    Args:
        scores: ``[B, K]`` sample-prototype similarities (any float dtype; computed in float32).
        epsilon: entropic regularisation, ``> 0``.
        iterations: number of row/column normalisation rounds, ``>= 1``.
        clamp_max: upper bound on ``scores / epsilon`` before ``exp``; ``None`` disables it.

    Returns:
        ``[B, K]`` float32 codes without gradient; each row sums to 1.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [B, K], got {tuple(scores.shape)}")
    logits = scores.float() / epsilon  # [B, K]
    if clamp_max is not None:
        logits = logits.clamp(max=clamp_max)
    log_q = logits.T  # [K, B_local], log Q
    num_prototypes = log_q.shape[0]
    global_batch = log_q.shape[1] * world_size()
    log_k, log_b = math.log(num_prototypes), math.log(global_batch)
    for _ in range(iterations):
        # Each prototype row sums to 1/K over the global batch.
        log_q = log_q - _global_logsumexp_rows(log_q) - log_k
        # Each sample column sums to 1/B; a column lives on one rank, so no collective is needed.
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    return (log_q + log_b).exp().T  # [B, K], Q * B: each sample's codes sum to 1


@float32_math
def swapped_prediction_loss(
    scores_a: Tensor, scores_b: Tensor, codes_a: Tensor, codes_b: Tensor, temperature: float = 0.1
) -> Tensor:
    """Swapped prediction (HVP-MTL Eq. 2-3): predict each view's codes from the other view.

    ``l(s, q) = -sum_k q_k * log_softmax(s / tau)_k``; the loss is ``mean_b l(scores_a, codes_b) +
    mean_b l(scores_b, codes_a)``, the **sum** of the two swapped terms as Eq. 2 writes it
    (``L_cl = l(f_t, q_s) + l(f_s, q_t)``). SwAV's code averages the two terms instead (half this value).

    Args:
        scores_a, scores_b: ``[B, K]`` prototype scores of two views (computed in float32).
        codes_a, codes_b: ``[B, K]`` targets from :func:`sinkhorn_knopp`; treated as constants.
        temperature: ``tau > 0``.

    Returns:
        Scalar float32 loss over this rank's batch (the codes already reflect the global batch).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shapes = {tuple(t.shape) for t in (scores_a, scores_b, codes_a, codes_b)}
    if len(shapes) != 1 or scores_a.ndim != 2:
        raise ValueError(f"scores and codes must all have the same shape [B, K], got {sorted(shapes)}")
    log_p_a = F.log_softmax(scores_a.float() / temperature, dim=1)  # [B, K]
    log_p_b = F.log_softmax(scores_b.float() / temperature, dim=1)  # [B, K]
    codes_a, codes_b = codes_a.detach().float(), codes_b.detach().float()
    cross_entropy = (codes_b * log_p_a).sum(dim=1) + (codes_a * log_p_b).sum(dim=1)  # [B]
    return -cross_entropy.mean()  # Eq. 2: the sum of both swapped terms, each averaged over the batch


class SwappedPredictionLoss(nn.Module):
    """Swapped prediction loss (HVP-MTL Eq. 2-3, the sum of both terms); see :func:`swapped_prediction_loss`.

    Args:
        temperature: ``tau > 0`` of the prototype softmax.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, scores_a: Tensor, scores_b: Tensor, codes_a: Tensor, codes_b: Tensor) -> Tensor:
        """All inputs ``[B, K]`` -> scalar loss."""
        return swapped_prediction_loss(scores_a, scores_b, codes_a, codes_b, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@float32_math
@torch.no_grad()
def sinkhorn_clamped_fraction(scores: Tensor, epsilon: float = 0.05, clamp_max: float | None = 10.0) -> Tensor:
    """Fraction of the entries of ``scores / epsilon`` above ``clamp_max``: those :func:`sinkhorn_knopp` clamps.

    A clamped entry loses its ordering against the other clamped entries of its row (they all become
    ``exp(clamp_max)``), so a large fraction means the codes ignore part of the similarity structure;
    logged during training to show whether ``T_max`` binds (with unit-norm cosines and ``epsilon = 0.05``,
    every cosine above ``0.05 * 10 = 0.5`` is clamped).

    Args:
        scores: ``[B, K]`` sample-prototype similarities (any float dtype; compared in float32).
        epsilon: the Sinkhorn ``epsilon``, ``> 0``.
        clamp_max: the clamp on ``scores / epsilon``; ``None`` (no clamp) gives 0.

    Returns:
        Scalar float32 fraction in ``[0, 1]`` over this rank's entries (equal-size ranks: the mean over ranks
        is the global fraction).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if clamp_max is None or scores.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=scores.device)
    return (scores.float() / epsilon > clamp_max).float().mean()
