"""Image-aware contrastive loss (BAM+IA-CLoss, Eq. 1) and the supervised contrastive loss it is
compared with (Khosla et al., 2020, L_out; the paper's "SUP" ablation with image ids as labels).

Both losses see the global batch under DDP: embeddings and ids of every rank join the candidate
set ``A(i)`` and positive set ``P(i)`` of each local anchor ``i``.

Scaling under DDP. Rank ``r`` returns

    L_r = W * sum_{i local, |P(i)| >= 1} l_i / N_valid

where ``W`` is the world size and ``N_valid`` the number of anchors with at least one positive in
the *global* batch. The mean of ``L_r`` over ranks, which is what DDP's gradient averaging optimises,
is therefore exactly the loss of one process on the concatenated batch, and so are the parameter
gradients. The value a single rank returns is *not* the global loss; log it with a mean over ranks
(``self.log(..., sync_dist=True)``) to see the global value. Without a process group ``W = 1`` and
``L`` is the plain mean over valid anchors. Local batches must have equal size on every rank (a
requirement of ``all_gather``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math
from ssl_zoo.utils.distributed import gather, gather_no_grad, rank, world_size

__all__ = [
    "ImageAwareContrastiveLoss",
    "SupConLoss",
    "image_aware_contrastive_loss",
    "supervised_contrastive_loss",
]


def _check_inputs(z: Tensor, ids: Tensor, temperature: float, ids_name: str) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z.ndim != 2:
        raise ValueError(f"z must have shape [N, D], got {tuple(z.shape)}")
    if ids.shape != (z.shape[0],):
        raise ValueError(f"{ids_name} must have shape [N] = [{z.shape[0]}], got {tuple(ids.shape)}")


def _pairwise_logits(
    z: Tensor, ids: Tensor, temperature: float, gather_distributed: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Similarities of local anchors to the (global) candidate set.

    Returns:
        logits: ``[N, N_all]`` float32 ``s_ij / tau``, with ``z`` L2-normalised.
        self_mask: ``[N, N_all]`` bool, True at each anchor's own column.
        pos_mask: ``[N, N_all]`` bool, same id and not the anchor itself (``P(i)``).
        n_valid: ``[]`` long, number of anchors with ``|P| >= 1`` in the global batch.
        scale: world size when the batch is gathered, else 1.
    """
    z = F.normalize(z.float(), dim=1)  # [N, D], cosine similarities in float32
    n = z.shape[0]
    if gather_distributed and world_size() > 1:
        z_all = gather(z)  # [W*N, D], gradients flow back to every rank's slice
        ids_all = gather_no_grad(ids)  # [W*N]
        offset, scale = rank() * n, world_size()
    else:
        z_all, ids_all, offset, scale = z, ids, 0, 1
    logits = z @ z_all.T / temperature  # [N, N_all]
    rows = torch.arange(n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rows + offset] = True
    pos_mask = (ids[:, None] == ids_all[None, :]) & ~self_mask  # [N, N_all]
    # Each id seen c >= 2 times globally contributes c anchors with a positive; counting on the
    # gathered ids gives the global normaliser without another collective.
    _, counts = torch.unique(ids_all, return_counts=True)
    n_valid = counts[counts > 1].sum()
    return logits, self_mask, pos_mask, n_valid, scale


@float32_math
def image_aware_contrastive_loss(
    z: Tensor, image_ids: Tensor, temperature: float = 0.1, gather_distributed: bool = True
) -> Tensor:
    """BAM+IA-CLoss Eq. 1, averaged over anchors with at least one positive.

    ``l_i = -(1/|P(i)|) * log( sum_{p in P(i)} exp(s_ip/tau) / sum_{a in A(i)} exp(s_ia/tau) )``,
    with ``s_ij = z_i . z_j`` of L2-normalised embeddings, ``A(i)`` every other view of the batch
    and ``P(i)`` the views in ``A(i)`` with the same image id. As printed in the paper, ``1/|P(i)|``
    multiplies the log of the *sum* over positives (unlike SupCon, which averages the logs).

    Args:
        z: ``[N, D]`` embeddings (any float dtype; computed in float32).
        image_ids: ``[N]`` integer id of the source image of each view.
        temperature: ``tau > 0``; stable down to 0.01 (log-sum-exp throughout).
        gather_distributed: use the global batch under DDP (see the module docstring for scaling).

    Returns:
        Scalar float32 loss; 0 (with a graph) when no anchor has a positive.
    """
    _check_inputs(z, image_ids, temperature, "image_ids")
    logits, self_mask, pos_mask, n_valid, scale = _pairwise_logits(
        z, image_ids, temperature, gather_distributed
    )
    n_pos = pos_mask.sum(dim=1)  # [N] |P(i)|
    valid = n_pos > 0
    # Keep only anchors with a positive so that no log-sum-exp runs over an empty set (-inf, NaN grad).
    logits, self_mask, pos_mask, n_pos = logits[valid], self_mask[valid], pos_mask[valid], n_pos[valid]
    neg_inf = torch.finfo(logits.dtype).min
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, neg_inf), dim=1)  # [N_v] over A(i)
    log_numerator = torch.logsumexp(logits.masked_fill(~pos_mask, neg_inf), dim=1)  # [N_v] over P(i)
    losses = -(log_numerator - log_denominator) / n_pos  # [N_v] l_i
    return losses.sum() * scale / n_valid.clamp(min=1)


@float32_math
def supervised_contrastive_loss(
    z: Tensor, labels: Tensor, temperature: float = 0.1, gather_distributed: bool = True
) -> Tensor:
    """Supervised contrastive loss L_out (Khosla et al., 2020, Eq. 2).

    ``l_i = -(1/|P(i)|) * sum_{p in P(i)} log( exp(s_ip/tau) / sum_{a in A(i)} exp(s_ia/tau) )``
    averaged over anchors with ``|P(i)| >= 1``; ``A(i)`` and ``P(i)`` as in
    :func:`image_aware_contrastive_loss` with ``labels`` in place of image ids.

    Args:
        z: ``[N, D]`` embeddings (any float dtype; computed in float32).
        labels: ``[N]`` integer labels (image ids for BAM's "SUP" ablation).
        temperature: ``tau > 0``; stable down to 0.01.
        gather_distributed: use the global batch under DDP (see the module docstring for scaling).

    Returns:
        Scalar float32 loss; 0 (with a graph) when no anchor has a positive.
    """
    _check_inputs(z, labels, temperature, "labels")
    logits, self_mask, pos_mask, n_valid, scale = _pairwise_logits(z, labels, temperature, gather_distributed)
    n_pos = pos_mask.sum(dim=1)  # [N]
    valid = n_pos > 0
    logits, self_mask, pos_mask, n_pos = logits[valid], self_mask[valid], pos_mask[valid], n_pos[valid]
    neg_inf = torch.finfo(logits.dtype).min
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, neg_inf), dim=1, keepdim=True)
    log_prob = logits - log_denominator  # [N_v, N_all] log( exp(s_ia/tau) / sum_A exp(.) )
    losses = -torch.where(pos_mask, log_prob, 0.0).sum(dim=1) / n_pos  # [N_v]
    return losses.sum() * scale / n_valid.clamp(min=1)


class ImageAwareContrastiveLoss(nn.Module):
    """Image-aware contrastive loss of BAM+IA-CLoss (Eq. 1); sees the global batch under DDP.

    See :func:`image_aware_contrastive_loss` for the formula. Under DDP each rank returns
    ``W * sum(l_i over its local anchors) / (number of anchors with a positive in the global batch)``,
    so the mean over ranks, which DDP's gradient averaging optimises, is exactly the loss (and
    gradient) of one process on the concatenated batch; log it with ``sync_dist=True``.

    Args:
        temperature: ``tau > 0``.
        gather_distributed: gather embeddings and ids of all ranks (no-op on one process).
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor, image_ids: Tensor) -> Tensor:
        """``z: [N, D]``, ``image_ids: [N]`` -> scalar loss."""
        return image_aware_contrastive_loss(z, image_ids, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss L_out (Khosla et al., 2020); sees the global batch under DDP.

    See :func:`supervised_contrastive_loss` for the formula. Under DDP each rank returns
    ``W * sum(l_i over its local anchors) / (number of anchors with a positive in the global batch)``,
    so the mean over ranks, which DDP's gradient averaging optimises, is exactly the loss (and
    gradient) of one process on the concatenated batch; log it with ``sync_dist=True``.

    Args:
        temperature: ``tau > 0``.
        gather_distributed: gather embeddings and labels of all ranks (no-op on one process).
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """``z: [N, D]``, ``labels: [N]`` -> scalar loss."""
        return supervised_contrastive_loss(z, labels, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
