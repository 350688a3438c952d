"""Collectives used inside the losses and MPCL: lightly's gathers, and the no-gradient all-reduces lightly lacks.

Every function here returns the single-process answer when no process group is initialised, so losses can
call them unconditionally. ``rank`` and ``world_size`` are lightly's (``lightly.utils.dist``).

:func:`gather` is lightly's ``GatherLayer`` (``lightly.utils.dist.gather``) and :func:`gather_no_grad` lightly's
``concat_all_gather``. Ours adds what the callers need and lightly's do not do (``tests/utils/test_distributed.py``): they
require an initialised process group and return one tensor per rank; ours return the input on one process and
one tensor in rank order, and hand the collective a contiguous tensor (NCCL refuses strided ones, and MPCL's
keys ``k[m]`` of ``[Mp, B, D]`` are strided).

Gradient semantics of :func:`gather`: ``GatherLayer``'s backward *sums* the gradients that all ranks send back
to a rank's slice (an all-reduce of the full gradient, then this rank's rows). If every rank returns a loss
``L_r`` computed on the gathered tensor, the gradient that reaches rank ``r``'s local slice is
``sum_r' dL_r' / dx_r``; after DDP averages parameter gradients over the ``W`` ranks, the effective
objective is ``mean_r L_r``. Losses built on :func:`gather` therefore scale their per-rank value so
that the mean over ranks equals the loss of the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightly.models.utils import concat_all_gather
from lightly.utils import dist as lightly_dist
from lightly.utils.dist import rank, world_size
from torch import Tensor

__all__ = ["all_reduce_max", "all_reduce_sum", "gather", "gather_no_grad", "rank", "world_size"]


def gather(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 in rank order, keeping the autograd graph (lightly's ``GatherLayer``).

    Args:
        x: ``[N, ...]`` local tensor; every rank must pass the same shape.

    Returns:
        ``[W * N, ...]`` with rank ``r``'s rows at ``r * N : (r + 1) * N``. The backward pass sums
        the gradients of all ranks w.r.t. this rank's slice (see the module docstring). Returns
        ``x`` itself on one process.
    """
    if world_size() == 1:
        return x
    return torch.cat(lightly_dist.gather(x.contiguous()), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 in rank order without autograd (keys, queues, labels): lightly's
    ``concat_all_gather``. Returns a detached ``[W * N, ...]`` tensor; ``x.detach()`` on one process."""
    if world_size() == 1:
        return x.detach()
    return concat_all_gather(x.detach().contiguous())


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
