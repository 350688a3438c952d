"""Export a pre-trained backbone for use outside ssl_zoo.

``python -m ssl_zoo.cli.export --ckpt runs/<name>/<stamp>/checkpoints/last.ckpt --to timm|torchvision|detectron2 --out FILE [--teacher]``

Formats (the student backbone by default, the momentum / EMA teacher with ``--teacher``):

* ``timm``: the timm model's state dict; loads with ``strict=True`` into ``timm.create_model(name, num_classes=0)``
  (any family). ``FILE.safetensors`` writes safetensors, anything else ``torch.save``.
* ``torchvision``: torchvision key names. ResNet: ``torchvision.models.resnet{18,34,50,101,152}`` (timm's
  ResNet already uses torchvision's names; every key but ``fc.*`` is present, load with ``strict=False`` and
  check that only ``fc.weight``/``fc.bias`` are missing). ViT: ``torchvision.models.VisionTransformer`` of the
  same size (``vit_base_patch16_224`` -> ``vit_b_16``; all keys but ``heads.*``), with timm's fused ``qkv``
  as ``in_proj_weight``. Swin has no mapping (use ``timm``).
* ``detectron2``: ResNet in the layout of detectron2's ``tools/convert-torchvision-to-d2.py`` (``stem.conv1``,
  ``res2.0.conv1.norm``, ``res3.0.shortcut`` ...), as ``{"model": ..., "__author__": "ssl_zoo",
  "matching_heuristics": True}``: a pickle of numpy arrays for ``FILE.pkl`` (like the official script), a
  ``torch.save`` of tensors otherwise. Use it with ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (timm/torchvision
  ResNets stride in the 3x3 conv), ``INPUT.FORMAT RGB`` and ImageNet pixel mean/std in 0-255 units
  (``[123.675, 116.28, 103.53]`` / ``[58.395, 57.12, 57.375]``). ViT and Swin are written with their timm
  key names in the same wrapper: ViTDet's ``ViT`` uses timm's names, so detectron2's name-matching
  heuristics map them onto ``backbone.net.*`` (as for the MAE checkpoints ViTDet loads); a detectron2 Swin
  port must map timm's Swin names itself.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ssl_zoo.checkpoints import load_backbone
from ssl_zoo.models.backbones import Backbone

__all__ = [
    "FORMATS",
    "export_backbone",
    "export_checkpoint",
    "main",
    "timm_state_dict",
    "to_detectron2",
    "to_torchvision",
    "torchvision_model_for",
]

ExportFormat = Literal["timm", "torchvision", "detectron2"]
FORMATS: tuple[str, ...] = ("timm", "torchvision", "detectron2")
_TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_TORCHVISION_VITS = {"vit_base_patch16_224": "vit_b_16", "vit_base_patch32_224": "vit_b_32",
                     "vit_large_patch16_224": "vit_l_16", "vit_large_patch32_224": "vit_l_32",
                     "vit_huge_patch14_224": "vit_h_14"}


def timm_state_dict(backbone: Backbone) -> dict[str, Tensor]:
    """The timm model's state dict (detached, contiguous CPU copies)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- torchvision
def _vit_to_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` names -> ``torchvision.models.VisionTransformer`` names."""
    block_map = {
        "norm1": "ln_1", "norm2": "ln_2",
        "attn.qkv.weight": "self_attention.in_proj_weight", "attn.qkv.bias": "self_attention.in_proj_bias",
        "attn.proj": "self_attention.out_proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
    }
    top_map = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
               "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
               "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias"}
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if key in top_map:
            out[top_map[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            layer, rest = m.groups()
            for old, new in block_map.items():
                if rest == old or rest.startswith(old + "."):
                    out[f"encoder.layers.encoder_layer_{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"this ViT has tensors torchvision's VisionTransformer lacks ({', '.join(unmapped[:5])}): only plain "
            "ViTs (class token, qkv bias, no layer scale / register tokens / fc_norm) map to torchvision"
        )
    return out


def torchvision_model_for(backbone: Backbone) -> torch.nn.Module:
    """The torchvision model (without pretrained weights) whose keys the export targets."""
    import torchvision

    if backbone.family == "resnet":
        if backbone.name not in _TORCHVISION_RESNETS:
            raise ValueError(f"torchvision has no '{backbone.name}'; ResNets it has: {', '.join(_TORCHVISION_RESNETS)}")
        return getattr(torchvision.models, backbone.name)(weights=None)
    if backbone.family == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        m = backbone.model
        return VisionTransformer(
            image_size=int(m.patch_embed.img_size[0]), patch_size=backbone.patch_size, num_layers=len(m.blocks),
            num_heads=int(m.blocks[0].attn.num_heads), hidden_dim=int(m.embed_dim),
            mlp_dim=int(m.blocks[0].mlp.fc1.out_features),
        )
    raise ValueError(f"no torchvision mapping for the {backbone.family} backbone '{backbone.name}': use --to timm")


def to_torchvision(backbone: Backbone) -> dict[str, Tensor]:
    """The backbone's weights under torchvision names, checked against the torchvision model: every key of it
    except the classifier (``fc.*`` / ``heads.*``) is present with the same shape, nothing else."""
    state_dict = timm_state_dict(backbone)
    if backbone.family == "resnet":
        mapped = dict(state_dict)  # timm's ResNet keeps torchvision's names (conv1, bn1, layerN.i.downsample.0 ...)
    elif backbone.family == "vit":
        mapped = _vit_to_torchvision(state_dict)
    else:
        raise ValueError(f"no torchvision mapping for the {backbone.family} backbone '{backbone.name}': use --to timm")
    target = torchvision_model_for(backbone).state_dict()
    classifier = ("fc.", "heads.")
    expected = {k for k in target if not k.startswith(classifier)}
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    shapes = [k for k in expected & set(mapped) if target[k].shape != mapped[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"'{backbone.name}' does not map onto torchvision's model: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, shape mismatches {shapes[:4]}"
        )
    return mapped


# ---------------------------------------------------------------------------------------------- detectron2
def _resnet_to_detectron2_key(key: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key, as ``convert-torchvision-to-d2.py`` renames them."""
    if "layer" not in key:
        key = "stem." + key  # conv1 / bn1 of the stem
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def to_detectron2(backbone: Backbone) -> dict:
    """``{"model": weights, "__author__": "ssl_zoo", "matching_heuristics": True}`` (see the module docstring).

    ResNet weights take detectron2's names; BatchNorm ``num_batches_tracked`` counters are dropped
    (detectron2's frozen BatchNorm has none). ViT / Swin weights keep timm's names.
    """
    state_dict = timm_state_dict(backbone)
    if backbone.family == "resnet":
        to_torchvision(backbone)  # the renaming below assumes torchvision's layout: check it first
        model = {_resnet_to_detectron2_key(k): v for k, v in state_dict.items()
                 if not k.endswith("num_batches_tracked")}
    else:
        model = state_dict
    return {"model": model, "__author__": "ssl_zoo", "matching_heuristics": True}


# ---------------------------------------------------------------------------------------------- files
def _save(obj, out: Path, fmt: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "detectron2" and out.suffix == ".pkl":
        numpy_obj = {**obj, "model": {k: v.numpy() for k, v in obj["model"].items()}}
        with open(out, "wb") as f:
            pickle.dump(numpy_obj, f)
    elif out.suffix == ".safetensors":
        if fmt == "detectron2":
            raise ValueError("detectron2 export writes .pkl or .pth, not .safetensors")
        from safetensors.torch import save_file

        save_file(obj, str(out))
    else:
        torch.save(obj, out)


def export_backbone(model: Backbone, to: ExportFormat, out: str | os.PathLike) -> Path:
    """Write ``model``'s weights in the ``to`` layout to ``out``."""
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got '{to}'")
    if to == "timm":
        obj = timm_state_dict(model)
    elif to == "torchvision":
        obj = to_torchvision(model)
    else:
        obj = to_detectron2(model)
    out = Path(out)
    _save(obj, out, to)
    return out


def export_checkpoint(
    ckpt: str | os.PathLike,
    to: ExportFormat,
    out: str | os.PathLike,
    teacher: bool = False,
    backbone: str | None = None,
) -> Path:
    """Load the backbone of ``ckpt`` (:func:`~ssl_zoo.checkpoints.load_backbone`) and write it as ``to``."""
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got '{to}'")
    return export_backbone(load_backbone(ckpt, backbone=backbone, teacher=teacher), to, out)


def _hint(model_name: str, to: str, out: Path) -> str:
    if to == "timm":
        return f"timm.create_model('{model_name}', num_classes=0).load_state_dict(torch.load('{out}', weights_only=True))"
    if to == "torchvision":
        tv = model_name if model_name in _TORCHVISION_RESNETS else _TORCHVISION_VITS.get(model_name, "VisionTransformer(...)")
        return f"torchvision.models.{tv}().load_state_dict(torch.load('{out}', weights_only=True), strict=False)  # all but the classifier"
    return f"MODEL.WEIGHTS {out} (detectron2)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.cli.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="pre-training checkpoint (or a timm state dict with --backbone)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="target key layout")
    parser.add_argument("--out", required=True, help="output file (.pth/.pt, .safetensors for timm, .pkl for detectron2)")
    parser.add_argument("--teacher", action="store_true", help="export the momentum/EMA teacher instead of the student")
    parser.add_argument("--backbone", default=None, help="timm name; required for a plain state dict")
    args = parser.parse_args(argv)
    try:
        model = load_backbone(args.ckpt, backbone=args.backbone, teacher=args.teacher)
        out = export_backbone(model, args.to, args.out)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the {args.to} weights of the {'teacher' if args.teacher else 'student'} {model.name} to {out}")
    print(f"load with: {_hint(model.name, args.to, out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
