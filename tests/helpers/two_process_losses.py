"""The losses and collectives in 2 gloo processes, each holding half of a batch, and in one process holding the
whole batch: every check is computed in one spawn per test session (the ``two_process_losses`` fixture of
``tests/conftest.py``), and the tests of each loss compare its entries.

DDP conventions emulated here: the reported loss is the mean of the ranks' losses, and parameter
gradients are averaged over ranks. A shared linear layer ``z = x W^T + b`` in front of each loss
stands in for the network, so the averaged parameter gradients are compared directly; the
gradient w.r.t. a rank's local ``z`` divided by the world size is compared with the single-process
gradient of the same rows (that is what the averaging applies to it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ssl_zoo.losses import (
    ImageAwareContrastiveLoss,
    KeyQueue,
    SupConLoss,
    moco_v3_info_nce,
    sinkhorn_knopp,
)
from ssl_zoo.utils import distributed as D
from tests.helpers.ddp_utils import run_distributed

WORLD = 2
N_LOCAL = 6
D_IN, D_OUT = 5, 4
# Positives inside a rank, across ranks, and singletons; rank 0 has 4 anchors with a positive,
# rank 1 has 2, so a per-rank mean would weight the ranks wrongly.
IDS = torch.tensor([0, 1, 2, 3, 0, 5, 1, 2, 6, 7, 9, 4])
QUEUE_DIM, QUEUE_SIZE, QUEUE_SEED = 3, 10, 7


def make_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return {
        "x": torch.randn(WORLD * N_LOCAL, D_IN, generator=g),
        "x_k": torch.randn(WORLD * N_LOCAL, D_IN, generator=g),
        "lin_state": lin.state_dict(),
        "scores": torch.randn(WORLD * N_LOCAL, 5, generator=g),
        "queue_keys": torch.randn(2, WORLD * 3, QUEUE_DIM, generator=g),  # two enqueue calls
    }


def _step(
    loss_fn: Callable[[Tensor, slice], Tensor], x: Tensor, lin_state: dict[str, Tensor], rows: slice
) -> dict[str, Any]:
    """Forward the given rows through the shared layer, backward the loss, DDP-average the grads."""
    lin = nn.Linear(D_IN, D_OUT)
    lin.load_state_dict(lin_state)
    z = lin(x[rows])
    z.retain_grad()
    loss = loss_fn(z, rows)
    loss.backward()
    out = {"loss": loss.detach().clone(), "z_grad": z.grad.clone()}
    out["param_grads"] = [p.grad.clone() for p in lin.parameters()]
    if D.world_size() > 1:
        # What DDP does: mean of the losses for logging, mean of the parameter gradients.
        out["loss_mean"] = D.all_reduce_sum(out["loss"]) / D.world_size()
        out["param_grads"] = [D.all_reduce_sum(g) / D.world_size() for g in out["param_grads"]]
    return out


def _checks(rank: int, world_size: int, inputs: dict[str, Any], local: bool) -> dict[str, Any]:
    """All checks; ``local=False`` runs on one process with the whole batch as the reference."""
    n = N_LOCAL if local else WORLD * N_LOCAL
    rows = slice(rank * n, (rank + 1) * n)
    x, lin_state = inputs["x"], inputs["lin_state"]
    lin = nn.Linear(D_IN, D_OUT)
    lin.load_state_dict(lin_state)
    res: dict[str, Any] = {"world_size": D.world_size(), "rank": D.rank()}

    for tau in (0.1, 0.01):
        for name, loss_cls in (("ia", ImageAwareContrastiveLoss), ("sup", SupConLoss)):
            loss_fn = loss_cls(temperature=tau)
            res[f"{name}_{tau}"] = _step(lambda z, r, f=loss_fn: f(z, IDS[r]), x, lin_state, rows)
    # Without gathering, each rank only sees its own rows.
    ia_local = ImageAwareContrastiveLoss(gather_distributed=False)
    res["ia_local"] = ia_local(lin(x[rows]), IDS[rows]).detach()

    with torch.no_grad():
        k = lin(inputs["x_k"][rows])
    res["moco_v3"] = _step(lambda z, r: moco_v3_info_nce(z, k)[0], x, lin_state, rows)
    res["moco_v3_acc"] = moco_v3_info_nce(lin(x[rows]), k)[1]

    res["codes"] = sinkhorn_knopp(inputs["scores"][rows])
    res["codes_extreme"] = sinkhorn_knopp(inputs["scores"][rows] * 1e3, iterations=5)

    torch.manual_seed(QUEUE_SEED)  # identical initial keys on every rank
    queue = KeyQueue(QUEUE_DIM, size=QUEUE_SIZE)
    res["queue_init"] = queue.keys.clone()
    for batch in inputs["queue_keys"]:
        queue.enqueue(batch[rank * 3 : (rank + 1) * 3] if local else batch)
    res["queue_keys"] = queue.keys.clone()
    res["queue_ptr"] = int(queue.ptr)

    # The bare collectives.
    v = torch.arange(3.0) + 10 * rank
    res["gather"] = D.gather_no_grad(v)
    res["sum"] = D.all_reduce_sum(v)
    res["max"] = D.all_reduce_max(v)
    vg = v.clone().requires_grad_(True)
    (D.gather(vg) * torch.arange(3.0 * world_size)).sum().backward()
    res["gather_grad"] = vg.grad
    return res


def _distributed_checks(rank: int, world_size: int, inputs: dict[str, Any]) -> dict[str, Any]:
    return _checks(rank, world_size, inputs, local=True)


def run_two_processes() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What each of 2 gloo ranks computes on its half of the batch, and one process on the whole batch."""
    inputs = make_inputs()
    per_rank = run_distributed(_distributed_checks, world_size=WORLD, inputs=inputs)
    single = _checks(0, 1, inputs, local=False)
    return per_rank, single


def close_across_ranks(a: Tensor, b: Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def assert_loss_and_gradients_match_single_process(per_rank: list[dict[str, Any]], single: dict[str, Any],
                                                   key: str) -> None:
    """The ranks' mean loss and averaged parameter gradients equal one process's on the whole batch, and each
    rank's gradient of its own embeddings, divided by the world size, equals the single process's on those rows."""
    ref = single[key]
    for r in per_rank:
        close_across_ranks(r[key]["loss_mean"], ref["loss"])
        for g, g_ref in zip(r[key]["param_grads"], ref["param_grads"], strict=True):
            close_across_ranks(g, g_ref)
    z_grad = torch.cat([r[key]["z_grad"] for r in per_rank]) / WORLD
    close_across_ranks(z_grad, ref["z_grad"])
    assert ref["z_grad"].abs().sum() > 0
