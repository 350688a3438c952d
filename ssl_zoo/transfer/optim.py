"""Parameter groups and lr schedules of the dense transfer recipes.

Layer-wise lr decay (BEiT §2.6 and its ``LayerDecayOptimizerConstructor``, ViTDet's ``get_vit_lr_decay_rate``):
timm's ``param_groups_layer_decay`` over the whole model, numbered by the model's ``group_matcher``
(:func:`ssl_zoo.eval.finetune.backbone_layer_matcher`, the numbering the classification fine-tuning uses): the
backbone's parameters get layer ids 0 (patch embedding, position embedding, class token), 1..L (block l - 1), and
everything else in the model (the backbone's final norm, the neck, the heads) L + 1; the lr of id l is
``lr * decay^(L + 1 - l)``.

Weight decay: none on normalisation layers (by module type, detectron2's ``weight_decay_norm``) and on the
backbone's ``no_weight_decay()`` tensors (position embeddings, class token, Swin's relative position bias tables)
in every recipe. Biases and the other 1-D tensors are decayed as detectron2 and mmdet / mmseg do; with
``decay_biases=False`` no 1-D tensor is (BEiT's segmentation recipe: ``len(param.shape) == 1 or
name.endswith(".bias")``, layer-scale gammas and q / v biases included), timm's ``weight_decay_exclude_1d``.

Schedules are per optimiser step: a linear warmup from ``warmup_ratio`` (detectron2's ``WarmupMultiStepLR``
with ``WARMUP_FACTOR``, mmcv's ``warmup='linear'`` with ``warmup_ratio``) times either step decay at fractions
of the run (``multistep``) or mmcv's poly decay ``(1 - t / T)^power`` (``poly``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

from timm.optim import param_groups_layer_decay
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.lr_scheduler import LambdaLR

from ssl_zoo.eval.finetune import timm_prefix
from ssl_zoo.models.backbones import Backbone

__all__ = ["dense_param_groups", "lr_multiplier", "lr_scheduler"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, _NormBase)


def dense_param_groups(model: nn.Module, backbone: Backbone, lr: float, weight_decay: float,
                       layer_decay: float = 1.0, decay_biases: bool = True) -> list[dict]:
    """Optimiser groups of ``model`` (which contains ``backbone`` and numbers its layers with ``group_matcher``)
    with layer-wise lr decay and weight-decay exclusions (see the module docstring): timm's
    ``param_groups_layer_decay``, each group's ``lr`` set to ``lr * lr_scale``."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"model.layer_decay must lie in (0, 1], got {layer_decay}")
    prefix = timm_prefix(model, backbone)
    no_decay = {prefix + n for n in getattr(backbone.model, "no_weight_decay", set)()}
    no_decay |= {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, _NORMS)
                 for p, _ in m.named_parameters(recurse=False)}
    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay,
                                      weight_decay_exclude_1d=not decay_biases)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


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
