"""Comparisons whose tolerance follows the dtype and the tensor's magnitude, not one machine's round-off.

Two float32 computations of the same quantity that sum in different orders (another thread count, another
kernel, autograd's order against an explicit formula) differ by a few units of float32's epsilon *of the
tensor's scale*: an element near zero can be off by 1e-7 in absolute terms while its own value is 1e-6, so an
element-wise ``rtol`` fails on it. Here the absolute tolerance is a multiple of the whole tensor's largest
magnitude, and the relative one a multiple of the dtype's epsilon.
"""

from __future__ import annotations

import torch


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 64.0,
                          msg: str = "") -> None:
    """``|actual - expected| <= ulps * eps(dtype) * max(|expected|)`` element-wise (and the same dtype/shape).

    ``ulps`` is the number of float epsilons of the tensor's scale that round-off may reach: 64 covers sums
    of thousands of terms in any order; a wrong formula or a missing stop-gradient is off by orders more.
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    tol = ulps * torch.finfo(expected.dtype).eps * max(scale, torch.finfo(expected.dtype).tiny)
    worst = (actual.detach() - expected.detach()).abs().max().item() if expected.numel() else 0.0
    assert worst <= tol, f"{msg}: largest difference {worst:.3g} > {tol:.3g} ({ulps} eps of the scale {scale:.3g})"
