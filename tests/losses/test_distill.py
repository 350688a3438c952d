"""The symmetric KL distillation loss (HVP-MTL Eq. 6, ``ssl_zoo.losses.distill``): value and student gradient
against a float64 loop, torch's ``kl_div``, the default temperature and the teacher receiving no gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_zoo.losses import (
    SymmetricKLDivergence,
    symmetric_kl_divergence,
)
from tests.helpers.loss_checks import close, rng


def _sym_kl_reference(s, t, temp) -> torch.Tensor:
    """HVP-MTL Eq. 6 in float64, one class at a time: (KL(p_s||p_t) + KL(p_t||p_s)) / 2, batch mean.

    Takes tensors (converted to float64); ``s`` may require grad: the brute-force gradient comes from autograd."""
    s, t = s.double(), t.double()

    def softmax(row):
        e = [torch.exp(v / temp) for v in row]
        z = sum(e)
        return [v / z for v in e]

    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = softmax(list(s[i])), softmax(list(t[i]))
        kl_st = sum(a * torch.log(a / b) for a, b in zip(ps, pt, strict=True))
        kl_ts = sum(b * torch.log(b / a) for a, b in zip(ps, pt, strict=True))
        total = total + (kl_st + kl_ts) / 2
    return total / s.shape[0]


@pytest.mark.parametrize("shape", [(1, 2), (4, 10)])
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_symmetric_kl_matches_brute_force(shape, temp):
    s = 2 * torch.randn(shape, generator=rng(52))
    t = 2 * torch.randn(shape, generator=rng(53))
    loss = symmetric_kl_divergence(s, t, temperature=temp)
    close(loss, _sym_kl_reference(s, t, temp).item())
    close(symmetric_kl_divergence(t, s, temperature=temp), float(loss))  # symmetric in value
    close(
        SymmetricKLDivergence(temp)(s.bfloat16(), t.bfloat16()),
        _sym_kl_reference(s.bfloat16().float(), t.bfloat16().float(), temp).item(),
        rtol=1e-4,
    )
    # Independent check with torch's KL: KL(p||q) = kl_div(log q, p); Eq. 6 is the mean of both directions.
    ls, lt = F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1)
    expected = 0.5 * (F.kl_div(lt, ls, log_target=True, reduction="batchmean") + F.kl_div(
        ls, lt, log_target=True, reduction="batchmean"
    ))
    close(loss, float(expected))


@pytest.mark.parametrize("temp", [1.0, 0.3])
def test_symmetric_kl_gradient_matches_brute_force(temp):
    """The student's gradient equals autograd through the float64 loop over Eq. 6 (teacher held fixed)."""
    s = 2 * torch.randn(3, 5, generator=rng(56))
    t = 2 * torch.randn(3, 5, generator=rng(57))
    s32 = s.clone().requires_grad_(True)
    symmetric_kl_divergence(s32, t, temperature=temp).backward()
    s64 = s.double().requires_grad_(True)
    _sym_kl_reference(s64, t, temp).backward()
    close(s32.grad, s64.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_symmetric_kl_default_temperature_is_one():
    """Eq. 6 has no temperature: the default is T = 1, for the function and the module."""
    s, t = torch.randn(2, 4, generator=rng(58)), torch.randn(2, 4, generator=rng(59))
    close(symmetric_kl_divergence(s, t), _sym_kl_reference(s, t, 1.0).item())
    close(SymmetricKLDivergence()(s, t), _sym_kl_reference(s, t, 1.0).item())


def test_symmetric_kl_zero_when_equal_and_student_only_gradient():
    s = torch.randn(3, 5, generator=rng(54), requires_grad=True)
    t = torch.randn(3, 5, generator=rng(55), requires_grad=True)
    close(symmetric_kl_divergence(s, s.detach() + 10.0), 0.0)  # softmax is shift invariant
    symmetric_kl_divergence(s, t).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
