"""MPCL's projector contrastive regularisation (Eq. 2) and total loss (Eq. 4) (``ssl_zoo.losses.mpcl``): values
and gradients against float64 loops (the PTB weights receive none), closed forms and argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_zoo.losses import (
    mpcl_total_loss,
    projector_contrastive_regularization,
)
from tests.helpers.loss_checks import (
    F64,
    check_value_and_gradients,
    close,
    cosine,
    rand,
    rng,
)


def _pcr_reference(z: np.ndarray) -> np.ndarray:
    mp, b, _ = z.shape
    out = np.zeros(mp)
    for m in range(mp):
        for i in range(b):
            s = sum(
                float(z[m, i] @ z[o, i] / (np.linalg.norm(z[m, i]) * np.linalg.norm(z[o, i])))
                for o in range(mp)
                if o != m
            )
            out[m] += s / (mp - 1) / b
    return out


@pytest.mark.parametrize("shape", [(2, 3, 4), (4, 5, 8)])
def test_pcr_matches_brute_force_and_gradients_flow(shape):
    z = torch.randn(shape, generator=rng(33)).requires_grad_(True)
    pcr = projector_contrastive_regularization(z)
    assert pcr.shape == (shape[0],) and pcr.dtype == torch.float32
    close(pcr, _pcr_reference(z.detach().numpy().astype(np.float64)))
    pcr.sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs().sum(dim=(1, 2)) > 0).all()
    bf16 = projector_contrastive_regularization(z.detach().bfloat16())
    close(bf16, _pcr_reference(z.detach().bfloat16().float().numpy()), rtol=1e-4, atol=1e-4)


def test_pcr_closed_form_and_errors():
    same = torch.randn(1, 4, 6, generator=rng(34)).expand(3, 4, 6)
    close(projector_contrastive_regularization(same), np.ones(3))
    z = torch.zeros(2, 1, 2)
    z[0, 0, 0], z[1, 0, 1] = 1.0, 1.0  # orthogonal projector outputs
    close(projector_contrastive_regularization(z), np.zeros(2))
    with pytest.raises(ValueError, match="Mp >= 2"):
        projector_contrastive_regularization(torch.randn(1, 4, 6))


def test_mpcl_total_loss():
    losses = torch.tensor([2.0, 3.0, 1.5], requires_grad=True)
    pcr = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
    weights = torch.tensor([0.5, 0.3, 0.2])
    total = mpcl_total_loss(losses, pcr, weights, lam=0.1)
    expected = (
        sum(
            w * x + 0.1 * p
            for w, x, p in zip([0.5, 0.3, 0.2], [2.0, 3.0, 1.5], [0.2, -0.1, 0.4], strict=True)
        )
        / 3
    )
    close(total, expected)
    total.backward()
    close(losses.grad, np.array([0.5, 0.3, 0.2]) / 3)
    close(pcr.grad, np.full(3, 0.1 / 3))
    close(mpcl_total_loss(losses, pcr, torch.full((3,), 1.0), lam=0.0), float(losses.detach().mean()))
    with pytest.raises(ValueError, match="shape"):
        mpcl_total_loss(losses, pcr, torch.ones(2))


def _pcr_loop(z):
    num_proj, batch = z.shape[:2]
    out = []
    for m in range(num_proj):
        per_sample = [sum(cosine(z[m, b], z[other, b]) for other in range(num_proj) if other != m) / (num_proj - 1)
                      for b in range(batch)]
        out.append(torch.stack(per_sample).mean())
    return torch.stack(out)


def test_pcr_gradient_matches_the_loop_over_eq2():
    check_value_and_gradients(projector_contrastive_regularization, _pcr_loop, {"z": rand(3, 4, 5, seed=6)}, with_grad=("z",))


def _total_loop(losses, pcr, weights, lam):
    num_proj = losses.shape[0]
    return sum(weights[m].detach() * losses[m] + lam * pcr[m] for m in range(num_proj)) / num_proj


def test_mpcl_total_loss_gradient_flows_to_losses_and_pcr_not_to_the_ptb_weights():
    inputs = {"losses": rand(4, seed=7).abs() + 1, "pcr": rand(4, seed=8), "weights": rand(4, seed=9).softmax(0),
              "lam": 0.3}
    check_value_and_gradients(mpcl_total_loss, _total_loop, inputs, with_grad=("losses", "pcr"), without_grad=("weights",))


def test_pcr_loop_reference_gives_the_known_answers():
    """The loop reference itself and its cosine, on inputs with a known answer."""
    v = torch.tensor([3.0, 4.0], dtype=F64)
    assert float(cosine(v, 2 * v)) == pytest.approx(1.0) and float(cosine(v, torch.tensor([-4.0, 3.0]))) == 0.0
    z = torch.stack([v.expand(2, 2), (-v).expand(2, 2)])  # two projectors pointing in opposite directions
    assert _pcr_loop(z).tolist() == pytest.approx([-1.0, -1.0])
