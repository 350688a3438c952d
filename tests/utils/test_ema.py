"""The EMA update the momentum methods call (lightly's ``update_momentum``): MoCo Eq. 2 on the parameters, the
teacher's buffers left alone."""

from __future__ import annotations

import copy

import torch
from lightly.models.utils import update_momentum
from torch import nn

from tests.helpers.loss_checks import close


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_momentum_is_moco_eq2_on_the_parameters_only():
    """lightly's ``update_momentum(student, teacher, m)`` as the momentum methods call it: MoCo Eq. 2 on the
    parameters; the teacher's buffers (BatchNorm statistics) are left alone, as MoCo's key-encoder update
    leaves them."""
    torch.manual_seed(0)
    student, teacher = _net(), copy.deepcopy(_net()).requires_grad_(False)
    student(torch.randn(8, 3))  # changes the student's BatchNorm running statistics
    before = {n: t.clone() for n, t in teacher.state_dict().items()}
    update_momentum(student, teacher, m=0.9)
    s_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        close(p, (0.9 * before[name] + 0.1 * s_params[name].detach()).numpy(), atol=1e-7)
    s_buffers = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        assert torch.equal(buf, before[name]) and not torch.equal(buf, s_buffers[name]), name
    kept = {n: p.clone() for n, p in teacher.named_parameters()}
    update_momentum(student, teacher, m=1.0)
    assert all(torch.equal(p, kept[n]) for n, p in teacher.named_parameters())
    update_momentum(student, teacher, m=0.0)
    assert all(torch.equal(p, s_params[n]) for n, p in teacher.named_parameters())
