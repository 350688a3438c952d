"""Checkpoint -> backbone: the one entry point every evaluation protocol and the exporter use.

Two kinds of files are accepted, both read with ``torch.load(weights_only=True)`` (or safetensors), so a
checkpoint can never run code on the machine that evaluates it:

* an ssl_zoo pre-training checkpoint (a Lightning ``.ckpt``): ``state_dict`` holds the student backbone
  under ``backbone.model.<timm key>`` and, for momentum / EMA methods, the teacher under
  ``teacher_backbone.model.<timm key>``; ``hyper_parameters`` names the architecture (``backbone``) and
  its constructor arguments (``backbone_kwargs``);
* a public checkpoint of another codebase (SimSiam, MoCo v1/v2/v3, DINO, MAE, BEiT) or a plain timm /
  torchvision state dict (e.g. one written by ``python -m ssl_zoo.export --to timm``), converted to timm keys
  by :func:`ssl_zoo.eval.convert.convert_checkpoint`; the architecture must then be named with ``backbone=``.

Loading is two steps, :func:`read_backbone_weights` (file -> :class:`BackboneWeights`: a timm state dict plus
what the checkpoint records about it, through the converter for other projects' layouts) and
:func:`backbone_from_weights` (-> a strictly loaded :class:`~ssl_zoo.models.Backbone`); :func:`load_backbone`
runs both.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_zoo.eval.convert import UnknownCheckpointLayout, beit_to_vit, convert_checkpoint, is_beit_named
from ssl_zoo.models.backbones import Backbone
from ssl_zoo.utils.safe_load import NotACheckpointError, UnsafeCheckpointError, read_checkpoint

__all__ = [
    "STUDENT_PREFIX",
    "TEACHER_PREFIX",
    "BackboneWeights",
    "NotACheckpointError",
    "UnknownCheckpointLayout",
    "UnsafeCheckpointError",
    "backbone_from_weights",
    "describe_state_dict",
    "load_backbone",
    "merge_backbone_kwargs",
    "read_backbone_weights",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

STUDENT_PREFIX = "backbone.model."
TEACHER_PREFIX = "teacher_backbone.model."


@dataclass
class BackboneWeights:
    """The timm state dict of one backbone plus what the checkpoint says about its architecture."""

    state_dict: dict[str, Tensor]
    name: str | None = None  # timm model name recorded by the pre-training run, None for a plain dict
    kwargs: dict[str, Any] = field(default_factory=dict)  # Backbone(name, **kwargs) of the pre-training run
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    is_pretraining_checkpoint: bool = False
    source: str = ""  # the file, for messages
    teacher: bool = False  # the momentum / EMA teacher's weights rather than the student's

    @property
    def img_size(self) -> int | None:
        """The input side the backbone was pre-trained at, where the checkpoint tells: the backbone's own
        ``img_size`` argument (ViT / Swin), else the method's crop size (``img_size`` hyper-parameter, e.g. a
        ResNet's), else, for a plain ViT state dict, its square position-embedding grid times the patch size."""
        for value in (self.kwargs.get("img_size"), self.hyper_parameters.get("img_size")):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return _vit_img_size(self.state_dict)

    @property
    def patch_size(self) -> int | None:
        """Pixels per side of one patch embedding (ViT / Swin), None for a ResNet."""
        proj = self.state_dict.get("patch_embed.proj.weight")
        return int(proj.shape[-1]) if proj is not None and proj.dim() == 4 else None


def _vit_img_size(state_dict: Mapping[str, Tensor]) -> int | None:
    """Side of a ViT's pre-training input from its ``pos_embed`` (class token + a square grid, or the grid
    alone) and patch size; None for other architectures or grids that are not square."""
    pos, proj = state_dict.get("pos_embed"), state_dict.get("patch_embed.proj.weight")
    if pos is None or proj is None or pos.dim() != 3 or any(k.startswith("layers.") for k in state_dict):
        return None
    for prefix in (1, 0):  # 1 + k^2 is never a square, so the two readings cannot both fit
        side = math.isqrt(pos.shape[1] - prefix)
        if side > 0 and side * side == pos.shape[1] - prefix:
            return side * int(proj.shape[-1])
    return None


def _missing_checkpoint(path: str) -> OSError:
    """What to give instead of a checkpoint path that does not exist (or a run directory)."""
    if os.path.isdir(path):
        inside = [p for p in (Path(path) / "checkpoints" / "last.ckpt", Path(path) / "last.ckpt") if p.is_file()]
        hint = f"give the file inside it, {inside[0]}" if inside else "give a checkpoint file"
        return IsADirectoryError(f"checkpoint '{path}' is a directory: {hint}")
    recent = sorted(glob.glob(os.path.join("runs", "*", "*", "checkpoints", "last.ckpt")), key=os.path.getmtime)
    hint = (f"the newest here: {', '.join(reversed(recent[-3:]))}" if recent else
            "`make pretrain METHOD=<method>` writes runs/<method>/<stamp>/checkpoints/last.ckpt")
    return FileNotFoundError(f"checkpoint '{path}' does not exist ({hint})")


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_backbone_weights(ckpt: str | os.PathLike, teacher: bool = False) -> BackboneWeights:
    """Extract the student (default) or teacher backbone's timm state dict from a checkpoint file.

    Raises:
        FileNotFoundError: no such file (the message lists the newest checkpoints under ``runs/``).
        IsADirectoryError: a directory, e.g. a run directory (the message names its ``last.ckpt``).
        NotACheckpointError: a file that is not a checkpoint (a config, an image, an empty file).
        ValueError: ``teacher=True`` for a checkpoint without a teacher (an ssl_zoo method without one, or a
            public layout with one model only).
        UnknownCheckpointLayout: a file in none of the layouts :mod:`ssl_zoo.eval.convert` knows; the message
            lists its top-level keys and tensor key prefixes.
    """
    path = os.fspath(ckpt)
    if not os.path.isfile(path):
        raise _missing_checkpoint(path)
    obj = read_checkpoint(path)
    state = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else None
    if state is not None and any(k.startswith(STUDENT_PREFIX) for k in state):
        prefix = TEACHER_PREFIX if teacher else STUDENT_PREFIX
        weights = _strip_prefix(state, prefix)
        if not weights:
            prefixes = sorted({k.split(".", 1)[0] + "." for k in state})
            raise ValueError(
                f"checkpoint '{path}' has no teacher backbone (no '{TEACHER_PREFIX}*' keys; its modules are "
                f"{', '.join(prefixes)}): this method keeps no momentum/EMA teacher, evaluate with teacher=False"
            )
        hparams = dict(obj.get("hyper_parameters") or {})
        return BackboneWeights(weights, hparams.get("backbone"), dict(hparams.get("backbone_kwargs") or {}),
                               hparams, is_pretraining_checkpoint=True, source=path, teacher=teacher)
    # Any other file: a public layout (SimSiam, MoCo, DINO, MAE / BEiT, timm, torchvision) -> timm keys.
    return BackboneWeights(convert_checkpoint(obj, source=path, teacher=teacher).state_dict, source=path,
                           teacher=teacher)


_RESNET_DEPTHS = {  # (blocks per stage, bottleneck) -> timm name
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def describe_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """A short guess of the architecture a timm state dict belongs to (for error messages)."""
    keys = list(state_dict)
    if "conv1.weight" in state_dict and any(k.startswith("layer4.") for k in keys):
        blocks = tuple(
            len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)
        )
        bottleneck = any(".conv3." in k for k in keys)
        width = state_dict["conv1.weight"].shape[0]
        name = _RESNET_DEPTHS.get((blocks, bottleneck))
        return name or f"a ResNet (blocks {blocks}, {'bottleneck' if bottleneck else 'basic'}, stem {width})"
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None:
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        if any(k.startswith("layers.") for k in keys):
            depths = []
            for i in range(8):
                n = len({k.split(".")[3] for k in keys if re.match(rf"layers\.{i}\.blocks\.\d+\.", k)})
                if n:
                    depths.append(n)
            return f"a Swin (embed dim {dim}, patch {patch}, depths {tuple(depths)})"
        depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        pos = state_dict.get("pos_embed")
        size = _VIT_SIZES.get(dim)
        if any("relative_position_bias_table" in k for k in keys):  # BEiT: relative position biases
            shared = "shared" if "rel_pos_bias.relative_position_bias_table" in state_dict else "per-block"
            guess = f"beit_{size}_patch{patch}" if size and depth in (12, 24) else "a BEiT"
            return f"{guess} (embed dim {dim}, {depth} blocks, patch {patch}, {shared} relative position bias)"
        guess = f"vit_{size}_patch{patch}" if size and depth in (12, 24, 32) else "a ViT"
        grid = f", {pos.shape[1]} positions" if pos is not None else ""
        return f"{guess} (embed dim {dim}, {depth} blocks, patch {patch}{grid})"
    return f"an unknown architecture ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"


def _drop_classifier(state_dict: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Remove a classifier the backbone does not have (``fc.*``/``head.*`` of a timm model with a head)."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not classifier:
        return state_dict
    own = model.state_dict()
    heads = [k for k in state_dict if k.startswith(classifier + ".") and k not in own]
    return {k: v for k, v in state_dict.items() if k not in heads}


def _resample_pos_embed(state_dict: dict[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
    """Interpolate a ViT's absolute position embeddings to the backbone's grid (evaluation at another
    resolution than pre-training, e.g. 448 px after 224 px; bicubic, prefix tokens kept, as in timm/DeiT)."""
    pos = state_dict.get("pos_embed")
    if backbone.family != "vit" or pos is None:
        return state_dict
    target = backbone.model.pos_embed
    if pos.shape == target.shape:
        return state_dict
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(backbone.model, "no_embed_class", False) else backbone.num_prefix_tokens
    new_grid = list(backbone.model.patch_embed.grid_size)
    n_old = pos.shape[1] - prefix
    old = int(round(n_old**0.5))
    if old * old != n_old:
        return state_dict  # not a square grid: leave it to the shape check, which names the tensor
    resampled = resample_abs_pos_embed(pos, new_grid, [old, old], num_prefix_tokens=prefix)
    return {**state_dict, "pos_embed": resampled}


def _adapt_beit_layout(state_dict: dict[str, Tensor], own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map a pre-training layout onto BEiT's fine-tuning layout, as BEiT's ``run_class_finetuning.py`` does:

    * mean pooling with ``fc_norm`` (model: ``fc_norm.*``, no ``norm.*``; checkpoint: ``norm.*``, no
      ``fc_norm.*``): the pre-trained final norm is dropped and ``fc_norm`` keeps its fresh initialisation;
    * one relative position bias table per block (model: ``blocks.i.attn.relative_position_bias_table``)
      from BEiT pre-training's shared one (checkpoint: ``rel_pos_bias.relative_position_bias_table``): the
      shared table is copied into every block.

    Also drops the ``relative_position_index`` buffers that BEiT's own code saves (timm recomputes them and
    does not save them, as timm's BEiT checkpoint filter drops them).

    Returns the adapted state dict and a description of each change (empty when none applied).
    """
    changes = []
    stale = [k for k in state_dict if k.endswith("relative_position_index") and k not in own]
    if stale:
        state_dict = {k: v for k, v in state_dict.items() if k not in stale}
        changes.append(f"{len(stale)} saved relative_position_index buffers dropped (recomputed)")
    if ("fc_norm.weight" in own and "fc_norm.weight" not in state_dict
            and "norm.weight" in state_dict and "norm.weight" not in own):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("norm.")}
        state_dict.update({k: v for k, v in own.items() if k.startswith("fc_norm.")})
        changes.append("final norm dropped, fresh fc_norm after mean pooling")
    shared = "rel_pos_bias.relative_position_bias_table"
    per_block = [k for k in own if re.fullmatch(r"blocks\.\d+\.attn\.relative_position_bias_table", k)]
    if shared in state_dict and shared not in own and per_block and not any(k in state_dict for k in per_block):
        table = state_dict[shared]
        state_dict = {k: v for k, v in state_dict.items() if k != shared}
        state_dict.update({k: table.clone() for k in per_block})
        changes.append(f"shared relative position bias copied into {len(per_block)} blocks")
    return state_dict, changes


def merge_backbone_kwargs(recorded: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:class:`Backbone` arguments of the pre-training run with ``overrides`` laid over them; ``model_kwargs``
    are merged key by key, so that e.g. a fine-tuning head option keeps the recorded layer scale."""
    merged = {**recorded, **(overrides or {})}
    if isinstance(recorded.get("model_kwargs"), Mapping) and isinstance((overrides or {}).get("model_kwargs"), Mapping):
        merged["model_kwargs"] = {**recorded["model_kwargs"], **overrides["model_kwargs"]}
    return merged


def _mismatch_report(state_dict: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in state_dict
        if k in own and state_dict[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
    return "; ".join(parts)


def load_backbone(
    ckpt: str | os.PathLike,
    backbone: str | None = None,
    backbone_kwargs: dict | None = None,
    teacher: bool = False,
) -> Backbone:
    """Build a :class:`~ssl_zoo.models.Backbone` and load its weights from a checkpoint, strictly.

    Args:
        ckpt: an ssl_zoo pre-training checkpoint or a plain timm state dict (``.pt/.pth/.ckpt/.safetensors``).
        backbone: timm model name. Optional for pre-training checkpoints (the recorded name is used; if
            given it must equal it); required for plain state dicts.
        backbone_kwargs: :class:`Backbone` arguments laid over the pre-training run's ones (e.g.
            ``img_size`` for evaluation at another resolution, ``drop_path_rate`` for fine-tuning;
            ``model_kwargs`` are merged key by key). ViT position embeddings are interpolated to a new
            ``img_size``. A BEiT fine-tuning layout (mean pooling with a fresh ``fc_norm``, one relative
            position bias table per block) is filled from a pre-training checkpoint as BEiT does it.
        teacher: load the momentum/EMA teacher (``teacher_backbone.*``) instead of the student.

    Returns:
        The backbone with every tensor of its state dict taken from the checkpoint (train mode, as
        ``nn.Module`` constructs it).

    Raises:
        UnsafeCheckpointError: the file could run code when unpickled (never loaded).
        ValueError: architecture mismatch (the message names the checkpoint's architecture and the requested
            one, and lists missing / unexpected / mis-shaped tensors), no backbone name for a plain state
            dict, or no teacher in the checkpoint.
    """
    return backbone_from_weights(read_backbone_weights(ckpt, teacher=teacher), backbone, backbone_kwargs)


def backbone_kwargs_of(weights: BackboneWeights, backbone_kwargs: dict | None = None) -> dict[str, Any]:
    """The :class:`Backbone` arguments to rebuild ``weights``' architecture: the pre-training run's, with
    ``backbone_kwargs`` laid over them (:func:`merge_backbone_kwargs`). The ``pretrained`` initialisation file
    is dropped: the checkpoint replaces those weights, and the file need not exist where the checkpoint is
    evaluated."""
    recorded = {k: v for k, v in weights.kwargs.items() if k != "pretrained"}
    return merge_backbone_kwargs(recorded, backbone_kwargs)


def backbone_from_weights(
    weights: BackboneWeights,
    backbone: str | None = None,
    backbone_kwargs: dict | None = None,
) -> Backbone:
    """The second step of :func:`load_backbone`: build the architecture and load ``weights`` strictly.

    The architecture is the one the checkpoint records, unless ``backbone`` names one (which must then equal
    it; a plain state dict records none). ``backbone_kwargs`` are laid over the recorded ones; a patch size
    that differs from the weights' is refused by name, a new ``img_size`` resamples ViT position embeddings.
    """
    path = weights.source or "<state dict>"
    if weights.is_pretraining_checkpoint and weights.name and backbone and backbone != weights.name:
        raise ValueError(
            f"architecture mismatch: checkpoint '{path}' was pre-trained with backbone '{weights.name}' "
            f"but backbone '{backbone}' was requested (leave backbone unset to use the checkpoint's)"
        )
    name = backbone or weights.name
    if name is None:
        raise ValueError(
            f"checkpoint '{path}' is a plain state dict that does not record its architecture (it looks like "
            f"{describe_state_dict(weights.state_dict)}): pass backbone=<timm name>"
        )
    kwargs = backbone_kwargs_of(weights, backbone_kwargs)
    model = Backbone(name, **kwargs)
    state_dict = _drop_classifier(weights.state_dict, model.model)
    state_dict = _resample_pos_embed(state_dict, model)
    own = model.model.state_dict()
    if isinstance(model.model, VisionTransformer) and is_beit_named(state_dict):
        state_dict = beit_to_vit(state_dict, path)  # BEiT-named weights into a plain timm VisionTransformer
    state_dict, changes = _adapt_beit_layout(state_dict, own)
    if changes:
        log.info("loading '%s' into the fine-tuning layout: %s", path, "; ".join(changes))
    report = _mismatch_report(state_dict, own)
    if report:
        which = "teacher" if weights.teacher else "student"
        found = weights.name if weights.is_pretraining_checkpoint and weights.name else describe_state_dict(state_dict)
        if weights.patch_size is not None and model.family in ("vit", "swin") and model.patch_size != weights.patch_size:
            report = (f"patch size {weights.patch_size} px in the checkpoint, {model.patch_size} px requested "
                      f"(leave the patch size unset to use the checkpoint's); {report}")
        raise ValueError(
            f"architecture mismatch: the {which} weights in '{path}' (checkpoint architecture: {found}, "
            f"backbone_kwargs {weights.kwargs or {}}) do not fit the requested backbone '{name}' "
            f"(backbone_kwargs {kwargs}): {report}"
        )
    model.model.load_state_dict(state_dict, strict=True)
    old_pos = weights.state_dict.get("pos_embed")
    if old_pos is not None and old_pos.shape != state_dict["pos_embed"].shape:
        warnings.warn(
            f"position embeddings of '{path}' resampled from {tuple(old_pos.shape)} "
            f"to {tuple(state_dict['pos_embed'].shape)} for img_size {kwargs.get('img_size')}",
            stacklevel=2,
        )
    return model
