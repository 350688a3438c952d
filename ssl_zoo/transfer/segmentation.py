"""Semantic segmentation on a pre-trained backbone: UperNet over four feature levels (BEiT's, MVP's and Swin's
ADE20K protocol).

What comes from where:

* the UperNet decoder (pyramid pooling on the coarsest level, top-down FPN, fusion of all levels at stride 4):
  segmentation-models-pytorch's ``UPerNetDecoder``, which follows mmseg's ``UPerHead``; smp's extra
  LayerNorm on each input level is replaced by the identity, because the levels here are already those the
  references feed (Swin's per-stage LayerNorms, BEiT's neck, ResNet's C2..C5);
* the four levels of each backbone family, BEiT's deconvolution / pooling neck included:
  :mod:`ssl_zoo.transfer.pyramids`;
* written here after mmseg 0.x (which BEiT and Swin use): the classifier (dropout 0.1 + 1x1 conv), the
  auxiliary ``FCNHead`` on the stride-16 level (one 3x3 conv, 256 channels, loss weight 0.4), the loss
  (cross-entropy with ignore index 255 averaged over all pixels of the batch, mmseg's ``avg_non_ignore=False``)
  and the sliding-window inference (512 crops, stride 341, logits averaged where windows overlap, then resized
  to the label's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn
from torch.nn import functional as F

from ssl_zoo.transfer.metrics import SegmentationMetric
from ssl_zoo.transfer.module import DenseTransferModule, build_dense_backbone
from ssl_zoo.transfer.pyramids import build_segmentation_levels

__all__ = ["FCNHead", "SemanticSegmentation", "UperNet", "slide_windows"]


class FCNHead(nn.Module):
    """mmseg's auxiliary ``FCNHead`` (num_convs 1, no input concat): 3x3 conv + BN + ReLU, dropout, 1x1 conv."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


class UperNet(nn.Module):
    """Levels (4 maps, strides 4..32) -> UperNet decoder -> class logits at stride 4 (+ auxiliary logits)."""

    def __init__(self, levels: nn.Module, num_classes: int, channels: int = 512, aux_channels: int = 256,
                 aux_level: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.levels = levels
        widths = list(levels.channels)
        # smp's decoder reads levels [2:] of an encoder that also returns strides 1 and 2: two placeholders.
        self.decoder = UPerNetDecoder([0, 0, *widths], encoder_depth=len(widths) + 1, decoder_channels=channels)
        self.decoder.feature_norms = nn.ModuleList(nn.Identity() for _ in widths)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.aux_level = aux_level
        self.aux_head = FCNHead(widths[aux_level], aux_channels, num_classes, dropout) if aux_channels else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, 3, H, W]`` -> logits ``[B, C, H/4, W/4]`` and auxiliary logits ``[B, C, H/16, W/16]``."""
        maps = self.levels(x)
        fused = self.decoder([x, x, *maps])  # the placeholders are dropped inside
        aux = self.aux_head(maps[self.aux_level]) if self.aux_head is not None and self.training else None
        return self.classifier(fused), aux


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` windows ``(y1, y2, x1, x2)``: a grid with ``stride``, the last window of each
    row / column moved back to end at the border, every window at most ``crop`` wide."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


class SemanticSegmentation(DenseTransferModule):
    """Fine-tune a pre-trained backbone with an UperNet head (defaults: BEiT's ViT-B ADE20K recipe, which
    MVP follows: AdamW lr 7e-4 for 16 images, weight decay 0.05 without biases / norms / embeddings, layer
    decay 0.65, 1500 warmup steps from 1e-6, poly decay to 0).

    Args:
        ckpt, backbone, backbone_kwargs, teacher: as :class:`~ssl_zoo.transfer.detection.ObjectDetection`.
        num_classes: classes (``None`` = the data module's; 150 for ADE20K).
        img_size: ViT grid the position embeddings are resampled to at load (BEiT builds the ViT at 512);
            ``None`` keeps the pre-training grid, interpolated to each input at run time. A BEiT backbone's
            relative position tables are interpolated to this window (BEiT's segmentation code); smaller inputs
            (windows at a border) are padded to it, larger ones refused.
        drop_path_rate: stochastic depth (BEiT B 0.1, L 0.2; Swin-B 0.3); ``None`` = the checkpoint's.
        vit_out_indices: the ViT blocks of the four levels (``None``: [3, 5, 7, 11] / [7, 11, 15, 23]).
        channels: UperNet width (BEiT: the ViT width, 768 / 1024; Swin and ResNet: 512).
        aux_channels: auxiliary FCN head width (256; 0 disables the head); ``aux_weight``: its loss weight (0.4).
        dropout: before both classifiers (0.1).
        ignore_index: label ignored in the loss and the metrics (255).
        inference: ``slide`` (windows of ``crop_size`` with ``stride``) or ``whole`` (the resized image at once).
        crop_size: sliding-window size (``None`` = the data module's crop size); ``stride``: ``None`` = 2/3 of it
            (341 for 512, mmseg's setting).
        optimizer, lr, lr_reference_batch, weight_decay, momentum, betas, layer_decay, decay_biases, lr_schedule,
        lr_milestones, lr_gamma, poly_power, warmup_steps, warmup_ratio: as
            :class:`~ssl_zoo.transfer.detection.ObjectDetection`.
    """

    protocol = "segmentation"

    def __init__(
        self,
        ckpt: str | None = None,
        backbone: str | None = None,
        backbone_kwargs: dict | None = None,
        teacher: bool = False,
        num_classes: int | None = None,
        img_size: int | None = None,
        drop_path_rate: float | None = None,
        vit_out_indices: Sequence[int] | None = None,
        channels: int = 768,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        ignore_index: int = 255,
        inference: Literal["slide", "whole"] = "slide",
        crop_size: int | None = None,
        stride: int | None = None,
        optimizer: Literal["sgd", "adamw"] = "adamw",
        lr: float = 7e-4,
        lr_reference_batch: int = 16,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float = 0.65,
        decay_biases: bool = False,
        lr_schedule: Literal["multistep", "poly"] = "poly",
        lr_milestones: tuple[float, ...] = (),
        lr_gamma: float = 0.1,
        poly_power: float = 1.0,
        warmup_steps: int = 1500,
        warmup_ratio: float = 1e-6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.validate_optimiser_settings()
        if inference not in ("slide", "whole"):
            raise ValueError(f"model.inference must be 'slide' or 'whole', got '{inference}'")
        self.hold_backbone(build_dense_backbone(ckpt, backbone, backbone_kwargs, teacher, img_size=img_size,
                                                drop_path_rate=drop_path_rate))
        self.model: UperNet | None = None
        self.metric: SegmentationMetric | None = None
        if num_classes is not None:
            self.build_head(num_classes)

    # ------------------------------------------------------------------ model
    def build_head(self, num_classes: int) -> None:
        hp = self.hparams
        levels = build_segmentation_levels(self.backbone, hp.vit_out_indices)
        self.model = UperNet(levels, num_classes, hp.channels, hp.aux_channels, dropout=hp.dropout)
        self.metric = SegmentationMetric(num_classes, hp.ignore_index)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.crop_size is None:
            self.hparams.crop_size = int(getattr(datamodule, "crop_size", 512))

    @property
    def window(self) -> tuple[int, int]:
        crop = int(self.hparams.crop_size or 512)
        return crop, int(self.hparams.stride or round(crop * 2 / 3))

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images ``[B, 3, H, W]`` -> class logits ``[B, C, H, W]`` (one pass, no windows)."""
        logits, _ = self.model(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict_logits(self, image: Tensor, out_size: tuple[int, int]) -> Tensor:
        """One normalised image ``[3, H, W]`` -> logits ``[C, *out_size]`` by sliding-window or whole inference."""
        x = image.unsqueeze(0)
        if self.hparams.inference == "whole":
            logits = self(x)
        else:
            crop, stride = self.window
            h, w = x.shape[-2:]
            logits = x.new_zeros(1, int(self.hparams.num_classes), h, w)
            count = x.new_zeros(1, 1, h, w)
            for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
                logits[..., y1:y2, x1:x2] += self(x[..., y1:y2, x1:x2])
                count[..., y1:y2, x1:x2] += 1
            logits = logits / count
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)[0]

    def best_checkpoint_metric(self) -> str:
        return "val/mIoU"

    # ------------------------------------------------------------------ steps
    def loss_on(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of logits resized to the labels, summed over valid pixels / all pixels (mmseg 0.x)."""
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=self.hparams.ignore_index, reduction="none").mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["images"], batch["targets"]  # [B, 3, c, c], [B, c, c]
        logits, aux = self.model(images)  # [B, C, c/4, c/4], [B, C, c/16, c/16]
        loss_decode = self.loss_on(logits, labels)
        loss = loss_decode
        terms = {"train/loss_decode": loss_decode}
        if aux is not None:
            loss_aux = self.loss_on(aux, labels)
            loss = loss + self.hparams.aux_weight * loss_aux
            terms["train/loss_aux"] = loss_aux
        n = images.shape[0]
        self.log_dict(terms, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for image, label in zip(batch["images"], batch["targets"], strict=True):
            logits = self.predict_logits(image, tuple(label.shape[-2:]))  # [C, H, W] at the label's size
            self.metric.update(logits.argmax(0), label)

    def on_validation_epoch_start(self) -> None:
        self.metric.reset()

    def on_validation_epoch_end(self) -> None:
        metrics = self.metric.compute()
        self.metric.reset()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_val_metrics = metrics
            self.last_val_epoch = int(self.current_epoch)
