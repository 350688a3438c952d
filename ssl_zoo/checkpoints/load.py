"""Checkpoint -> backbone in one trip: read the file safely, recognise its layout, build the architecture it
states, fit the tensors to it and load them strictly.

Two kinds of files are accepted, both read with ``torch.load(weights_only=True)`` (or safetensors), so a
checkpoint can never run code on the machine that evaluates it:

* an ssl_zoo pre-training checkpoint (a Lightning ``.ckpt``, or a file written by
  ``python -m ssl_zoo.checkpoints.convert``): ``state_dict`` holds the student backbone under
  ``backbone.model.<timm key>`` and, for momentum / EMA methods, the teacher under
  ``teacher_backbone.model.<timm key>``; ``hyper_parameters`` names the architecture (``backbone``) and its
  constructor arguments (``backbone_kwargs``);
* a public checkpoint of another codebase (SimSiam, MoCo v1/v2/v3, DINO, MAE, BEiT / BEiT v2, OpenAI CLIP) or a
  plain timm / torchvision state dict, recognised by :func:`ssl_zoo.checkpoints.layouts.recognise`, which also
  states the architecture the official code builds (a bare timm ViT dict does not: its backbone must be named).

:func:`read_backbone_weights` gives a :class:`BackboneWeights` (a timm state dict and its architecture);
:func:`backbone_from_weights` builds the :class:`~ssl_zoo.models.Backbone` and loads it; :func:`load_backbone`
runs both.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_zoo.checkpoints.architecture import Architecture, check_facts, describe_state_dict, vit_grid
from ssl_zoo.checkpoints.layouts import beit_to_vit, is_beit_named, recognise
from ssl_zoo.models.backbones import Backbone
from ssl_zoo.utils.safe_load import read_checkpoint

__all__ = ["STUDENT_PREFIX", "TEACHER_PREFIX", "BackboneWeights", "backbone_from_weights", "backbone_kwargs_of",
           "load_backbone", "merge_backbone_kwargs", "read_backbone_weights"]

log = logging.getLogger(__name__)

STUDENT_PREFIX = "backbone.model."
TEACHER_PREFIX = "teacher_backbone.model."
OWN_LAYOUT = "ssl_zoo"


@dataclass
class BackboneWeights:
    """The timm state dict of one backbone, the architecture that holds it and where it came from."""

    state_dict: dict[str, Tensor]
    architecture: Architecture
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file, for messages
    teacher: bool = False  # the momentum / EMA teacher's weights rather than the student's
    layout: str = OWN_LAYOUT  # ssl_zoo, or the public layout it was recognised as
    encoder: str = "student: backbone.model.*"  # which model of the file
    dropped: tuple[str, ...] = ()  # key prefixes of the file left out (heads, queues, decoders)

    @property
    def name(self) -> str | None:
        return self.architecture.name

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.architecture.kwargs)

    @property
    def is_pretraining_checkpoint(self) -> bool:
        return self.layout == OWN_LAYOUT

    @property
    def img_size(self) -> int | None:
        """The input side the backbone was pre-trained at, where the checkpoint tells: the backbone's own
        ``img_size`` argument (ViT / Swin), else the method's crop size (``img_size`` hyper-parameter, e.g. a
        ResNet's), else a ViT's square patch grid times its patch size."""
        for value in (self.kwargs.get("img_size"), self.hyper_parameters.get("img_size")):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        grid = vit_grid(self.state_dict) if not any(k.startswith("layers.") for k in self.state_dict) else None
        return grid * self.patch_size if grid and self.patch_size else None

    @property
    def patch_size(self) -> int | None:
        """Pixels per side of one patch embedding (ViT / Swin), None for a ResNet."""
        proj = self.state_dict.get("patch_embed.proj.weight")
        return int(proj.shape[-1]) if proj is not None and proj.dim() == 4 else None


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


def read_backbone_weights(ckpt: str | os.PathLike, teacher: bool = False) -> BackboneWeights:
    """The student (default) or teacher backbone of a checkpoint file: its timm state dict and architecture.

    Raises:
        FileNotFoundError: no such file (the message lists the newest checkpoints under ``runs/``).
        IsADirectoryError: a directory, e.g. a run directory (the message names its ``last.ckpt``).
        NotACheckpointError: a file that is not a checkpoint (a config, an image, an empty file).
        UnsafeCheckpointError: the file could run code when unpickled (never loaded).
        ValueError: ``teacher=True`` for a checkpoint without a teacher.
        UnknownCheckpointLayout: a file in none of the known layouts; the message lists its top-level keys and
            tensor key prefixes.
    """
    path = os.fspath(ckpt)
    if not os.path.isfile(path):
        raise _missing_checkpoint(path)
    obj = read_checkpoint(path)
    state = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else None
    if state is not None and any(k.startswith(STUDENT_PREFIX) for k in state):
        prefix = TEACHER_PREFIX if teacher else STUDENT_PREFIX
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            prefixes = sorted({k.split(".", 1)[0] + "." for k in state})
            raise ValueError(
                f"checkpoint '{path}' has no teacher backbone (no '{TEACHER_PREFIX}*' keys; its modules are "
                f"{', '.join(prefixes)}): this method keeps no momentum/EMA teacher, evaluate with teacher=False"
            )
        hparams = dict(obj.get("hyper_parameters") or {})
        name = hparams.get("backbone")
        architecture = Architecture(name, dict(hparams.get("backbone_kwargs") or {}),
                                    dict(hparams.get("architecture_facts") or {}),
                                    hparams.get("architecture_described") or f"an ssl_zoo {name} backbone")
        return BackboneWeights(weights, architecture, hparams, source=path, teacher=teacher,
                               encoder=f"{'teacher' if teacher else 'student'}: {prefix}*")
    found = recognise(obj, source=path, teacher=teacher)
    return BackboneWeights(found.state_dict, found.architecture, source=path, teacher=teacher, layout=found.layout,
                           encoder=found.encoder, dropped=found.dropped)


def merge_backbone_kwargs(recorded: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:class:`Backbone` arguments of the pre-training run with ``overrides`` laid over them; ``model_kwargs``
    are merged key by key, so that e.g. a fine-tuning head option keeps the recorded layer scale."""
    merged = {**recorded, **(overrides or {})}
    if isinstance(recorded.get("model_kwargs"), Mapping) and isinstance((overrides or {}).get("model_kwargs"), Mapping):
        merged["model_kwargs"] = {**recorded["model_kwargs"], **overrides["model_kwargs"]}
    return merged


def backbone_kwargs_of(weights: BackboneWeights, backbone_kwargs: dict | None = None) -> dict[str, Any]:
    """The :class:`Backbone` arguments to rebuild ``weights``' architecture, with ``backbone_kwargs`` laid over
    them. The ``pretrained`` initialisation file is dropped: the checkpoint replaces those weights, and the file
    need not exist where the checkpoint is evaluated."""
    recorded = {k: v for k, v in weights.kwargs.items() if k != "pretrained"}
    return merge_backbone_kwargs(recorded, backbone_kwargs)


# ---------------------------------------------------------------------------------------------- fitting tensors
def _adapt_beit_layout(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map a pre-training layout onto BEiT's fine-tuning layout, as BEiT's ``run_class_finetuning.py`` and its
    semantic-segmentation backbone do:

    * mean pooling with ``fc_norm`` (model: ``fc_norm.*``, no ``norm.*``; checkpoint: ``norm.*``, no
      ``fc_norm.*``): the pre-trained final norm is dropped and ``fc_norm`` keeps its fresh initialisation;
    * one relative position bias table per block (model: ``blocks.i.attn.relative_position_bias_table``)
      from BEiT pre-training's shared one (checkpoint: ``rel_pos_bias.relative_position_bias_table``): the
      shared table is copied into every block.
    """
    changes = []
    if ("fc_norm.weight" in own and "fc_norm.weight" not in state
            and "norm.weight" in state and "norm.weight" not in own):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        state.update({k: v for k, v in own.items() if k.startswith("fc_norm.")})
        changes.append("final norm dropped, fresh fc_norm after mean pooling")
    shared = "rel_pos_bias.relative_position_bias_table"
    per_block = [k for k in own if re.fullmatch(r"blocks\.\d+\.attn\.relative_position_bias_table", k)]
    if shared in state and shared not in own and per_block and not any(k in state for k in per_block):
        table = state.pop(shared)
        state.update({k: table.clone() for k in per_block})
        changes.append(f"shared relative position bias copied into {len(per_block)} blocks")
    return state, changes


def _fit_positions(state: dict[str, Tensor], model: Backbone) -> list[str]:
    """Absolute position embeddings resampled to the model's grid (bicubic, prefix tokens kept, timm / DeiT) and
    relative position bias tables interpolated to its window (BEiT's geometric-progression interpolation as
    timm's ``resize_rel_pos_bias_table`` implements it: linear on the same grid, where BEiT's semantic
    segmentation code used SciPy's cubic ``interp2d``), in place; returns what changed."""
    own, changes = model.model.state_dict(), []
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape and pos.dim() == 3:
        prefix = 0 if getattr(model.model, "no_embed_class", False) else model.num_prefix_tokens
        old = vit_grid({"pos_embed": pos})
        if old is not None:
            new_grid = list(model.model.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(pos, new_grid, [old, old], num_prefix_tokens=prefix)
            changes.append(f"position embeddings resampled from {old}x{old} to {new_grid[0]}x{new_grid[1]}")
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        target = own.get(key)
        if target is None or target.shape == state[key].shape:
            continue
        module = model.model.get_submodule(key[: -len(".relative_position_bias_table")])
        state[key] = resize_rel_pos_bias_table(state[key], new_window_size=module.window_size,
                                               new_bias_shape=tuple(target.shape))
        changes.append(f"{key} interpolated to the window {tuple(module.window_size)}")
    return changes


def _drop_classifier(state: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Remove a classifier the backbone does not have (``fc.*``/``head.*`` of a timm model with a head)."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not classifier:
        return state
    own = model.state_dict()
    return {k: v for k, v in state.items() if not (k.startswith(classifier + ".") and k not in own)}


def _mismatch_report(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- building
def _requested_architecture(weights: BackboneWeights, backbone: str | None) -> str:
    """The timm name to build: the checkpoint's, or ``backbone``, which for an ssl_zoo checkpoint must equal it."""
    path = weights.source or "<state dict>"
    if weights.is_pretraining_checkpoint and weights.name and backbone and backbone != weights.name:
        raise ValueError(
            f"architecture mismatch: checkpoint '{path}' was pre-trained with backbone '{weights.name}' "
            f"but backbone '{backbone}' was requested (leave backbone unset to use the checkpoint's)"
        )
    name = backbone or weights.name
    if name is None:
        raise ValueError(
            f"checkpoint '{path}' holds {weights.architecture.described or describe_state_dict(weights.state_dict)}, "
            f"whose layout ({weights.layout}) does not record the architecture (the attention heads, pooling and "
            "norms are not in the tensors): pass backbone=<timm name> (--model.init_args.backbone), or convert it "
            "once with `python -m ssl_zoo.checkpoints.convert IN OUT --backbone <timm name>`"
        )
    return name


def backbone_from_weights(
    weights: BackboneWeights,
    backbone: str | None = None,
    backbone_kwargs: dict | None = None,
) -> Backbone:
    """Build the architecture of ``weights`` and load them strictly.

    The architecture is the one the checkpoint states, unless ``backbone`` names one (for an ssl_zoo checkpoint
    it must then equal the recorded one; for a public layout the built model must agree with what the official
    code builds: the same heads, norms, activation). ``backbone_kwargs`` are laid over the recorded ones; a new
    ``img_size`` resamples position embeddings and relative position tables; BEiT's pre-training layout is fitted
    to a fine-tuning layout (mean pooling with a fresh ``fc_norm``, one relative position table per block).
    """
    path = weights.source or "<state dict>"
    name = _requested_architecture(weights, backbone)
    same = name == weights.name
    kwargs = backbone_kwargs_of(weights, backbone_kwargs) if same else dict(backbone_kwargs or {})
    model = Backbone(name, **kwargs)
    if not weights.is_pretraining_checkpoint:
        check_facts(weights.architecture, model.model, path, name)
        if not same and weights.name:
            log.info("'%s' (%s) loaded into the requested backbone '%s'", path, weights.architecture.described, name)
    own = model.model.state_dict()
    state = _drop_classifier(dict(weights.state_dict), model.model)
    if isinstance(model.model, VisionTransformer) and is_beit_named(state):
        state = beit_to_vit(state, path)  # BEiT-named weights into a plain timm VisionTransformer
    state = {k: v for k, v in state.items() if not (k.endswith("relative_position_index") and k not in own)}
    state, changes = _adapt_beit_layout(state, own)
    changes += _fit_positions(state, model)
    report = _mismatch_report(state, own)
    if report:
        which = "teacher" if weights.teacher else "student"
        found = weights.name if weights.name else describe_state_dict(state)
        if weights.patch_size is not None and model.family in ("vit", "beit", "swin") and \
                model.patch_size != weights.patch_size:
            report = (f"patch size {weights.patch_size} px in the checkpoint, {model.patch_size} px requested "
                      f"(leave the patch size unset to use the checkpoint's); {report}")
        raise ValueError(
            f"architecture mismatch: the {which} weights in '{path}' (checkpoint architecture: {found}, "
            f"backbone_kwargs {weights.kwargs or {}}) do not fit the requested backbone '{name}' "
            f"(backbone_kwargs {kwargs}): {report}"
        )
    model.model.load_state_dict(state, strict=True)
    if changes:
        log.info("loading '%s': %s", path, "; ".join(changes))
    if any(c.startswith("position embeddings resampled") for c in changes):
        warnings.warn(f"'{path}': {'; '.join(c for c in changes if c.startswith('position'))} for img_size "
                      f"{kwargs.get('img_size')}", stacklevel=2)
    return model


def load_backbone(
    ckpt: str | os.PathLike,
    backbone: str | None = None,
    backbone_kwargs: dict | None = None,
    teacher: bool = False,
) -> Backbone:
    """Build a :class:`~ssl_zoo.models.Backbone` and load its weights from a checkpoint, strictly.

    Args:
        ckpt: an ssl_zoo pre-training checkpoint, a public checkpoint (SimSiam, MoCo v1/v2/v3, DINO, MAE, BEiT,
            OpenAI CLIP) or a plain timm / torchvision state dict (``.pt/.pth/.ckpt/.safetensors``).
        backbone: timm model name. Optional where the checkpoint states its architecture; required for plain
            ViT state dicts.
        backbone_kwargs: :class:`Backbone` arguments laid over the checkpoint's (``img_size`` for evaluation at
            another resolution, ``drop_path_rate`` for fine-tuning; ``model_kwargs`` merged key by key).
        teacher: load the momentum/EMA teacher instead of the student.

    Raises:
        UnsafeCheckpointError: the file could run code when unpickled (never loaded).
        ValueError: architecture mismatch (the message names the checkpoint's architecture and the requested
            one, what differs and what to set), no backbone name where the file records none, or no teacher.
    """
    return backbone_from_weights(read_backbone_weights(ckpt, teacher=teacher), backbone, backbone_kwargs)
