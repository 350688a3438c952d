"""PTB's state (MPCL §III-C, Eq. 3): per-epoch accuracy counts and the weights they give the next epoch.

:class:`ProjectorTrainingBalance` against a brute-force computation of "the one epoch mean accuracy of m-th
projector" and Eq. 3 (float64, loop by loop), its loss scales, its buffers across a resume, and its counts over two
gloo processes against one process on the concatenated steps; the function ``ptb_weights`` (Eq. 3) against its
closed form. PTB inside the methods, at Lightning's epoch boundary, in tests/methods/test_mpcl.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_zoo.losses import (
    ProjectorTrainingBalance,
    ptb_weights,
)
from tests.helpers.ddp_utils import run_distributed
from tests.helpers.loss_checks import close

EPS = 0.5


def _steps(seed: int, num_steps: int = 5, num_projectors: int = 4) -> list[tuple[torch.Tensor, int]]:
    """(accuracy of each projector, batch size) per step: exact fractions of the step's queries."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(num_steps):
        batch = int(torch.randint(3, 17, (1,), generator=g))
        correct = torch.randint(0, batch + 1, (num_projectors,), generator=g)
        steps.append((correct.float() / batch, batch))
    return steps


def _brute_force_weights(steps: list[tuple[torch.Tensor, int]], epsilon: float) -> tuple[list[float], list[float]]:
    """acc_m = correct queries / queries over the epoch; w_m = exp((1 - acc_m)/eps) / sum_k exp((1 - acc_k)/eps)."""
    num_projectors = len(steps[0][0])
    queries = sum(batch for _, batch in steps)
    acc = [sum(float(a[m]) * batch for a, batch in steps) / queries for m in range(num_projectors)]
    exps = [math.exp((1 - a) / epsilon) for a in acc]
    return acc, [e / sum(exps) for e in exps]


def test_close_epoch_gives_eq3_of_the_epochs_mean_accuracy():
    ptb = ProjectorTrainingBalance(4, epsilon=EPS)
    torch.testing.assert_close(ptb.loss_weights(), torch.ones(4))  # before the first epoch: w_m = 1
    first, second = _steps(seed=0), _steps(seed=1, num_steps=3)
    for acc, batch in first:
        ptb.update(acc, batch)
    torch.testing.assert_close(ptb.loss_weights(), torch.ones(4))  # mid-epoch: unchanged
    ptb.close_epoch()
    acc, weights = _brute_force_weights(first, EPS)
    torch.testing.assert_close(ptb.last_acc, torch.tensor(acc), rtol=1e-6, atol=0)
    torch.testing.assert_close(ptb.weight, torch.tensor(weights), rtol=1e-6, atol=0)  # the buffer is Eq. 3
    torch.testing.assert_close(ptb.loss_weights(), 4 * torch.tensor(weights), rtol=1e-6, atol=0)
    assert ptb.count.item() == 0 and not ptb.correct.any()
    # The next epoch's weights come from that epoch alone.
    for acc, batch in second:
        ptb.update(acc, batch)
    ptb.close_epoch()
    torch.testing.assert_close(ptb.weight, torch.tensor(_brute_force_weights(second, EPS)[1]), rtol=1e-6, atol=0)


def test_update_returns_the_steps_accuracy_and_counts_queries():
    ptb = ProjectorTrainingBalance(3)
    acc = torch.tensor([0.5, 0.25, 1.0])
    torch.testing.assert_close(ptb.update(acc, 8), acc)
    ptb.update(torch.tensor([0.0, 1.0, 0.5]), 4)
    torch.testing.assert_close(ptb.correct, torch.tensor([4.0, 6.0, 10.0]))
    assert ptb.count.item() == 12


def test_scales_disabled_ptb_and_empty_epochs():
    steps = _steps(seed=2, num_projectors=3)
    _, weights = _brute_force_weights(steps, 0.2)
    literal, off = ProjectorTrainingBalance(3, 0.2, scale="literal"), ProjectorTrainingBalance(3, 0.2, enabled=False)
    for ptb in (literal, off):
        for acc, batch in steps:
            ptb.update(acc, batch)
        ptb.close_epoch()
    torch.testing.assert_close(literal.loss_weights(), torch.tensor(weights), rtol=1e-6, atol=0)  # Eq. 3 as printed
    torch.testing.assert_close(off.loss_weights(), torch.ones(3))  # PTB off: w_m = 1 ...
    assert off.last_acc.gt(0).any()  # ... the accuracies still tracked for the logs
    before = literal.weight.clone()
    literal.close_epoch()  # an epoch without queries changes nothing
    torch.testing.assert_close(literal.weight, before)
    # equal accuracies: Mp * softmax = 1, exactly the PTB-off loss scale
    equal = ProjectorTrainingBalance(5)
    equal.update(torch.full((5,), 0.3), 10)
    equal.close_epoch()
    torch.testing.assert_close(equal.loss_weights(), torch.ones(5))
    with pytest.raises(ValueError, match="epsilon"):
        ProjectorTrainingBalance(3, epsilon=0.0)
    with pytest.raises(ValueError, match="scale"):
        ProjectorTrainingBalance(3, scale="sum")


def test_discard_epoch_and_resume_from_the_buffers():
    """A run stopped mid-epoch and resumed from the state dict closes the epoch as the uninterrupted run."""
    steps = _steps(seed=3)
    whole, first_half = ProjectorTrainingBalance(4), ProjectorTrainingBalance(4)
    for acc, batch in steps:
        whole.update(acc, batch)
    for acc, batch in steps[:2]:
        first_half.update(acc, batch)
    resumed = ProjectorTrainingBalance(4)
    resumed.load_state_dict(first_half.state_dict())
    for acc, batch in steps[2:]:
        resumed.update(acc, batch)
    whole.close_epoch()
    resumed.close_epoch()
    for name, buffer in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], buffer), name
    # a cut-short epoch that is not continued is dropped, not mixed into the next
    assert first_half.discard_epoch() == sum(batch for _, batch in steps[:2])
    assert first_half.count.item() == 0 and not first_half.correct.any()


def _per_rank(rank: int, world_size: int, steps: list) -> dict[str, torch.Tensor]:
    ptb = ProjectorTrainingBalance(4)
    step_accs = [ptb.update(*steps[rank][i]) for i in range(len(steps[rank]))]
    ptb.close_epoch()
    return {"step_accs": torch.stack(step_accs), **{k: v.clone() for k, v in ptb.state_dict().items()}}


@pytest.mark.distributed
def test_two_processes_count_the_global_batch():
    """Each rank adds its own steps; both end with the counts and weights of all ranks' queries together."""
    steps = [_steps(seed=10), _steps(seed=11)]
    per_rank = run_distributed(_per_rank, world_size=2, steps=steps)
    _, weights = _brute_force_weights(steps[0] + steps[1], EPS)
    for got in per_rank:
        torch.testing.assert_close(got["weight"], torch.tensor(weights), rtol=1e-6, atol=0)
        for i, ((acc_0, b_0), (acc_1, b_1)) in enumerate(zip(*steps, strict=True)):
            torch.testing.assert_close(got["step_accs"][i], (acc_0 * b_0 + acc_1 * b_1) / (b_0 + b_1))
    for name in per_rank[0]:
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name  # every rank holds the same buffers


def test_ptb_weights():
    acc = torch.tensor([0.9, 0.5, 0.7, 0.2])
    for eps in (0.5, 0.1, 2.0):
        w = ptb_weights(acc, epsilon=eps)
        raw = [math.exp((1 - a) / eps) for a in acc.tolist()]
        close(w, np.array(raw) / sum(raw))
        close(w.sum(), 1.0)
        # Lower accuracy, larger weight.
        assert torch.equal(torch.argsort(w), torch.argsort(-acc))
    close(ptb_weights(torch.full((3,), 0.4)), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="acc"):
        ptb_weights(torch.tensor([45.0, 60.0]))
    with pytest.raises(ValueError, match="epsilon"):
        ptb_weights(acc, epsilon=0.0)
