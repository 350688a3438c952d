"""MoCo v2 / v3 InfoNCE losses (MPCL Eq. 1) and the MoCo key queue, with top-1 accuracy.

Both losses treat the keys as constants: they come from the momentum encoder, which receives no
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math
from ssl_zoo.utils.distributed import gather_no_grad, rank, world_size

__all__ = ["KeyQueue", "moco_v2_info_nce", "moco_v3_info_nce"]


class KeyQueue(nn.Module):
    """First-in-first-out dictionary of L2-normalised keys (MoCo §3.2), filled from all ranks.

    Buffers (saved in checkpoints): ``keys [size, dim]``, initialised with random unit vectors, and
    ``ptr`` (0-dim long), the row where the next key is written. :meth:`enqueue` first gathers the
    keys of every rank, so all ranks hold the same queue in rank order. The random initial keys must
    agree across ranks: seed every rank identically, or let DDP broadcast rank 0's buffers (its
    default).

    Args:
        dim: key dimension, ``>= 1``.
        size: number of keys kept, ``>= 1``; need not be a multiple of the batch size.
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int = 65536) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Number of keys the queue holds."""
        return self.keys.shape[0]

    @float32_math
    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Gather ``keys [B, dim]`` from all ranks, then overwrite the oldest entries with them.

        The ``W * B`` gathered keys are written in rank order at ``ptr, ptr+1, ...`` modulo ``size``
        (wrapping around), and ``ptr`` advances by ``W * B`` modulo ``size``. When more keys arrive
        than the queue holds, only the most recent ``size`` are kept, at the positions they would
        have reached one by one.
        """
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"keys must have shape [B, {self.keys.shape[1]}], got {tuple(keys.shape)}")
        keys = gather_no_grad(keys)  # [W*B, dim], rank order
        keys = F.normalize(keys.float(), dim=1).to(self.keys.dtype)
        num_new = keys.shape[0]
        skipped = max(num_new - self.size, 0)  # keys that would be overwritten within this call
        keys = keys[skipped:]
        offsets = torch.arange(skipped, num_new, device=self.keys.device)
        rows = (self.ptr + offsets) % self.size  # [n], stays on device: no host sync
        self.keys.index_copy_(0, rows, keys)
        self.ptr.copy_((self.ptr + num_new) % self.size)

    def extra_repr(self) -> str:
        return f"dim={self.keys.shape[1]}, size={self.size}"


@float32_math
def moco_v2_info_nce(
    q: Tensor, k: Tensor, queue_keys: Tensor, temperature: float = 0.2
) -> tuple[Tensor, Tensor]:
    """MoCo v2 InfoNCE (MoCo Eq. 1, MPCL Eq. 1) against a queue of negatives.

    ``loss = mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.n_j/tau)) )``, i.e. a
    cross-entropy on the logits ``[q.k+, q.queue] / tau`` with target 0. ``q`` and ``k`` are
    L2-normalised here; ``queue_keys`` are used as given (:class:`KeyQueue` stores unit vectors).

    The queue is copied before use, so :meth:`KeyQueue.enqueue` may run before ``backward``.
    This rank's batch only; the queue already holds keys of all ranks.

    Args:
        q: ``[B, D]`` queries (receive the gradient).
        k: ``[B, D]`` positive keys from the momentum encoder (detached).
        queue_keys: ``[Nq, D]`` negative keys (detached).
        temperature: ``tau > 0``.

    Returns:
        ``(loss, acc)``: scalar float32 loss and the detached fraction of queries whose positive
        has the highest logit.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.ndim != 2 or q.shape != k.shape or queue_keys.ndim != 2 or queue_keys.shape[1] != q.shape[1]:
        raise ValueError(
            f"q and k must have shape [B, D] and queue_keys [Nq, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(queue_keys.shape)}"
        )
    q = F.normalize(q.float(), dim=1)  # [B, D]
    k = F.normalize(k.detach().float(), dim=1)  # [B, D]
    # A copy, because the queue buffer is updated in place before backward needs it.
    negatives = queue_keys.detach().to(torch.float32, copy=True)  # [Nq, D]
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
    l_neg = q @ negatives.T  # [B, Nq]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [B, 1+Nq]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc


@float32_math
def moco_v3_info_nce(
    q: Tensor, k: Tensor, temperature: float = 0.2, gather_distributed: bool = True
) -> tuple[Tensor, Tensor]:
    """MoCo v3 InfoNCE with in-batch negatives (MoCo v3 Eq. 1; MPCL Eq. 1), scaled by ``2 * tau``.

    Logits ``q_i . k_j / tau`` against the keys of the *global* batch (gathered without gradient),
    target ``j = i + rank * B``; the cross-entropy is multiplied by ``2 * tau`` as in MoCo v3's code.
    ``q`` and ``k`` are L2-normalised here.

    Each rank returns the mean over its own queries; since ``all_gather`` needs equal local batch
    sizes, the mean over ranks that DDP optimises equals the loss of the concatenated batch.

    Args:
        q: ``[B, D]`` queries (receive the gradient).
        k: ``[B, D]`` keys from the momentum encoder (detached).
        temperature: ``tau > 0``.
        gather_distributed: use the keys of all ranks as negatives (no-op on one process).

    Returns:
        ``(loss, acc)``: scalar float32 loss and the detached fraction of queries whose own key has
        the highest logit.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both have shape [B, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    q = F.normalize(q.float(), dim=1)  # [B, D]
    k = F.normalize(k.detach().float(), dim=1)  # [B, D]
    offset = 0
    if gather_distributed and world_size() > 1:
        k = gather_no_grad(k)  # [W*B, D]
        offset = rank() * q.shape[0]
    logits = q @ k.T / temperature  # [B, W*B]
    labels = torch.arange(q.shape[0], device=q.device) + offset  # [B]
    loss = F.cross_entropy(logits, labels) * (2.0 * temperature)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc
