"""Float32 loss maths under mixed precision.

Lightning's ``precision: bf16-mixed`` (and ``16-mixed``) runs the training step under
``torch.autocast``, which executes matrix products in bfloat16 even when both operands are float32.
A contrastive logit ``z_i . z_j / tau`` with ``tau = 0.1`` then carries an error of about
``2^-8 / tau ~ 0.04`` before the softmax or log-sum-exp, enough to change a loss in its second
digit. Every loss function of this package is therefore decorated with :func:`float32_math`: it
runs with autocast switched off and casts its inputs to float32 itself, so similarities, softmax,
log-sum-exp, Sinkhorn iterations and normalisations are all computed in float32 whatever the
surrounding precision. The network that produces the inputs keeps running in bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = ["float32_math"]

# Device types on which Lightning's mixed precision plugins (or a user) may enable autocast.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")

P = ParamSpec("P")
R = TypeVar("R")


def float32_math(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast disabled on every device type where it is enabled.

    ``fn`` must cast its floating-point tensor inputs to float32 itself (``x.float()``): with autocast
    off, a bfloat16 operand meeting a float32 one in a matrix product would raise a dtype error rather
    than silently compute in low precision. Outside autocast the decorator costs one flag check per
    device type.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with contextlib.ExitStack() as stack:
            for device_type in AUTOCAST_DEVICE_TYPES:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper
