"""Frozen-feature extraction shared by the linear probes, the kNN evaluation and the kNN monitor."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from ssl_zoo.eval.pooling import POOLINGS, pool_map
from ssl_zoo.models.backbones import Backbone

__all__ = ["FEATURE_POOLINGS", "FeaturePoolingName", "embed", "extract_features", "split_batch"]

#: ``backbone`` is the backbone's own pooled embedding (timm ``forward_head(pre_logits=True)``: ResNet
#: average pool, ViT CLS token, Swin average pool); the others pool ``forward_map`` (:mod:`.pooling`).
FeaturePoolingName = Literal["backbone", "gap", "gmp", "gamp"]
FEATURE_POOLINGS: tuple[str, ...] = ("backbone", *POOLINGS)


def check_pooling(pooling: str, argument: str = "pooling") -> None:
    if pooling not in FEATURE_POOLINGS:
        raise ValueError(f"{argument} must be one of {', '.join(FEATURE_POOLINGS)}, got '{pooling}'")


def embed(backbone: Backbone, x: Tensor, pooling: FeaturePoolingName = "backbone") -> Tensor:
    """Images ``[B, 3, S, S]`` -> features ``[B, D]``.

    ``gap``/``gmp``/``gamp`` pool the last-stage map ``[B, D, H, W]`` (for ViTs the patch tokens reshaped to
    their grid), as the multi-label linear evaluation of BAM+IA-CLoss (§3.3) does.
    """
    if pooling == "backbone":
        return backbone(x)
    check_pooling(pooling)
    return pool_map(backbone.forward_map(x), pooling)  # type: ignore[arg-type]


def split_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(images [B, 3, S, S], targets, dataset indices or None)`` from either batch format.

    Accepts the view dict of the data modules (``{"views": [B, V, 3, S, S], "target", "index"}``; the first
    view is used) and the ``(image, target)`` pairs of ``labelled_dataloader``.
    """
    if isinstance(batch, dict):
        views = batch["views"]
        images = views[:, 0] if views.dim() == 5 else views
        return images, batch["target"], batch.get("index")
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1], None
    raise TypeError(f"cannot read images and targets from a batch of type {type(batch).__name__}")


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    loader: Iterable,
    pooling: FeaturePoolingName = "backbone",
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a frozen backbone over a loader: ``(features [N, D] float32, targets [N] or [N, C])`` on the CPU.

    The backbone is put in eval mode (BatchNorm running statistics, no dropout / drop path) for the pass
    and restored to its previous mode afterwards. Samples are kept in loader order.

    Args:
        backbone: the network to evaluate.
        loader: yields ``(images, targets)`` or the data modules' view dicts.
        pooling: see :func:`embed`.
        device: where to run (default: the backbone's device).
        max_samples: stop after this many samples (``None``: the whole loader).
    """
    check_pooling(pooling)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats, targets, seen = [], [], 0
    try:
        for batch in loader:
            images, target, _ = split_batch(batch)
            feats.append(embed(backbone, images.to(device, non_blocking=True), pooling).float().cpu())
            targets.append(torch.as_tensor(target).cpu())
            seen += images.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batch: nothing to extract features from")
    features, all_targets = torch.cat(feats), torch.cat(targets)
    if max_samples is not None:
        features, all_targets = features[:max_samples], all_targets[:max_samples]
    return features, all_targets
