"""Parameter groups and lr schedules of the dense transfer recipes.

Layer-wise lr decay (BEiT §2.6 and its ``LayerDecayOptimizerConstructor``, ViTDet's ``get_vit_lr_decay_rate``):
the backbone's parameters get layer ids 0 (patch embedding, position embedding, class token), 1..L (block
l - 1), and everything else in the model (the backbone's final norm, the neck, the heads) L + 1; the lr of id l
is ``lr * decay^(L + 1 - l)``. Ids come from :func:`ssl_zoo.eval.finetune.layer_ids` (timm's
``group_matcher``), the same numbering the classification fine-tuning uses.

Weight decay: none on normalisation layers and on the backbone's ``no_weight_decay()`` tensors (position
embeddings, class token, Swin's relative position bias tables) in every recipe; biases are decayed as
detectron2 and mmdet / mmseg do unless ``decay_biases=False`` (BEiT's segmentation recipe excludes them).

Schedules are per optimiser step: a linear warmup from ``warmup_ratio`` (detectron2's ``WarmupMultiStepLR``
with ``WARMUP_FACTOR``, mmcv's ``warmup='linear'`` with ``warmup_ratio``) times either step decay at fractions
of the run (``multistep``) or mmcv's poly decay ``(1 - t / T)^power`` (``poly``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.lr_scheduler import LambdaLR

from ssl_zoo.eval.finetune import layer_ids
from ssl_zoo.models.backbones import Backbone

__all__ = ["dense_param_groups", "lr_multiplier", "lr_scheduler"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, _NormBase)


def _backbone_prefix(model: nn.Module, backbone: Backbone) -> str:
    for name, module in model.named_modules():
        if module is backbone:
            return f"{name}.model." if name else "model."
    raise ValueError("the backbone is not a submodule of the model")


def dense_param_groups(model: nn.Module, backbone: Backbone, lr: float, weight_decay: float,
                       layer_decay: float = 1.0, decay_biases: bool = True) -> list[dict]:
    """Optimiser groups of ``model`` (which contains ``backbone``) with layer-wise lr decay and weight-decay
    exclusions (see the module docstring). Each group carries ``lr``, ``lr_scale``, ``weight_decay``,
    ``layer_id`` and the ``param_names`` it holds."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"model.layer_decay must lie in (0, 1], got {layer_decay}")
    prefix = _backbone_prefix(model, backbone)
    ids = layer_ids(backbone.model)
    last = max(ids.values())
    no_decay_names = set(backbone.model.no_weight_decay()) if hasattr(backbone.model, "no_weight_decay") else set()
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():  # shared parameters are listed once
        if not param.requires_grad:
            continue
        timm_name = name[len(prefix):] if name.startswith(prefix) else None
        layer = ids.get(timm_name, last) if timm_name is not None else last
        no_decay = (id(param) in norm_params or (timm_name in no_decay_names)
                    or (name.endswith(".bias") and not decay_biases))
        scale = layer_decay ** (last - layer)
        group = groups.setdefault((layer, not no_decay), {
            "params": [], "param_names": [], "lr_scale": scale, "lr": lr * scale, "layer_id": layer,
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def lr_multiplier(step: int, total_steps: int, schedule: Literal["multistep", "poly"], warmup_steps: int = 0,
                  warmup_ratio: float = 0.001, milestones: Sequence[float] = (), gamma: float = 0.1,
                  power: float = 1.0, min_lr_ratio: float = 0.0) -> float:
    """The lr of step ``step`` as a fraction of the peak lr (see the module docstring).

    ``milestones``: fractions of ``total_steps`` at which the lr is multiplied by ``gamma`` (multistep).
    """
    if schedule == "multistep":
        boundaries = [round(m * total_steps) for m in milestones]
        value = gamma ** bisect.bisect_right(boundaries, step)
    elif schedule == "poly":
        progress = min(step / max(total_steps, 1), 1.0)
        value = (1.0 - min_lr_ratio) * (1.0 - progress) ** power + min_lr_ratio
    else:
        raise ValueError(f"model.lr_schedule must be 'multistep' or 'poly', got '{schedule}'")
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        value *= warmup_ratio * (1.0 - alpha) + alpha
    return value


def lr_scheduler(optimizer, total_steps: int, **kwargs) -> LambdaLR:
    """A per-step ``LambdaLR`` of :func:`lr_multiplier` for every group (the groups' lr already hold their
    layer-decay scale)."""
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, **kwargs))
