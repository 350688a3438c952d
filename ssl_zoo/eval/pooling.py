"""Global pooling of a spatial feature map for linear evaluation.

BAM+IA-CLoss (§3.3) evaluates multi-label representations with a linear classifier on *global average and
max pooling* (GAMP) of the last feature map: average pooling summarises the whole image, max pooling keeps
the strongest response of small objects that averaging would wash out. For ViTs the map is the patch
tokens reshaped to their grid (:meth:`ssl_zoo.models.Backbone.forward_map`).

GAP, GMP and GAMP are timm's ``SelectAdaptivePool2d`` (its "fast" pools: ``mean`` / ``amax`` over H and W);
timm's ``avgmax`` is ``0.5 * avg + 0.5 * max``, GAMP exactly (``tests/eval/test_pooling.py``).
"""

from __future__ import annotations

from typing import Literal

from timm.layers import SelectAdaptivePool2d
from torch import Tensor

__all__ = ["POOLINGS", "FeaturePooling", "PoolingName", "gamp", "gap", "gmp", "pool_map"]

PoolingName = Literal["gap", "gmp", "gamp"]
#: Our pooling names -> timm's ``pool_type``.
TIMM_POOL_TYPES: dict[str, str] = {"gap": "fastavg", "gmp": "fastmax", "gamp": "fastavgmax"}
POOLINGS: tuple[str, ...] = tuple(TIMM_POOL_TYPES)


class FeaturePooling(SelectAdaptivePool2d):
    """``[B, C, H, W] -> [B, C]`` by ``pooling`` in ``gap | gmp | gamp``: timm's ``SelectAdaptivePool2d``."""

    def __init__(self, pooling: PoolingName = "gamp") -> None:
        if pooling not in TIMM_POOL_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        super().__init__(pool_type=TIMM_POOL_TYPES[pooling], flatten=True)
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"pooling expects a feature map [B, C, H, W], got shape {tuple(x.shape)}")
        return super().forward(x)


_POOLS = {name: FeaturePooling(name) for name in POOLINGS}


def pool_map(x: Tensor, pooling: PoolingName) -> Tensor:
    """Pool ``x: [B, C, H, W]`` to ``[B, C]`` with ``pooling`` in ``gap | gmp | gamp``."""
    if pooling not in _POOLS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    return _POOLS[pooling](x)


def gap(x: Tensor) -> Tensor:
    """Global average pooling ``[B, C, H, W] -> [B, C]``: mean over the ``H * W`` positions."""
    return pool_map(x, "gap")


def gmp(x: Tensor) -> Tensor:
    """Global max pooling ``[B, C, H, W] -> [B, C]``: per-channel maximum over the ``H * W`` positions."""
    return pool_map(x, "gmp")


def gamp(x: Tensor) -> Tensor:
    """Global average and max pooling (BAM+IA-CLoss §3.3): ``(GAP(x) + GMP(x)) / 2``, ``[B, C, H, W] -> [B, C]``."""
    return pool_map(x, "gamp")
