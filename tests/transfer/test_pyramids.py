"""Feature pyramids (``ssl_zoo.transfer.pyramids``): every backbone family gives the strides the heads expect."""

import pytest
import torch

from ssl_zoo.models.backbones import Backbone
from ssl_zoo.transfer.pyramids import (
    build_detection_body,
    build_segmentation_levels,
    dense_model_kwargs,
    measured_strides,
)

TINY_SWIN = {"img_size": 64, "model_kwargs": {"window_size": 4, "depths": [1, 1, 1, 1], "embed_dim": 24,
                                              "num_heads": [1, 1, 1, 1], **dense_model_kwargs("swin")}}


TINY_VIT = {"img_size": 64, "model_kwargs": {"depth": 4, **dense_model_kwargs("vit")}}


@pytest.mark.parametrize("family", ["resnet", "swin", "vit"])
def test_every_backbone_family_builds_pyramids_with_the_right_strides(family):
    name, kwargs = {"resnet": ("resnet18", {}), "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN),
                    "vit": ("vit_tiny_patch16_224", TINY_VIT)}[family]
    backbone = Backbone(name, **kwargs)
    size = (64, 128)  # not the pre-training size, not square
    seg = build_segmentation_levels(backbone)
    assert seg.strides == measured_strides(seg, size) == [4, 8, 16, 32]
    out = seg(torch.zeros(1, 3, *size))
    assert [m.shape[1] for m in out] == list(seg.channels)
    pyramids = {"resnet": ["fpn", "c4"], "swin": ["fpn"], "vit": ["simple_fpn"]}[family]
    for pyramid in pyramids:
        body = build_detection_body(backbone, pyramid, out_channels=32)
        expected = [16] if pyramid == "c4" else [4, 8, 16, 32, 64]
        assert body.strides == measured_strides(body, size) == expected, pyramid
        maps = body(torch.zeros(1, 3, *size))
        assert all(m.shape[1] == body.out_channels for m in maps.values())
    with pytest.raises(ValueError, match="does not fit"):
        build_detection_body(backbone, "c4" if family != "resnet" else "simple_fpn")
