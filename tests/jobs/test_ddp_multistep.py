"""Several training steps in 2 gloo processes equal one process on the concatenated batches.

One step (``tests/jobs/test_ddp_every_method.py``) checks losses and gradients; what carries over from step to step can
only go wrong over several: MoCo v2's per-projector queues (each rank must enqueue the keys of both ranks, in
rank order), the EMA teachers (every rank must average the same student), and PTB's accuracy counters and
the weights they give at the epoch end. Each method runs 3 optimiser steps (SGD inside
``DistributedDataParallel``, EMA update after each step, PTB closed after the last), then every parameter and
buffer of the 2-process run must equal the single process's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.ddp_utils import ddp_average_step, run_distributed
from tests.jobs.test_ddp_every_method import METHODS, MPCL_CLASSES, WORLD, global_batch

MULTISTEP_METHODS = ("mpcl_mocov2", "mpcl_mocov3", "hvp_mtl")
STEPS = 3


def _step_batch(method: str, step: int) -> dict[str, torch.Tensor]:
    """A different global batch each step: the method's batch rotated by ``step`` images.

    MoCo's two views are made close (the second is the first plus a little noise), so that each query's
    positive wins by a clear margin and the contrastive accuracies PTB counts are not decided by round-off
    between near-equal logits.
    """
    batch = {k: v.roll(step, dims=0) for k, v in global_batch(method).items()}
    if method.startswith("mpcl"):
        views = batch["views"].clone()
        noise = torch.randn(views[:, 1].shape, generator=torch.Generator().manual_seed(step))
        views[:, 1] = views[:, 0] + 0.1 * noise
        batch["views"] = views
    return batch


def _train(model, batches: list[dict], step_fn) -> dict[str, Any]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for batch_idx, batch in enumerate(batches):
        step_fn(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_train_batch_end(None, batch, batch_idx)  # the EMA teachers follow the stepped student
    if isinstance(model, MPCL_CLASSES):
        model.on_train_epoch_end()  # PTB: the epoch's accuracies give the next epoch's weights
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _single_step(model, batch) -> None:
    model.training_step(batch, 0).backward()


def _per_rank(rank: int, world_size: int, batches: dict[str, list[dict]]) -> dict[str, Any]:
    return {method: _train(METHODS[method](), batches[method],
                           lambda model, batch: ddp_average_step(model, batch, rank, world_size))
            for method in MULTISTEP_METHODS}


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], dict]:
    batches = {m: [_step_batch(m, s) for s in range(STEPS)] for m in MULTISTEP_METHODS}
    per_rank = run_distributed(_per_rank, world_size=WORLD, batches=batches)
    single = {m: _train(METHODS[m](), batches[m], _single_step) for m in MULTISTEP_METHODS}
    return per_rank, single


@pytest.mark.distributed
@pytest.mark.parametrize("method", MULTISTEP_METHODS)
def test_state_after_several_steps_matches_one_process(runs, method):
    per_rank, single = runs
    ref = single[method]
    initial = METHODS[method]().state_dict()
    moved = [k for k, v in ref.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert any(k.startswith("teacher_") for k in moved), "the EMA teachers did not move"
    if method == "mpcl_mocov2":
        assert any(k.startswith("queues.") and k.endswith(".keys") for k in moved)
    for rank, got in enumerate(per_rank):
        state = got[method]
        assert state.keys() == ref.keys()
        for key, value in ref.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=key, r=rank: f"rank {r}, {k}: {m}")


@pytest.mark.distributed
def test_ptb_weights_after_several_steps_are_those_of_the_global_accuracy(runs):
    per_rank, single = runs
    for method in ("mpcl_mocov2", "mpcl_mocov3"):
        ref = single[method]
        assert ref["mpcl_loss.ptb.count"] == 0 and ref["mpcl_loss.ptb.last_acc"].gt(0).any()  # epoch closed
        for got in per_rank:
            torch.testing.assert_close(got[method]["mpcl_loss.ptb.weight"], ref["mpcl_loss.ptb.weight"])
