"""Gradients of every loss against a float64 brute force written as a loop over the paper's equation.

Value tests alone let a term through that silently carries no gradient (a ``detach`` in the wrong place,
an input consumed through ``.data``): here autograd on the float64 loop gives the reference gradient of
every input that should receive one, and inputs that are targets (keys, queues, PTB weights) must receive
none. The symmetric KL and the swapped prediction loss are covered the same way in ``test_losses.py``;
IA-CLoss / SupCon in ``test_losses.py::test_ia_and_supcon_gradients_match_brute_force``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from ssl_zoo.losses import (
    masked_l1_loss,
    moco_v2_info_nce,
    moco_v3_info_nce,
    mpcl_total_loss,
    mvp_alignment_loss,
    projector_contrastive_regularization,
    weighted_asymmetric_loss,
)

F64 = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def _check(impl: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor], inputs: dict,
           with_grad: tuple[str, ...], without_grad: tuple[str, ...] = (), rtol: float = 1e-4) -> None:
    """Value and gradients of ``impl`` (float32) against ``reference`` (float64 loop) on the same inputs.

    The gradient is that of a random linear functional of the output, so every output entry counts.
    """
    f32 = {k: v.float().clone().requires_grad_(k in with_grad or k in without_grad) if torch.is_tensor(v) else v
           for k, v in inputs.items()}
    f64 = {k: v.to(F64).clone().requires_grad_(k in with_grad) if torch.is_tensor(v) else v
           for k, v in inputs.items()}
    out, ref = impl(**f32), reference(**f64)
    weights = _rand(*ref.shape, seed=99).to(F64) if ref.dim() else torch.ones((), dtype=F64)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=1e-6)
    (out * weights.float()).sum().backward()
    (ref * weights).sum().backward()
    for name in with_grad:
        assert f32[name].grad is not None, f"{name} received no gradient"
        assert f32[name].grad.abs().sum() > 0, f"{name} received an all-zero gradient"
        torch.testing.assert_close(f32[name].grad.double(), f64[name].grad, rtol=rtol, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    for name in without_grad:
        grad = f32[name].grad
        assert grad is None or not grad.any(), f"{name} is a target but received a gradient"


# ---------------------------------------------------------------------- MoCo v2 / v3 InfoNCE (MPCL Eq. 1)
def _moco_v2_reference(q, k, queue_keys, temperature):
    """mean_i -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.n_j/tau)) ), q and k normalised."""
    losses = []
    for i in range(q.shape[0]):
        qi, ki = _unit(q[i]), _unit(k[i].detach())
        positive = torch.exp(qi @ ki / temperature)
        negatives = sum(torch.exp(qi @ n / temperature) for n in queue_keys.detach())
        losses.append(-torch.log(positive / (positive + negatives)))
    return torch.stack(losses).mean()


def _moco_v3_reference(q, k, temperature):
    """2 tau * mean_i -log( exp(q_i.k_i/tau) / sum_j exp(q_i.k_j/tau) ) over the in-batch keys."""
    losses = []
    for i in range(q.shape[0]):
        qi = _unit(q[i])
        logits = [qi @ _unit(k[j].detach()) / temperature for j in range(k.shape[0])]
        losses.append(-(logits[i] - torch.logsumexp(torch.stack(logits), dim=0)))
    return 2 * temperature * torch.stack(losses).mean()


@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_moco_v2_gradient_reaches_queries_only(tau):
    queue = torch.nn.functional.normalize(_rand(9, 6, seed=3), dim=1)
    inputs = {"q": _rand(5, 6, seed=1), "k": _rand(5, 6, seed=2), "queue_keys": queue, "temperature": tau}
    _check(lambda **a: moco_v2_info_nce(**a)[0], _moco_v2_reference, inputs,
           with_grad=("q",), without_grad=("k", "queue_keys"))


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_moco_v3_gradient_reaches_queries_only(tau):
    inputs = {"q": _rand(5, 6, seed=4), "k": _rand(5, 6, seed=5), "temperature": tau}
    _check(lambda **a: moco_v3_info_nce(**a)[0], _moco_v3_reference, inputs, with_grad=("q",),
           without_grad=("k",))


# ---------------------------------------------------------------------- MPCL Eq. 2 and Eq. 4
def _pcr_reference(z):
    num_proj, batch = z.shape[:2]
    out = []
    for m in range(num_proj):
        per_sample = [sum(_cos(z[m, b], z[other, b]) for other in range(num_proj) if other != m) / (num_proj - 1)
                      for b in range(batch)]
        out.append(torch.stack(per_sample).mean())
    return torch.stack(out)


def test_pcr_gradient_matches_the_loop_over_eq2():
    _check(projector_contrastive_regularization, _pcr_reference, {"z": _rand(3, 4, 5, seed=6)}, with_grad=("z",))


def _total_reference(losses, pcr, weights, lam):
    num_proj = losses.shape[0]
    return sum(weights[m].detach() * losses[m] + lam * pcr[m] for m in range(num_proj)) / num_proj


def test_mpcl_total_loss_gradient_flows_to_losses_and_pcr_not_to_the_ptb_weights():
    inputs = {"losses": _rand(4, seed=7).abs() + 1, "pcr": _rand(4, seed=8), "weights": _rand(4, seed=9).softmax(0),
              "lam": 0.3}
    _check(mpcl_total_loss, _total_reference, inputs, with_grad=("losses", "pcr"), without_grad=("weights",))


# ---------------------------------------------------------------------- HVP-MTL Eq. 1 (weighted ASL)
def _asl_reference(logits, targets, eta, gamma_pos, gamma_neg, eps):
    total = 0.0
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            p = 1 / (1 + torch.exp(-logits[b, c]))
            y = targets[b, c]
            total = total - (y * eta * (1 - p) ** gamma_pos * torch.log(torch.clamp(p, min=eps))
                             + (1 - y) * p**gamma_neg * torch.log(torch.clamp(1 - p, min=eps)))
    return total / logits.shape[0]


@pytest.mark.parametrize("eta,gamma_pos,gamma_neg", [(10.0, 4.0, 1.0), (1.0, 0.0, 0.0), (2.0, 1.0, 3.0)])
def test_asl_gradient_matches_the_loop_over_eq1(eta, gamma_pos, gamma_neg):
    targets = (_rand(3, 5, seed=11) > 0).float()
    inputs = {"logits": 2 * _rand(3, 5, seed=10), "targets": targets, "eta": eta, "gamma_pos": gamma_pos,
              "gamma_neg": gamma_neg, "eps": 1e-8}
    _check(weighted_asymmetric_loss, _asl_reference, inputs, with_grad=("logits",))


# ---------------------------------------------------------------------- SimMIM L1 (HVP-MTL Eq. 4)
def _masked_l1_reference(pred, target, mask):
    total, count = 0.0, 0.0
    for b in range(pred.shape[0]):
        for y in range(pred.shape[2]):
            for x in range(pred.shape[3]):
                if mask[b, 0, y, x] > 0:
                    count += pred.shape[1]
                    for c in range(pred.shape[1]):
                        total = total + torch.abs(pred[b, c, y, x] - target[b, c, y, x])
    return total / count


def test_masked_l1_gradient_reaches_masked_predictions_only():
    mask = (_rand(2, 1, 4, 4, seed=14) > 0).float()
    inputs = {"pred": _rand(2, 3, 4, 4, seed=12), "target": _rand(2, 3, 4, 4, seed=13), "mask": mask}
    _check(masked_l1_loss, _masked_l1_reference, inputs, with_grad=("pred",))
    pred = inputs["pred"].clone().requires_grad_(True)
    masked_l1_loss(pred, inputs["target"], mask).backward()
    assert not pred.grad[(mask == 0).expand_as(pred)].any()  # unmasked pixels carry no loss


# ---------------------------------------------------------------------- MVP Eq. 9
def _mvp_reference(pred, target, mask=None):
    per_image = []
    for b in range(pred.shape[0]):
        cosines = [_cos(pred[b, 0], target[b, 0])]
        for m in range(1, pred.shape[1]):
            if mask is None or mask[b, m - 1]:
                cosines.append(_cos(pred[b, m], target[b, m]))
        per_image.append(-sum(cosines) / len(cosines))
    return torch.stack(per_image).mean()


@pytest.mark.parametrize("masked", [False, True])
def test_mvp_alignment_gradient_matches_the_loop_over_eq9(masked):
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]]) if masked else None
    inputs = {"pred": _rand(2, 5, 6, seed=15), "target": _rand(2, 5, 6, seed=16), "mask": mask}
    _check(mvp_alignment_loss, _mvp_reference, inputs, with_grad=("pred",))


def test_reference_helpers_are_what_they_say():
    """The loop references themselves, on inputs with a known answer."""
    v = torch.tensor([3.0, 4.0], dtype=F64)
    assert float(_cos(v, 2 * v)) == pytest.approx(1.0) and float(_cos(v, torch.tensor([-4.0, 3.0]))) == 0.0
    z = torch.stack([v.expand(2, 2), (-v).expand(2, 2)])  # two projectors pointing in opposite directions
    assert _pcr_reference(z).tolist() == pytest.approx([-1.0, -1.0])
    q = torch.eye(2, dtype=F64)
    assert float(_moco_v3_reference(q, q, 1.0)) == pytest.approx(2 * math.log(1 + math.exp(-1)))
