"""The resumable sampler and per-sample seeds (``ssl_zoo.data.sampler``): order depends on seed and epoch only,
resumes mid-epoch, shards like ``DistributedSampler``; views depend on the sample seed only."""

from __future__ import annotations

import torch

from ssl_zoo.data.sampler import ResumableSampler, SampleKey, sample_seed, seeded_rng


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_midway():
    data = list(range(20))
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    a.set_epoch(2)
    b.set_epoch(0)
    b.set_epoch(2)  # history does not matter
    full = list(a)
    assert full == list(b) and sorted(key.index for key in full) == data
    assert all(isinstance(key, SampleKey) and (key.seed, key.epoch) == (3, 2) for key in full)
    b.set_epoch(1)
    assert [key.index for key in b] != [key.index for key in full]  # another epoch, another order

    resumed = ResumableSampler(data, seed=3)
    resumed.resume(epoch=2, start=8)
    assert list(resumed) == full[8:] and len(resumed) == 20  # the epoch keeps its nominal length
    resumed.set_epoch(2)  # Lightning's own set_epoch for the resumed epoch keeps the offset
    assert list(resumed) == full[8:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == 20  # the next epoch is complete again


def test_sampler_shards_like_distributed_sampler():
    data = list(range(10))
    shards = []
    for rank in range(3):
        sampler = ResumableSampler(data, seed=1, num_replicas=3, rank=rank)
        sampler.set_epoch(4)
        reference = torch.utils.data.DistributedSampler(data, num_replicas=3, rank=rank, seed=1)
        reference.set_epoch(4)
        shards.append([key.index for key in sampler])
        assert shards[-1] == list(reference)
    assert sorted(set(sum(shards, []))) == data


def test_views_depend_on_the_sample_seed_only_and_leave_the_global_rng_alone():
    def draw():
        return torch.rand(3), torch.randint(0, 100, (2,))

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with seeded_rng(sample_seed(0, 1, 5)):
        first = draw()
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # other RNG history
    with seeded_rng(sample_seed(0, 1, 5)):
        again = draw()
    with seeded_rng(sample_seed(0, 2, 5)):
        other_epoch = draw()
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], other_epoch[0])
