"""Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, Eq. 1) over the global batch.

``L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2`` with ``C = A^T B / N``, where ``A`` and ``B``
are the two views' embeddings standardised per dimension over the batch (BatchNorm without affine
parameters, biased variance, eps 1e-5, as the official code's ``nn.BatchNorm1d(affine=False)``).

Distributed: the official code normalises with a SyncBN'd BatchNorm (global statistics) and sums the ranks'
``C`` with a raw ``all_reduce``, through which no gradient flows back to the other ranks, so its gradient is
``1/world_size`` of the global loss's. lightly's ``BarlowTwinsLoss`` all-reduces ``C`` with autograd but
standardises each rank's embeddings with *local* statistics, which is a different loss from the one on the
concatenated batch. Here both views are gathered with a gradient-preserving all-gather and everything is
computed on the global batch: every rank returns the loss of the concatenated batch, and after DDP averages
the gradients each parameter receives exactly the single-process gradient of that loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math
from ssl_zoo.utils.distributed import gather, gather_no_grad, rank, world_size

__all__ = ["BarlowTwinsLoss", "barlow_twins_loss", "in_batch_retrieval_accuracy"]


def _standardize(z: Tensor, eps: float) -> Tensor:
    """Per-dimension zero mean, unit (biased) variance over the batch: BatchNorm1d(affine=False) in training."""
    mean = z.mean(dim=0, keepdim=True)  # [1, D]
    var = z.var(dim=0, unbiased=False, keepdim=True)  # [1, D]
    return (z - mean) / torch.sqrt(var + eps)


@float32_math
def barlow_twins_loss(
    z_a: Tensor, z_b: Tensor, lambda_offdiag: float = 0.0051, eps: float = 1e-5, gather_distributed: bool = True
) -> Tensor:
    """Barlow Twins loss (Eq. 1) of two views' embeddings, on the global batch.

    Args:
        z_a: ``[B, D]`` embeddings of the first views (this rank's batch).
        z_b: ``[B, D]`` embeddings of the second views, same images in the same order.
        lambda_offdiag: weight of the redundancy-reduction term (0.0051 in the paper, 5e-3 in lightly).
        eps: variance epsilon of the standardisation (BatchNorm's 1e-5).
        gather_distributed: standardise and correlate over the batch of all ranks (no-op on one process).

    Returns:
        Scalar float32 loss of the global batch (the same value on every rank); see the module docstring
        for the gradient.
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must both have shape [B, D], got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if lambda_offdiag < 0:
        raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
    z_a, z_b = z_a.float(), z_b.float()
    if gather_distributed and world_size() > 1:
        z_a, z_b = gather(z_a), gather(z_b)  # [W*B, D] each, gradients flow back to every rank's slice
    n = z_a.shape[0]
    if n < 2:
        raise ValueError("Barlow Twins standardises over the batch: it needs at least 2 samples in the (global) batch")
    c = _standardize(z_a, eps).T @ _standardize(z_b, eps) / n  # [D, D] cross-correlation
    diagonal = torch.diagonal(c)  # [D]
    invariance = (diagonal - 1.0).pow(2).sum()
    redundancy = c.pow(2).sum() - diagonal.pow(2).sum()  # the off-diagonal squares
    return invariance + lambda_offdiag * redundancy


@float32_math
@torch.no_grad()
def in_batch_retrieval_accuracy(z_a: Tensor, z_b: Tensor, gather_distributed: bool = True) -> Tensor:
    """Fraction of this rank's ``z_a`` rows whose most cosine-similar ``z_b`` row in the global batch is their own.

    The contrastive top-1 accuracy of a method without logits (Barlow Twins): query ``z_a[i]`` retrieves
    among the second views of every image of the global batch, the positive is the same image's view.

    Args:
        z_a: ``[B, D]`` queries (first views).
        z_b: ``[B, D]`` candidates (second views), gathered from all ranks when ``gather_distributed``.

    Returns:
        Detached 0-dim float32 accuracy of this rank's queries.
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must both have shape [B, D], got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    q = F.normalize(z_a.float(), dim=1)  # [B, D]
    k = F.normalize(z_b.float(), dim=1)  # [B, D]
    offset = 0
    if gather_distributed and world_size() > 1:
        k = gather_no_grad(k)  # [W*B, D]
        offset = rank() * q.shape[0]
    target = torch.arange(q.shape[0], device=q.device) + offset
    return ((q @ k.T).argmax(dim=1) == target).float().mean()


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss on the global batch; see :func:`barlow_twins_loss`.

    Args:
        lambda_offdiag: weight of the redundancy-reduction term (0.0051).
        gather_distributed: compute over the batch of all ranks (no-op on one process).
    """

    def __init__(self, lambda_offdiag: float = 0.0051, gather_distributed: bool = True) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.lambda_offdiag = lambda_offdiag
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """``z_a, z_b: [B, D]`` -> scalar loss."""
        return barlow_twins_loss(z_a, z_b, self.lambda_offdiag, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"lambda_offdiag={self.lambda_offdiag}, gather_distributed={self.gather_distributed}"
