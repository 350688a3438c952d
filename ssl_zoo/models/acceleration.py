"""Speed options of every method: ``torch.compile`` and the channels-last memory format for the backbones.

Both change how the backbone runs, never what it computes, and both keep parameter names (checkpoints,
EMA teachers and exports are unaffected). Methods expose them as ``compile`` and ``channels_last``
constructor arguments and apply them in Lightning's ``configure_model`` hook, which runs once the model
is set up and before the strategy wraps it in DDP.

* ``channels_last``: convolution weights in NHWC order and a pre-hook on the stem convolution that
  converts the input images, so every entry point (``forward``, ``forward_map``, ``forward_tokens``)
  feeds NHWC tensors to the convolutions. This is what lets cuDNN use tensor-core kernels under bf16
  (PyTorch "channels last" tutorial). It matters for ResNets; a ViT/Swin only has its patch embedding.
* ``compile``: regional compilation, ``torch.compile`` of each repeated block in place (each ResNet
  stage, each ViT block, each Swin stage) rather than of one ``forward``. The methods reach the trunk
  through ``forward_map`` / ``forward_tokens`` as well as ``forward``, which a compiled ``forward``
  would not cover; identical blocks share one compiled graph, so compiling takes seconds, not minutes
  (PyTorch recipe "Reducing torch.compile cold start compilation time with regional compilation").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssl_zoo.models.backbones import Backbone

__all__ = ["accelerate_backbones", "compile_blocks", "use_channels_last"]


def _to_channels_last(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    x = args[0]
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *args[1:])


def use_channels_last(backbone: Backbone) -> None:
    """Put the backbone's 4-D (convolution) weights and its input images in channels-last order.

    Idempotent: a second call changes nothing.
    """
    if getattr(backbone, "_channels_last", False):
        return
    backbone.model.to(memory_format=torch.channels_last)
    # The first convolution is the stem (ResNet conv1, ViT/Swin patch embedding): every entry point passes it.
    stem = next((m for m in backbone.model.modules() if isinstance(m, nn.Conv2d)), None)
    if stem is not None:
        stem.register_forward_pre_hook(_to_channels_last)
    backbone._channels_last = True


def trunk_blocks(backbone: Backbone) -> list[nn.Module]:
    """The repeated blocks that hold almost all of a backbone's compute, in order."""
    model = backbone.model
    if backbone.family == "resnet":
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    if backbone.family in ("vit", "beit"):
        return list(model.blocks)
    return list(model.layers)  # swin stages


def compile_blocks(backbone: Backbone, **compile_kwargs) -> None:
    """``torch.compile`` every trunk block of ``backbone`` in place (``nn.Module.compile``).

    Parameter names and the module tree stay as they are. Idempotent. ``compile_kwargs`` go to
    ``torch.compile`` (``mode``, ``dynamic``...).
    """
    if getattr(backbone, "_blocks_compiled", False):
        return
    for block in trunk_blocks(backbone):
        block.compile(**compile_kwargs)
    backbone._blocks_compiled = True


def accelerate_backbones(module: nn.Module, compile: bool = False, channels_last: bool = False) -> None:
    """Apply the speed options to every :class:`Backbone` inside ``module`` (student and EMA teacher alike).

    Args:
        module: a method (``LightningModule``) or any module holding backbones.
        compile: regional ``torch.compile`` of the trunk blocks (see :func:`compile_blocks`).
        channels_last: channels-last weights and inputs (see :func:`use_channels_last`).
    """
    for backbone in [m for m in module.modules() if isinstance(m, Backbone)]:
        if channels_last:
            use_channels_last(backbone)
        if compile:
            compile_blocks(backbone)
