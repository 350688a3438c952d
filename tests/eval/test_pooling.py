"""Feature pooling (``ssl_zoo.eval.pooling``): GAP, GMP and GAMP on hand-made maps and random ones, errors."""

import pytest
import torch

from ssl_zoo.eval.pooling import FeaturePooling, gamp, gap, gmp, pool_map


def test_pooling_on_hand_made_map():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 10.0]])  # mean 4, max 10
    x[0, 1] = torch.tensor([[-1.0, -1.0], [-1.0, -5.0]])  # mean -2, max -1
    assert gap(x).tolist() == [[4.0, -2.0]]
    assert gmp(x).tolist() == [[10.0, -1.0]]
    assert gamp(x).tolist() == [[7.0, -1.5]]


def test_gamp_is_mean_of_gap_and_gmp_on_random_maps():
    x = torch.randn(3, 5, 4, 6)
    flat = x.flatten(2)
    torch.testing.assert_close(gamp(x), (flat.mean(-1) + flat.max(-1).values) / 2)
    for name, fn in (("gap", gap), ("gmp", gmp), ("gamp", gamp)):
        torch.testing.assert_close(pool_map(x, name), fn(x))
        torch.testing.assert_close(FeaturePooling(name)(x), fn(x))


def test_pooling_rejects_unknown_names_and_shapes():
    with pytest.raises(ValueError, match="gap, gmp, gamp"):
        pool_map(torch.zeros(1, 1, 1, 1), "avg")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        gamp(torch.zeros(2, 3))
