"""Multi-projector contrastive learning terms of MPCL (Eq. 2-4), and the orthogonality alternative to PCR.

The three contract functions (:func:`projector_contrastive_regularization`, :func:`ptb_weights` = the bare
softmax of Eq. 3, :func:`mpcl_total_loss` = Eq. 4 as printed) are used as they stand; :func:`ptb_loss_weights`
is the loss-scale reading of Eq. 3-4 the method trains with (see its docstring).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_zoo.losses.precision import float32_math

__all__ = [
    "mpcl_total_loss",
    "projector_contrastive_regularization",
    "projector_orthogonality",
    "ptb_loss_weights",
    "ptb_weights",
]

PTBScale = Literal["projectors", "literal"]


@float32_math
def projector_contrastive_regularization(z: Tensor) -> Tensor:
    """Projector contrastive regularisation (MPCL Eq. 2), one value per projector.

    ``pcr_m = mean_b (1/(Mp-1)) * sum_{l != m} cos(z_b^m, z_b^l)``: the similarity between the
    outputs of different projectors for the *same* sample. Adding it to the loss pushes the
    projectors apart, so gradients flow to every projector (it is a regulariser, not a target).

    Args:
        z: ``[Mp, B, D]`` outputs of ``Mp >= 2`` projectors (computed in float32).

    Returns:
        ``[Mp]`` float32 batch averages over this rank's batch.
    """
    return _mean_over_other_projectors(z, lambda cos: cos)


def _mean_over_other_projectors(z: Tensor, of_cosine) -> Tensor:
    """``mean_b (1/(Mp-1)) * sum_{l != m} of_cosine(cos(z_b^m, z_b^l))`` per projector m: the pairs of Eq. 2."""
    if z.ndim != 3 or z.shape[0] < 2:
        raise ValueError(f"z must have shape [Mp, B, D] with Mp >= 2 projectors, got {tuple(z.shape)}")
    num_proj = z.shape[0]
    z = F.normalize(z.float(), dim=-1)  # [Mp, B, D]
    cos = torch.einsum("mbd,lbd->bml", z, z)  # [B, Mp, Mp] per-sample projector similarities
    off_diagonal = ~torch.eye(num_proj, dtype=torch.bool, device=z.device)  # [Mp, Mp], l != m
    per_sample = torch.where(off_diagonal, of_cosine(cos), 0.0).sum(dim=2) / (num_proj - 1)  # [B, Mp]
    return per_sample.mean(dim=0)


@float32_math
def ptb_weights(acc: Tensor, epsilon: float = 0.5) -> Tensor:
    """Performance-based task balancing weights (MPCL Eq. 3): ``softmax((1 - acc) / epsilon)``.

    Projectors with lower accuracy get larger weights. No gradient flows through the weights.

    Args:
        acc: ``[Mp]`` each projector's mean contrastive top-1 accuracy over the previous epoch, as a
            fraction in ``[0, 1]``.
        epsilon: softmax temperature, ``> 0``.

    Returns:
        ``[Mp]`` float32 weights summing to 1.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if acc.ndim != 1:
        raise ValueError(f"acc must have shape [Mp], got {tuple(acc.shape)}")
    acc = acc.detach().float()
    if bool(((acc < 0) | (acc > 1)).any()):
        raise ValueError(f"acc must be fractions in [0, 1] (not percentages), got {acc.tolist()}")
    return torch.softmax((1.0 - acc) / epsilon, dim=0)


@float32_math
def projector_orthogonality(z: Tensor) -> Tensor:
    """Orthogonality constraint between projectors (the MPCL Table II alternative to PCR), one value per projector.

    ``orth_m = mean_b (1/(Mp-1)) * sum_{l != m} cos(z_b^m, z_b^l)^2``: the same pairs as Eq. 2, but the squared
    cosine, so minimising it drives different projectors' outputs for one sample towards *orthogonal* rather
    than towards opposite directions as PCR does. (Our reading of the paper's "orthogonality constraint":
    imposed on the projector outputs, like PCR, so the two differ only in the target geometry.)

    Args:
        z: ``[Mp, B, D]`` outputs of ``Mp >= 2`` projectors (computed in float32).

    Returns:
        ``[Mp]`` float32 batch averages over this rank's batch.
    """
    return _mean_over_other_projectors(z, lambda cos: cos.pow(2))


@torch.no_grad()
def ptb_loss_weights(acc: Tensor, epsilon: float = 0.5, scale: PTBScale = "projectors") -> Tensor:
    """The weights w_m that multiply the projectors' losses in Eq. 4 when PTB is on.

    Eq. 4 averages over the projectors, ``(1/Mp) * sum_m (w_m L_m + lam PCR_m)``; with the bare softmax of
    Eq. 3 as ``w_m`` (summing to 1) the contrastive part would be ``1/Mp`` of the mean projector loss, so
    switching PTB on would also divide the loss (and the gradient reaching the backbone) by ``Mp`` against PTB
    off (``w_m = 1``). Our reading: PTB *re-weights* the projectors, it does not shrink the loss, so the
    default ``scale="projectors"`` uses ``Mp * softmax((1 - acc) / epsilon)``, which sums to ``Mp`` and is 1
    for every projector when their accuracies are equal (exactly the PTB-off loss). ``scale="literal"`` keeps
    the bare softmax of Eq. 3 (:func:`ptb_weights`).

    Args:
        acc: ``[Mp]`` each projector's mean top-1 accuracy over the previous epoch, fractions in ``[0, 1]``.
        epsilon: softmax temperature of Eq. 3.
        scale: ``projectors`` (``Mp * softmax``) or ``literal`` (``softmax``).

    Returns:
        ``[Mp]`` float32 weights.
    """
    if scale not in ("projectors", "literal"):
        raise ValueError(f"scale must be 'projectors' or 'literal', got '{scale}'")
    weights = ptb_weights(acc, epsilon)  # [Mp], sums to 1 (Eq. 3)
    return weights * acc.shape[0] if scale == "projectors" else weights


@float32_math
def mpcl_total_loss(losses: Tensor, pcr: Tensor, weights: Tensor, lam: float = 0.01) -> Tensor:
    """MPCL objective (Eq. 4): ``(1/Mp) * sum_m (weights_m * losses_m + lam * pcr_m)``.

    Args:
        losses: ``[Mp]`` batch-averaged contrastive loss of each projector.
        pcr: ``[Mp]`` batch-averaged :func:`projector_contrastive_regularization`.
        weights: ``[Mp]`` :func:`ptb_weights` (treated as constants).
        lam: weight of the regulariser, ``>= 0``.

    Returns:
        Scalar float32 loss.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not (losses.ndim == 1 and losses.shape == pcr.shape == weights.shape):
        raise ValueError(
            f"losses, pcr and weights must all have shape [Mp], got {tuple(losses.shape)}, "
            f"{tuple(pcr.shape)} and {tuple(weights.shape)}"
        )
    per_projector = weights.detach().float() * losses.float() + lam * pcr.float()  # [Mp]
    return per_projector.mean()
