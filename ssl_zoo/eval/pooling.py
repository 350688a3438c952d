"""Global pooling of a spatial feature map for linear evaluation.

BAM+IA-CLoss (§3.3) evaluates multi-label representations with a linear classifier on *global average and
max pooling* (GAMP) of the last feature map: average pooling summarises the whole image, max pooling keeps
the strongest response of small objects that averaging would wash out. For ViTs the map is the patch
tokens reshaped to their grid (:meth:`ssl_zoo.models.Backbone.forward_map`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

__all__ = ["POOLINGS", "FeaturePooling", "PoolingName", "gamp", "gap", "gmp", "pool_map"]

PoolingName = Literal["gap", "gmp", "gamp"]
POOLINGS: tuple[str, ...] = ("gap", "gmp", "gamp")


def _check_map(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"pooling expects a feature map [B, C, H, W], got shape {tuple(x.shape)}")


def gap(x: Tensor) -> Tensor:
    """Global average pooling ``[B, C, H, W] -> [B, C]``: mean over the ``H * W`` positions."""
    _check_map(x)
    return x.mean(dim=(2, 3))


def gmp(x: Tensor) -> Tensor:
    """Global max pooling ``[B, C, H, W] -> [B, C]``: per-channel maximum over the ``H * W`` positions."""
    _check_map(x)
    return x.amax(dim=(2, 3))


def gamp(x: Tensor) -> Tensor:
    """Global average and max pooling (BAM+IA-CLoss §3.3): ``(GAP(x) + GMP(x)) / 2``, ``[B, C, H, W] -> [B, C]``."""
    return 0.5 * (gap(x) + gmp(x))


_POOL_FNS = {"gap": gap, "gmp": gmp, "gamp": gamp}


def pool_map(x: Tensor, pooling: PoolingName) -> Tensor:
    """Pool ``x: [B, C, H, W]`` to ``[B, C]`` with ``pooling`` in ``gap | gmp | gamp``."""
    try:
        fn = _POOL_FNS[pooling]
    except KeyError:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'") from None
    return fn(x)


class FeaturePooling(nn.Module):
    """``nn.Module`` form of :func:`pool_map` (no parameters), for use inside heads and configs."""

    def __init__(self, pooling: PoolingName = "gamp") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:
        return pool_map(x, self.pooling)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"
