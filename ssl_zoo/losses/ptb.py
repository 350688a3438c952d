"""Projector training balance (PTB, MPCL §III-C, Eq. 3): each projector's loss weighted by last epoch's accuracy.

    w_m = exp((1 - acc_m) / epsilon) / sum_k exp((1 - acc_k) / epsilon)                      (Eq. 3)

``acc_m`` is "the one epoch mean accuracy of m-th projector's contrastive task": the weights of an epoch come from
the accuracies of the previous one, so PTB is state that lives across steps and epochs. :func:`ptb_weights` is
Eq. 3; :class:`ProjectorTrainingBalance` holds the per-epoch counts and the weights they give the next epoch.

Loss scale (our reading, ``scale``): Eq. 4 averages over the projectors, ``(1/Mp) sum_m (w_m L_m + lam PCR_m)``;
with Eq. 3's softmax as ``w_m`` (summing to 1) switching PTB on would also divide the contrastive part, and the
gradient reaching the backbone, by ``Mp`` against PTB off (``w_m = 1``). PTB re-weights the projectors, it does not
shrink the loss: ``scale="projectors"`` (the default) uses ``Mp * softmax``, which is 1 for every projector when
their accuracies are equal, exactly the PTB-off loss; ``scale="literal"`` uses the bare softmax of Eq. 3.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ssl_zoo.losses.precision import float32_math
from ssl_zoo.utils.distributed import all_reduce_sum

__all__ = ["PTBScale", "ProjectorTrainingBalance", "ptb_weights"]

PTBScale = Literal["projectors", "literal"]


@float32_math
def ptb_weights(acc: Tensor, epsilon: float = 0.5) -> Tensor:
    """Performance-based training balance weights (MPCL Eq. 3): ``softmax((1 - acc) / epsilon)``.

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


class ProjectorTrainingBalance(nn.Module):
    """PTB's state: this epoch's accuracy counts and the weights the last completed epoch gave (Eq. 3).

    :meth:`update` adds a step's accuracies, :meth:`close_epoch` turns a completed epoch's counts into the next
    epoch's weights, :meth:`loss_weights` gives the ``w_m`` of Eq. 4. Everything is a buffer, so checkpoints carry it
    and a resumed run continues exactly; the counts are sums over all ranks (reduced in :meth:`update`), so every rank
    holds the same values and DDP's broadcast of rank 0's buffers changes nothing. Before the first completed epoch
    the weights are uniform.

    Args:
        num_projectors: ``Mp >= 1``.
        epsilon: the softmax temperature of Eq. 3 (0.5).
        scale: ``projectors`` (``w = Mp * softmax``) or ``literal`` (``w = softmax``); see the module docstring.
        enabled: ``False`` keeps ``w_m = 1`` (PTB off); the accuracies are still counted, for the logs.
        gather_distributed: count the queries of all ranks (no-op on one process).
    """

    weight: Tensor
    last_acc: Tensor
    correct: Tensor
    count: Tensor

    def __init__(self, num_projectors: int, epsilon: float = 0.5, scale: PTBScale = "projectors",
                 enabled: bool = True, gather_distributed: bool = True) -> None:
        super().__init__()
        if num_projectors < 1:
            raise ValueError(f"num_projectors must be >= 1, got {num_projectors}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if scale not in ("projectors", "literal"):
            raise ValueError(f"scale must be 'projectors' or 'literal', got '{scale}'")
        self.epsilon, self.scale, self.enabled = epsilon, scale, enabled
        self.gather_distributed = gather_distributed
        self.register_buffer("weight", torch.full((num_projectors,), 1.0 / num_projectors))  # Eq. 3, sums to 1
        self.register_buffer("last_acc", torch.zeros(num_projectors))  # acc_m of the last completed epoch
        self.register_buffer("correct", torch.zeros(num_projectors))  # correct queries this epoch
        self.register_buffer("count", torch.zeros(()))  # queries this epoch (per projector)

    @torch.no_grad()
    def update(self, acc: Tensor, batch_size: int) -> Tensor:
        """Add one step: ``acc [Mp]`` each projector's top-1 accuracy over this rank's ``batch_size`` queries.

        Returns the step's ``[Mp]`` accuracy over the global batch (one all-reduce; none on one process).
        """
        n = torch.tensor([float(batch_size)], device=acc.device)
        counts = torch.cat([acc.detach().float() * n, n])  # [Mp + 1]: correct queries, queries
        if self.gather_distributed:
            counts = all_reduce_sum(counts)
        self.correct += counts[:-1].to(self.correct)
        self.count += counts[-1].to(self.count)
        return counts[:-1] / counts[-1]

    @torch.no_grad()
    def close_epoch(self) -> None:
        """End a completed epoch: ``acc_m`` = its mean accuracy, the next epoch's weights = Eq. 3 (acc); the counts
        restart. An epoch without queries changes nothing."""
        if self.count.item() <= 0:
            return
        acc = (self.correct / self.count).clamp_(0.0, 1.0)  # [Mp], guards float round-off
        self.last_acc.copy_(acc)
        if self.enabled:
            self.weight.copy_(ptb_weights(acc, self.epsilon))
        self.discard_epoch()

    @torch.no_grad()
    def discard_epoch(self) -> int:
        """Drop this epoch's counts (an epoch cut short that will not be continued); the queries dropped."""
        dropped = int(self.count.item())
        self.correct.zero_()
        self.count.zero_()
        return dropped

    def loss_weights(self) -> Tensor:
        """``w_m`` of Eq. 4 (constants): 1 with PTB off; otherwise ``Mp * softmax`` (``scale="literal"``: the
        softmax), which is 1 (``1/Mp``) for every projector before the first completed epoch."""
        if not self.enabled:
            return torch.ones_like(self.weight)
        if self.scale == "literal":
            return self.weight
        return self.weight * self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"num_projectors={self.weight.shape[0]}, epsilon={self.epsilon}, scale={self.scale}, enabled={self.enabled}"
