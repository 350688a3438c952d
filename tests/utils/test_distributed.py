"""``ssl_zoo.utils.distributed``: identity on one process (where lightly's gathers need a process group), and the
bare collectives in 2 gloo processes: gather with and without gradient, sum and max."""

from __future__ import annotations

import pytest
import torch
from lightly.models.utils import concat_all_gather
from lightly.utils import dist as lightly_dist

from ssl_zoo.utils import distributed as D
from tests.helpers.two_process_losses import WORLD, close_across_ranks


def test_distributed_utilities_are_identity_on_one_process():
    assert D.world_size() == 1 and D.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather(x) is x
    for fn in (D.gather_no_grad, D.all_reduce_sum, D.all_reduce_max):
        out = fn(x)
        assert torch.equal(out, x) and not out.requires_grad
    # What ours adds to lightly's gathers: they need a process group (and return one tensor per rank).
    for lightly_gather in (lightly_dist.gather, concat_all_gather):
        with pytest.raises(ValueError, match="process group"):
            lightly_gather(x)


@pytest.mark.distributed
def test_process_group_queries(two_process_losses):
    per_rank, single = two_process_losses
    assert [r["rank"] for r in per_rank] == [0, 1]
    assert all(r["world_size"] == WORLD for r in per_rank)
    assert single["world_size"] == 1 and single["rank"] == 0


@pytest.mark.distributed
def test_collectives(two_process_losses):
    per_rank, _ = two_process_losses
    for r in per_rank:
        close_across_ranks(r["gather"], torch.tensor([0.0, 1, 2, 10, 11, 12]))
        close_across_ranks(r["sum"], torch.tensor([10.0, 12, 14]))
        close_across_ranks(r["max"], torch.tensor([10.0, 11, 12]))
    # d/dv_r of sum_r' sum_j c_j * gather(v)_j, summed over both ranks' losses: 2 * c[rank rows].
    close_across_ranks(per_rank[0]["gather_grad"], 2 * torch.tensor([0.0, 1, 2]))
    close_across_ranks(per_rank[1]["gather_grad"], 2 * torch.tensor([3.0, 4, 5]))
