"""Learning-rate scaling and schedules shared by the methods (per-step, warmup + cosine)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def scaled_lr(base_lr: float, batch_size: int, reference: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr = base_lr * batch_size / reference``."""
    return base_lr * batch_size / reference


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


def split_weight_decay(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two param groups: weight decay on matrices, none on biases, norms, tokens and embeddings (1-D / 0-D
    tensors and names ending in ``token``/``pos_embed``), as BEiT, MAE and timm do."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("token", "pos_embed", "relative_position_bias_table")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
