"""Learning-rate scaling, schedules (per-step, warmup + cosine), the weight-decay exemptions and the LARS optimiser
shared by the methods and the evaluation protocols (parameter groups: timm's ``param_groups_weight_decay``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "NO_WEIGHT_DECAY", "global_batch_size", "scaled_lr", "warmup_cosine", "warmup_cosine_scheduler"]

#: Parameters without weight decay beyond timm's 1-D rule (biases, norms): class and mask tokens, position embeddings
#: and relative position bias tables, as BEiT, MAE and timm's ``no_weight_decay()`` exempt them. Patterns for
#: ``timm.optim.param_groups_weight_decay(module, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)``.
NO_WEIGHT_DECAY: tuple[str, ...] = ("*token", "*pos_embed", "*relative_position_bias_table")


def scaled_lr(base_lr: float, batch_size: int, reference: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr = base_lr * batch_size / reference``."""
    return base_lr * batch_size / reference


# Ours: BEiT's warmup linspace(start, peak, n) peaks on its last step; timm's CosineLRScheduler (t / n) does not.
def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    final_ratio: float = 0.0,
    start_ratio: float | None = None,
) -> float:
    """Multiplier of the peak lr: linear warmup, then half-cosine from 1 down to ``final_ratio``.

    Warmup: with ``start_ratio=None`` (the default) step ``s`` gets ``(s + 1) / warmup_steps``, i.e. a ramp
    from 0 that reaches the peak on the last warmup step. With a ``start_ratio`` it is BEiT's / DINO's
    ``np.linspace(start, peak, warmup_steps)``: step 0 is at ``start_ratio`` and step ``warmup_steps - 1`` at
    the peak. The cosine part, ``final + (1 - final) * (1 + cos(pi * i / (total - warmup))) / 2`` for
    ``i = step - warmup_steps``, is the same in both cases (BEiT's ``cosine_scheduler``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        if start_ratio is None:
            return (step + 1) / warmup_steps
        if warmup_steps == 1:
            return start_ratio  # np.linspace(start, peak, 1) == [start]
        return start_ratio + (1.0 - start_ratio) * step / (warmup_steps - 1)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_ratio: float = 0.0,
    constant_groups: Sequence[int] = (),
    start_ratio: float | None = None,
) -> LambdaLR:
    """Per-step :func:`warmup_cosine` for every param group except ``constant_groups`` (kept at their lr,
    e.g. SimSiam's predictor, "fix_pred_lr"). ``start_ratio``: see :func:`warmup_cosine`."""
    schedule = lambda step: warmup_cosine(step, total_steps, warmup_steps, final_ratio, start_ratio)
    lambdas = [
        (lambda _step: 1.0) if i in constant_groups else schedule for i in range(len(optimizer.param_groups))
    ]
    return LambdaLR(optimizer, lambdas)


def global_batch_size(trainer) -> int:
    """Images per optimiser step over all processes: per-process batch x processes x accumulation."""
    per_process = getattr(trainer.datamodule, "batch_size", None)
    if per_process is None:
        raise ValueError("lr scaling needs the per-process batch size: train with an ssl_zoo data module")
    return int(per_process) * trainer.world_size * trainer.accumulate_grad_batches


# Our own LARS: torch has none, and lightly's trust ratio is not the official eta * ||p|| / ||g + wd * p||.
class LARS(Optimizer):
    """SGD with momentum and the layer-wise trust ratio, as MoCo v3 (``moco/optimizer.py``) and Barlow Twins
    (``main.py``, ``weight_decay_filter`` and ``lars_adaptation_filter`` on) implement it.

    For each parameter with ``ndim > 1`` (a weight matrix or a convolution kernel)::

        d = grad + weight_decay * p
        d = d * (trust_coefficient * ||p|| / ||d||)      (ratio 1 when ||p|| or ||d|| is 0)

    Biases and normalisation parameters (``ndim <= 1``) take neither the weight decay nor the trust ratio:
    ``d = grad``. Then ``v = momentum * v + d`` and ``p = p - lr * v``. The trust ratio applies whatever the
    weight decay, also at 0 (linear probes). Per-group ``lr`` (Barlow Twins' separate lr for biases and norms),
    ``weight_decay``, ``momentum`` and ``trust_coefficient`` override the defaults.
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
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), group["trust_coefficient"] * p_norm / d_norm, one)
                    d = d.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
