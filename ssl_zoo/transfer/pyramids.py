"""Multi-level features of an ssl_zoo :class:`~ssl_zoo.models.backbones.Backbone` for dense prediction.

Every backbone family gives the detection and segmentation heads a pyramid of maps at strides 4-32 (64 with
the detection FPN's extra level), read through timm's public ``forward_intermediates``:

=================  =============================================================  ==========================
family             levels                                                          reference
=================  =============================================================  ==========================
ResNet             C2..C5 (``layer1..4``), strides 4, 8, 16, 32                   detectron2 / torchvision
ResNet, C4         C4 only (stride 16); ``layer4`` (res5) becomes the RoI head     MoCo's detectron2 R50-C4
Swin               stages 1-4 plus one LayerNorm per output, strides 4..32         Swin's mmdet/mmseg backbone
ViT/BEiT, detect.  last block (stride 16) -> simple feature pyramid, 4..32 (+64)   ViTDet §3 / Fig. 2 (c)
ViT/BEiT, segm.    blocks ``out_indices`` -> 2 deconvs / 1 deconv / id / max pool  BEiT's semantic-seg backbone
=================  =============================================================  ==========================

Detection bodies (:func:`build_detection_body`) return torchvision's ``OrderedDict`` of maps named ``"0"``,
``"1"``, ... and carry ``out_channels``, the interface torchvision's Faster / Mask R-CNN expect of a backbone;
segmentation levels (:func:`build_segmentation_levels`) return a list of maps and carry ``channels``.
Both carry ``strides``, the input pixels per cell of each map. The ssl_zoo backbone is kept whole under
``.backbone`` so that its parameter names stay those of the pre-training checkpoint (the layer-wise lr decay
reads them).

Departures from the references, all for lack of the reference backbones' own code paths in timm: ViTDet uses
window attention in most blocks and relative position biases; here the pre-trained ViT keeps global attention
and absolute position embeddings (interpolated to the input grid by timm's ``dynamic_img_size``). A BEiT
keeps its relative position biases (interpolated to the window of its ``img_size`` at load, as BEiT's
segmentation code does): its window is fixed, so :func:`token_maps` pads each input at the bottom / right to
that size and crops the maps back, as ViTDet pads every image to one square.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ssl_zoo.models.backbones import Backbone

__all__ = [
    "BEiTNeck",
    "DetectionBody",
    "LayerNorm2d",
    "ResNetC4Body",
    "ResNetLevels",
    "SimpleFeaturePyramid",
    "SwinLevels",
    "ViTLevels",
    "build_detection_body",
    "build_segmentation_levels",
    "default_vit_out_indices",
    "dense_model_kwargs",
    "freeze_resnet_stages",
    "freeze_unused_final_norm",
    "measured_strides",
    "resolve_pyramid",
    "token_maps",
]

DetectionPyramid = Literal["fpn", "c4", "simple_fpn", "auto"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's "LN" in the simple pyramid and its heads)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def dense_model_kwargs(family: str) -> dict:
    """timm options that let a ViT / Swin take inputs of any size (detection resizes every image differently).

    ViT: position embeddings interpolated to the input grid at each forward; Swin: inputs padded to whole
    windows and the shifted-window masks built for the input. The state dict is unchanged, so a pre-training
    checkpoint loads as it is.
    """
    if family == "vit":
        return {"dynamic_img_size": True}
    if family == "swin":
        return {"strict_img_size": False, "dynamic_img_size": True}
    return {}  # ResNets take any size; a BEiT's window is fixed (token_maps pads to it)


def token_maps(backbone: Backbone, x: Tensor, indices: int | Sequence[int]) -> list[Tensor]:
    """timm's ``forward_intermediates`` of a ViT / BEiT as maps ``[B, D, h, w]`` (blocks without the final norm).

    A BEiT's relative position tables hold one window, so its input is zero-padded at the bottom / right to
    the size it was built for and each map cropped back to the input's cells.
    """
    if backbone.family != "beit":
        return backbone.model.forward_intermediates(x, indices=indices, intermediates_only=True)
    size = backbone.model.patch_embed.img_size
    h, w = x.shape[-2:]
    if h > size[0] or w > size[1]:
        raise ValueError(f"a {h}x{w} input does not fit the BEiT backbone built for {size[0]}x{size[1]} (its relative "
                         f"position tables hold one window): set model.init_args.img_size to at least {max(h, w)}")
    maps = backbone.model.forward_intermediates(F.pad(x, (0, size[1] - w, 0, size[0] - h)), indices=indices,
                                                intermediates_only=True)
    p = backbone.patch_size
    return [m[..., : -(-h // p), : -(-w // p)] for m in maps]


def freeze_resnet_stages(backbone: Backbone, freeze_at: int) -> None:
    """detectron2's ``FREEZE_AT``: 0 trains everything, 1 freezes the stem, ``k`` the stem and res2..res``k``."""
    if backbone.family != "resnet" or freeze_at <= 0:
        return
    m = backbone.model
    frozen = [m.conv1, m.bn1] + [getattr(m, f"layer{i}") for i in range(1, freeze_at)]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def freeze_unused_final_norm(backbone: Backbone) -> None:
    """The pyramids read ViT blocks and Swin stages before the classification model's final norm (BEiT, ViTDet
    and Swin's dense backbones have none there): that norm gets no gradient, so it is frozen, which also keeps
    DDP from waiting for its gradients."""
    for name in ("norm", "fc_norm"):
        module = getattr(backbone.model, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- levels
class ResNetLevels(nn.Module):
    """ResNet C2..C5 ``[B, C_i, H/s, W/s]`` for s = 4, 8, 16, 32."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        if backbone.family != "resnet":
            raise ValueError(f"ResNetLevels needs a ResNet, got '{backbone.name}' ({backbone.family})")
        self.backbone = backbone
        info = backbone.model.feature_info[1:]  # [stem, layer1..4] -> layer1..4
        self.channels = [int(f["num_chs"]) for f in info]
        self.strides = [int(f["reduction"]) for f in info]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.backbone.model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)


class SwinLevels(nn.Module):
    """Swin stage outputs ``[B, C*2^i, H/4/2^i, W/4/2^i]``, each through its own LayerNorm.

    Swin's detection / segmentation backbone adds one LayerNorm per output stage (``norm0..3`` of
    ``SwinTransformer`` in Swin-Transformer-Object-Detection); they are new parameters, not pre-trained.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        if backbone.family != "swin":
            raise ValueError(f"SwinLevels needs a Swin, got '{backbone.name}' ({backbone.family})")
        self.backbone = backbone
        freeze_unused_final_norm(backbone)
        info = backbone.model.feature_info
        self.channels = [int(f["num_chs"]) for f in info]
        self.strides = [int(f["reduction"]) for f in info]
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in self.channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.backbone.model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        return [norm(m) for norm, m in zip(self.norms, maps, strict=True)]


def default_vit_out_indices(depth: int) -> list[int]:
    """BEiT's blocks for the 4 levels: [3, 5, 7, 11] of 12 blocks, [7, 11, 15, 23] of 24; else evenly spaced
    (a block may serve two levels in a ViT of fewer than 4 blocks)."""
    if depth == 12:
        return [3, 5, 7, 11]
    if depth == 24:
        return [7, 11, 15, 23]
    return [max(depth * (i + 1) // 4 - 1, 0) for i in range(4)]


class ViTLevels(nn.Module):
    """Patch tokens of chosen ViT blocks as maps ``[B, D, H/p, W/p]`` (no final norm, as BEiT reads them)."""

    def __init__(self, backbone: Backbone, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        if backbone.family not in ("vit", "beit"):
            raise ValueError(f"ViTLevels needs a ViT or BEiT, got '{backbone.name}' ({backbone.family})")
        depth = len(backbone.model.blocks)
        self.out_indices = list(out_indices) if out_indices is not None else default_vit_out_indices(depth)
        bad = [i for i in self.out_indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"ViT out_indices {bad} outside the {depth} blocks of '{backbone.name}'")
        self.backbone = backbone
        freeze_unused_final_norm(backbone)
        self.channels = [backbone.num_features] * len(self.out_indices)
        self.strides = [backbone.patch_size] * len(self.out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        blocks = sorted(set(self.out_indices))
        maps = token_maps(self.backbone, x, blocks)
        return [maps[blocks.index(i)] for i in self.out_indices]


class BEiTNeck(nn.Module):
    """BEiT's 4-level neck over four stride-16 ViT maps: x4 (two 2x2 deconvs with BN + GELU between), x2
    (one deconv), x1 (identity), x0.5 (2x2 max pool) -> strides 4, 8, 16, 32, all with ``D`` channels
    (``fpn1..fpn4`` of BEiT's semantic-segmentation backbone; its BN is SyncBN under DDP)."""

    def __init__(self, levels: ViTLevels) -> None:
        super().__init__()
        if len(levels.out_indices) != 4:
            raise ValueError(f"the BEiT neck takes 4 ViT blocks, got out_indices {levels.out_indices}")
        self.levels = levels
        d, p = levels.channels[0], levels.strides[0]
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(),
                                  nn.ConvTranspose2d(d, d, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(d, d, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)
        self.channels = [d] * 4
        self.strides = [p // 4, p // 2, p, p * 2]

    @property
    def backbone(self) -> Backbone:
        return self.levels.backbone

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.levels(x)
        return [f(m) for f, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps, strict=True)]


def build_segmentation_levels(backbone: Backbone, vit_out_indices: Sequence[int] | None = None) -> nn.Module:
    """The 4 levels UperNet reads: ResNet C2..C5, Swin stages (+LN), ViT blocks through BEiT's neck."""
    if backbone.family == "resnet":
        return ResNetLevels(backbone)
    if backbone.family == "swin":
        return SwinLevels(backbone)
    return BEiTNeck(ViTLevels(backbone, vit_out_indices))


# ---------------------------------------------------------------------------------------------- detection
class DetectionBody(nn.Module):
    """Levels + FPN (torchvision's ``FeaturePyramidNetwork`` with a stride-64 max-pool level, detectron2's
    P2..P6) -> ``OrderedDict`` ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``."""

    def __init__(self, levels: nn.Module, out_channels: int = 256, norm: Literal["none", "bn"] = "none") -> None:
        super().__init__()
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(list(levels.channels), out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=nn.BatchNorm2d if norm == "bn" else None)
        self.out_channels = out_channels
        self.strides = [*levels.strides, levels.strides[-1] * 2]

    @property
    def backbone(self) -> Backbone:
        return self.levels.backbone

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.levels(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class ResNetC4Body(nn.Module):
    """R50-C4: stem + res2..res4 -> ``{"0": C4}`` at stride 16; res5 (``layer4``) runs in the RoI head
    (:class:`~ssl_zoo.transfer.detection.Res5Head`), as detectron2's ``Res5ROIHeads``."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        if backbone.family != "resnet":
            raise ValueError(f"the C4 pyramid needs a ResNet, got '{backbone.name}' ({backbone.family})")
        self.backbone = backbone
        info = backbone.model.feature_info
        self.out_channels = int(info[3]["num_chs"])
        self.strides = [int(info[3]["reduction"])]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        c4 = self.backbone.model.forward_intermediates(x, indices=[3], intermediates_only=True, stop_early=True)
        return OrderedDict([("0", c4[-1])])


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, §3 and Fig. 2 c) from the last ViT map (stride 16):
    scales 4 (2 deconvs with LN + GELU between), 2 (1 deconv), 1 (identity), 1/2 (max pool), each followed by
    a 1x1 and a 3x3 conv with LN to ``out_channels``; plus P6 by max pooling P5 -> strides 4, 8, 16, 32, 64."""

    def __init__(self, backbone: Backbone, out_channels: int = 256) -> None:
        super().__init__()
        if backbone.family not in ("vit", "beit"):
            raise ValueError(f"the simple feature pyramid needs a ViT or BEiT, got '{backbone.name}' ({backbone.family})")
        self.backbone = backbone
        freeze_unused_final_norm(backbone)
        d, p = backbone.num_features, backbone.patch_size
        stages: list[tuple[nn.Module, int]] = [
            (nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, 2), LayerNorm2d(d // 2), nn.GELU(),
                           nn.ConvTranspose2d(d // 2, d // 4, 2, 2)), d // 4),
            (nn.ConvTranspose2d(d, d // 2, 2, 2), d // 2),
            (nn.Identity(), d),
            (nn.MaxPool2d(2, 2), d),
        ]
        self.scales = nn.ModuleList(
            nn.Sequential(resample,
                          nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for resample, dim in stages
        )
        self.out_channels = out_channels
        self.strides = [p // 4, p // 2, p, p * 2, p * 4]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        last = token_maps(self.backbone, x, 1)[-1]  # [B, D, h, w]
        maps = [scale(last) for scale in self.scales]
        maps.append(nn.functional.max_pool2d(maps[-1], kernel_size=1, stride=2))  # LastLevelMaxPool: P6
        return OrderedDict((name, m) for name, m in zip(["0", "1", "2", "3", "pool"], maps, strict=True))


def resolve_pyramid(pyramid: DetectionPyramid, family: str) -> DetectionPyramid:
    """``auto``: ViTDet's simple pyramid for a ViT / BEiT, an FPN for a ResNet or a Swin; any other value unchanged."""
    if pyramid != "auto":
        return pyramid
    return "simple_fpn" if family in ("vit", "beit") else "fpn"


def build_detection_body(
    backbone: Backbone, pyramid: DetectionPyramid, out_channels: int = 256, fpn_norm: Literal["none", "bn"] = "none"
) -> nn.Module:
    """The torchvision-style backbone of a Faster / Mask R-CNN over an ssl_zoo backbone.

    ``pyramid``: ``fpn`` (ResNet or Swin levels + FPN), ``c4`` (ResNet only, res5 in the RoI head),
    ``simple_fpn`` (ViT / BEiT, ViTDet) or ``auto`` (see :func:`resolve_pyramid`).
    """
    family = backbone.family
    pyramid = resolve_pyramid(pyramid, family)
    allowed = {"fpn": ("resnet", "swin"), "c4": ("resnet",), "simple_fpn": ("vit", "beit")}
    if pyramid not in allowed:
        raise ValueError(f"model.pyramid must be one of {sorted(allowed)}, got '{pyramid}'")
    if family not in allowed[pyramid]:
        fits = [k for k, v in allowed.items() if family in v]
        raise ValueError(f"model.pyramid '{pyramid}' does not fit a {family} backbone ('{backbone.name}'); "
                         f"use {' or '.join(fits)}")
    if pyramid == "c4":
        return ResNetC4Body(backbone)
    if pyramid == "simple_fpn":
        return SimpleFeaturePyramid(backbone, out_channels)
    levels = ResNetLevels(backbone) if family == "resnet" else SwinLevels(backbone)
    return DetectionBody(levels, out_channels, fpn_norm)


@torch.no_grad()
def measured_strides(body: nn.Module, size: tuple[int, int] = (128, 192)) -> list[int]:
    """Strides of a body's outputs measured on a blank input (a check the tests and error messages use)."""
    was_training = body.training
    body.eval()
    out = body(torch.zeros(1, 3, *size))
    body.train(was_training)
    maps = list(out.values()) if isinstance(out, dict) else list(out)
    return [size[0] // m.shape[-2] for m in maps]
