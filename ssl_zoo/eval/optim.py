"""LARS as the linear-probe protocols of MoCo v3, MAE and MVP use it.

``lightly.utils.lars.LARS`` (from Lightning Bolts) skips the layer-wise trust ratio for every parameter whose
weight decay is 0. Linear probes train with weight decay 0, so there it silently becomes plain SGD at
``lr = 0.1 * B / 256`` (6.4 for MAE's batch 16384) instead of LARS. MoCo v3 and MAE apply the trust ratio to
every matrix (``ndim > 1``) whatever the weight decay, and exclude biases and norm parameters; so does this
implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LARS"]


class LARS(Optimizer):
    """SGD with momentum and the LARS trust ratio (You et al. 2017, Eq. 6; MoCo v3 / MAE variant).

    For each parameter with ``ndim > 1``:
        d = grad + weight_decay * p
        d = d * (trust_coefficient * ||p|| / ||d||)   (ratio 1 when ||p|| or ||d|| is 0)
    then ``v = momentum * v + d; p = p - lr * v``. Biases and other 1-D parameters take the plain SGD step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:  # not a bias or a norm parameter
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(p_norm > 0, torch.where(d_norm > 0, group["trust_coefficient"] * p_norm / d_norm,
                                                                 one), one)
                    d = d.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
