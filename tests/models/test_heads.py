"""Projection heads (``ssl_zoo.models.heads``): the MLP head's layout."""

import torch

from ssl_zoo.models import MLPHead


def test_mlp_head_layout():
    head = MLPHead(8, [16, 16], 4, last_norm=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[-1].affine is False and head[0].bias is None
    moco_v2 = MLPHead(8, [16], 4, norm_layer=None)
    assert [type(m).__name__ for m in moco_v2] == ["Linear", "ReLU", "Linear"]
    assert head(torch.randn(5, 8)).shape == (5, 4)
