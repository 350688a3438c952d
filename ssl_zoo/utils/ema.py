"""Exponential-moving-average teachers shared by all momentum methods (MoCo, BYOL-style EMA)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["OncePerOptimizerStep", "cosine_schedule", "init_teacher", "update_ema"]


def init_teacher(student: nn.Module) -> nn.Module:
    """Return a deep copy of ``student`` whose parameters do not require gradients.

    The copy keeps the student's train/eval mode: MoCo's momentum encoder runs its BatchNorm
    layers in train mode like the query encoder.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place EMA step ``theta_t <- m * theta_t + (1 - m) * theta_s`` (MoCo Eq. 2, BYOL Eq. 1).

    Parameters are averaged; buffers (BatchNorm running statistics, counters) are copied from the
    student, since averaging integer counters is meaningless and the running statistics already are
    moving averages.

    Args:
        teacher: momentum model, updated in place.
        student: online model with the same architecture.
        momentum: ``m`` in ``[0, 1]``; 1 keeps the teacher, 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(s_params) ^ set(t_params))
        raise ValueError(f"teacher and student parameters differ in name: {missing[:5]}")
    names = list(s_params)
    for n in names:
        if t_params[n].shape != s_params[n].shape:
            raise ValueError(
                f"parameter {n!r} has shape {tuple(t_params[n].shape)} in the teacher and "
                f"{tuple(s_params[n].shape)} in the student"
            )
    if names:
        # lerp: t + (1 - m) * (s - t) == m * t + (1 - m) * s, fused over all tensors
        torch._foreach_lerp_(
            [t_params[n].data for n in names],
            [s_params[n].data.to(t_params[n].dtype) for n in names],
            1.0 - momentum,
        )
    t_buffers = dict(teacher.named_buffers())
    for n, buf in student.named_buffers():
        if n not in t_buffers:
            raise ValueError(f"buffer {n!r} of the student is missing in the teacher")
        t_buffers[n].copy_(buf)


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Half-cosine ramp from ``start`` (step 0) to ``end`` (step ``max_steps``).

    ``value = end - (end - start) * (1 + cos(pi * step / max_steps)) / 2``: the momentum schedule of
    BYOL (§3.2) and MoCo v3 (``m = 1 - (1 - m0) * (1 + cos(pi * k / K)) / 2`` with ``end = 1``).
    Steps past ``max_steps`` return ``end``.

    Args:
        step: current step, ``>= 0``.
        max_steps: total number of steps, ``>= 1``.
        start: value at step 0.
        end: value at ``max_steps``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step, max_steps) / max_steps
    return end - (end - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


class OncePerOptimizerStep:
    """Gate for EMA updates run from ``on_train_batch_end``: open once after each optimiser step.

    Lightning calls ``on_train_batch_end`` after every micro-batch; under gradient accumulation the batches
    that did not step leave the student unchanged, and moving the teacher towards it again would apply the
    momentum several times per step. The gate compares the trainer's ``global_step`` (optimiser steps taken)
    with the one it last let through. Before :meth:`start` it is always open (unit tests that call the hook
    without a trainer).
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def start(self, global_step: int) -> None:
        """Called from ``on_train_start``: the steps already taken (a resumed run) are not new."""
        self.last_step = global_step

    def __call__(self, global_step: int) -> bool:
        """True when ``global_step`` is new since the last call that returned True."""
        if self.last_step is None:
            return True
        if global_step == self.last_step:
            return False
        self.last_step = global_step
        return True
