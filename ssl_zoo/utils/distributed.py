"""Process-group queries and collectives used inside the losses.

Every function here is a no-op (or returns the single-process answer) when ``torch.distributed``
is unavailable or not initialised, so losses can call them unconditionally.

Gradient semantics of :func:`gather`: like ``torch.distributed.nn.functional.all_gather`` (which
now warns that it is deprecated in favour of a private module, hence the small autograd function
below built on the public collectives), its backward *sums* the gradients that all ranks send back
to a rank's slice. If every rank returns a loss ``L_r`` computed on the gathered tensor, the
gradient that reaches rank ``r``'s local slice is
``sum_r' dL_r' / dx_r``; after DDP averages parameter gradients over the ``W`` ranks, the effective
objective is ``mean_r L_r``. Losses built on :func:`gather` therefore scale their per-rank value so
that the mean over ranks equals the loss of the concatenated global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "gather",
    "gather_no_grad",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward returns, to each rank, the sum over ranks of the gradient of
    its own slice (all-reduce of the full gradient, then this rank's rows)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)  # [W*N, ...]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # [W*N, ...]; all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 in rank order, keeping the autograd graph.

    Args:
        x: ``[N, ...]`` local tensor; every rank must pass the same shape.

    Returns:
        ``[W * N, ...]`` with rank ``r``'s rows at ``r * N : (r + 1) * N``. The backward pass sums
        the gradients of all ranks w.r.t. this rank's slice (see the module docstring). Returns
        ``x`` itself on one process.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 in rank order without autograd (keys, queues, labels).

    Returns a detached ``[W * N, ...]`` tensor; ``x.detach()`` on one process.
    """
    if world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Element-wise sum of ``x`` over all ranks, without autograd.

    The input is not modified; a reduced detached copy is returned (``x.detach()`` on one process).
    Only for quantities that need no gradient (counts, normalisers of targets).
    """
    if world_size() == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over all ranks, without autograd (``x.detach()`` on one process)."""
    if world_size() == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
