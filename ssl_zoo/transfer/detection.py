"""Object detection and instance segmentation on a pre-trained backbone: torchvision's Faster / Mask R-CNN.

What comes from where:

* the detectors, RPN, RoI heads, losses, box coding, anchor generation, image resizing and batching, and the
  mapping of predictions back to the original image: torchvision (``torchvision.models.detection``);
* the pyramids over ssl_zoo backbones (ResNet FPN and C4, Swin + FPN, ViTDet's simple feature pyramid):
  :mod:`ssl_zoo.transfer.pyramids`;
* the R50-C4 RoI head (``Res5Head``): written here after detectron2's ``Res5ROIHeads`` as MoCo's detection
  code uses it — 14x14 RoIAlign on C4, res5 (the pre-trained ``layer4``, stride 2 in its first block) to
  7x7, MoCo's extra BatchNorm after res5 (``Res5ROIHeadsExtraNorm``), average pooling into the box
  predictor; the mask branch runs the same res5 (shared weights) on the foreground RoIs and a 2x2 deconv
  (256 channels) + 1x1 conv predictor (detectron2's ``MaskRCNNConvUpsampleHead`` with 0 convs);
* COCO AP: torchmetrics' ``MeanAveragePrecision`` (pycocotools backend), VOC AP: :mod:`ssl_zoo.transfer.metrics`.

Known differences from detectron2 / mmdet that torchvision brings: RoIAlign without the half-pixel
alignment (detectron2's ``ROIAlignV2``), smooth-L1 box losses (beta 1/9) where detectron2's configs use L1,
and no precise-BN pass before testing (MoCo's ``TEST.PRECISE_BN``). BatchNorm is synchronised over GPUs by
the trainer (``trainer.sync_batchnorm: true`` in the R50 recipes, MoCo's SyncBN).
"""

from __future__ import annotations

from typing import Literal

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from ssl_zoo.transfer.metrics import VOCDetectionMetric, coco_detection_metric, coco_metric_names
from ssl_zoo.transfer.module import DenseTransferModule, build_dense_backbone
from ssl_zoo.transfer.pyramids import (
    DetectionPyramid,
    LayerNorm2d,
    build_detection_body,
    freeze_resnet_stages,
    resolve_pyramid,
)

__all__ = ["ObjectDetection", "Res5BoxHead", "Res5Head", "build_rcnn"]


class Res5Head(nn.Module):
    """res5 of a ResNet on RoI features ``[R, 1024, 14, 14]`` -> ``[R, 2048, 7, 7]``, plus MoCo's extra BN."""

    def __init__(self, res5: nn.Module, out_channels: int, extra_norm: bool = True) -> None:
        super().__init__()
        self.res5 = res5
        self.norm = nn.BatchNorm2d(out_channels) if extra_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.res5(x))


class Res5BoxHead(nn.Module):
    """Box branch of the C4 RoI head: :class:`Res5Head` then global average pooling -> ``[R, 2048]``."""

    def __init__(self, res5: Res5Head) -> None:
        super().__init__()
        self.res5 = res5

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))


def _norm_layer(kind: str):
    return {"none": None, "bn": nn.BatchNorm2d, "ln": LayerNorm2d}[kind]


def build_rcnn(body: nn.Module, pyramid: DetectionPyramid, num_classes: int, with_masks: bool,
               min_size: tuple[int, ...], max_size: int, box_head: Literal["2fc", "4conv1fc"] = "2fc",
               head_norm: Literal["none", "bn", "ln"] = "none", res5_extra_norm: bool = True,
               detections_per_image: int = 100, head_dim: int = 256, fc_dim: int = 1024,
               roi_batch_size_per_image: int = 512, rpn_post_nms_train: int | None = None) -> FasterRCNN:
    """A torchvision Faster R-CNN (``with_masks=False``) or Mask R-CNN over a detection body.

    C4: one stride-16 level, anchors of 32..512 px at 3 aspect ratios in it, RPN keeps 12000 -> 2000 boxes
    in training and 6000 -> 1000 in testing (detectron2's C4 settings, MoCo's ``PRE_NMS_TOPK_TEST``), 14x14
    RoIAlign into res5. FPN / simple FPN: one anchor size per level P2..P6, 2000 -> 1000 boxes per image in
    training, 1000 -> 1000 in testing (detectron2's / mmdet's FPN settings), 7x7 RoIAlign into the box head
    (``2fc``: two 1024-d FC layers; ``4conv1fc``: four 3x3 convs + one FC, normalised with ``head_norm``, as
    detectron2's SyncBN and ViTDet's LN configs) and 14x14 into a 4-conv mask head. ``min_size``: shorter
    side drawn per image in training, the last one at test time; ``max_size``: cap of the longer side.
    ``head_dim`` (256): conv width of the mask head (and of the 4-conv box head); ``fc_dim`` (1024): the box
    head's FC width; ``roi_batch_size_per_image`` (512): RoIs sampled per image for the heads' losses;
    ``rpn_post_nms_train``: proposals kept per image in training (``None``: 2000 C4, 1000 FPN).
    """
    classes = num_classes + 1  # torchvision counts the background as class 0
    common = dict(min_size=tuple(min_size), max_size=max_size, image_mean=list(IMAGENET_DEFAULT_MEAN),
                  image_std=list(IMAGENET_DEFAULT_STD), box_detections_per_img=detections_per_image)
    if pyramid == "c4":
        res5 = body.backbone.model.layer4
        channels = int(body.backbone.model.feature_info[4]["num_chs"])
        res5_head = Res5Head(res5, channels, res5_extra_norm)
        kwargs = dict(
            rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
            rpn_head=RPNHead(body.out_channels, 15),
            rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=rpn_post_nms_train or 2000,
            rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=1000,
            box_roi_pool=MultiScaleRoIAlign(["0"], 14, 0), box_head=Res5BoxHead(res5_head),
            box_predictor=FastRCNNPredictor(channels, classes),
        )
        if with_masks:
            kwargs.update(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 0), mask_head=res5_head,
                          mask_predictor=MaskRCNNPredictor(channels, head_dim, classes))
    else:
        c = body.out_channels
        levels = ["0", "1", "2", "3"]
        norm = _norm_layer(head_norm)
        if box_head == "2fc":
            head: nn.Module = TwoMLPHead(c * 7 * 7, fc_dim)
        else:
            head = FastRCNNConvFCHead((c, 7, 7), [head_dim] * 4, [fc_dim], norm_layer=norm)
        kwargs = dict(
            rpn_anchor_generator=AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
            rpn_head=RPNHead(c, 3),
            rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=rpn_post_nms_train or 1000,
            rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
            box_roi_pool=MultiScaleRoIAlign(levels, 7, 0), box_head=head, box_predictor=FastRCNNPredictor(fc_dim, classes),
        )
        if with_masks:
            kwargs.update(mask_roi_pool=MultiScaleRoIAlign(levels, 14, 0),
                          mask_head=MaskRCNNHeads(c, [head_dim] * 4, 1, norm_layer=norm),
                          mask_predictor=MaskRCNNPredictor(head_dim, head_dim, classes))
    cls = MaskRCNN if with_masks else FasterRCNN
    return cls(body, num_classes=None, box_batch_size_per_image=roi_batch_size_per_image, **common, **kwargs)


def _without_crowds(target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Crowd regions supervise nothing (COCO / detectron2 leave them out of training)."""
    keep = target["iscrowd"] == 0 if "iscrowd" in target else None
    if keep is None or bool(keep.all()):
        return target
    return {k: (v[keep] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == keep.shape[0] else v)
            for k, v in target.items()}


class ObjectDetection(DenseTransferModule):
    """Fine-tune a pre-trained backbone in a Faster / Mask R-CNN (MoCo's, Swin's and ViTDet's protocols).

    Args:
        ckpt: ssl_zoo pre-training checkpoint (any method) or plain timm state dict; ``None`` trains from a
            random initialisation (the baseline).
        backbone: timm name (required without ``ckpt``; must match the checkpoint's if given).
        backbone_kwargs: :class:`~ssl_zoo.models.backbones.Backbone` arguments laid over the checkpoint's.
        teacher: load the momentum / EMA teacher instead of the student.
        num_classes: object classes (``None`` = the data module's).
        with_masks: Mask R-CNN (instance masks, box and mask AP); ``None`` = the data module's ``with_masks``.
        pyramid: ``fpn`` (ResNet, Swin), ``c4`` (ResNet; MoCo's R50-C4), ``simple_fpn`` (ViT / BEiT; ViTDet)
            or ``auto`` (simple_fpn for a ViT or BEiT, fpn otherwise).
        img_size: ViT input size the position embeddings are resampled to at load (``None`` keeps the
            pre-training grid; timm interpolates it to each input at run time). A BEiT is built for one input
            size (``None``: ``max_size`` rounded up to 32, every batch padded to it) and its relative position
            tables are interpolated to that window.
        drop_path_rate: stochastic depth of ViT / Swin (``None`` = the checkpoint's).
        freeze_at: detectron2's ``FREEZE_AT`` for ResNets (0: MoCo trains every stage with SyncBN).
        min_size: shorter-side sizes drawn per training image; the last is the test size
            (detectron2's 1x C4: 640..800 step 32).
        max_size: longer-side cap (1333).
        box_head: ``2fc`` or ``4conv1fc`` (FPN pyramids); ``head_norm``: ``none``/``bn``/``ln`` in that head,
            the mask head and ``fpn_norm`` in the FPN (``none``/``bn``).
        res5_extra_norm: MoCo's BN after res5 in the C4 head.
        detections_per_image: 100 (COCO's maximum).
        fpn_channels (256), head_dim (256), fc_dim (1024), roi_batch_size_per_image (512), rpn_post_nms_train
            (``None``: 2000 C4, 1000 FPN): head sizes, see :func:`build_rcnn` (the demo shrinks them for the CPU).
        optimizer: ``sgd`` (detectron2, momentum 0.9) or ``adamw`` (Swin, ViTDet).
        lr: peak lr for ``lr_reference_batch`` images per step (detectron2: 0.02 for 16); scaled linearly
            with the global batch.
        weight_decay, momentum, betas: optimiser settings (detectron2: 1e-4, 0.9).
        layer_decay: layer-wise lr decay of ViT blocks (1 = off; ViTDet B: 0.7).
        decay_biases: weight decay on biases and the other 1-D tensors (detectron2 / mmdet: yes; BEiT's
            segmentation recipe: none on any 1-D tensor, see :mod:`ssl_zoo.transfer.optim`).
        lr_schedule: ``multistep`` (decay by ``lr_gamma`` at ``lr_milestones``, fractions of the run) or
            ``poly``; ``warmup_steps`` / ``warmup_ratio``: linear warmup (detectron2: 1000 steps from 0.001).
    """

    protocol = "detection"

    def __init__(
        self,
        ckpt: str | None = None,
        backbone: str | None = None,
        backbone_kwargs: dict | None = None,
        teacher: bool = False,
        num_classes: int | None = None,
        with_masks: bool | None = None,
        pyramid: DetectionPyramid = "c4",
        img_size: int | None = None,
        drop_path_rate: float | None = None,
        freeze_at: int = 0,
        min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800),
        max_size: int = 1333,
        box_head: Literal["2fc", "4conv1fc"] = "2fc",
        head_norm: Literal["none", "bn", "ln"] = "none",
        fpn_norm: Literal["none", "bn"] = "none",
        res5_extra_norm: bool = True,
        detections_per_image: int = 100,
        fpn_channels: int = 256,
        head_dim: int = 256,
        fc_dim: int = 1024,
        roi_batch_size_per_image: int = 512,
        rpn_post_nms_train: int | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.02,
        lr_reference_batch: int = 16,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float = 1.0,
        decay_biases: bool = True,
        lr_schedule: Literal["multistep", "poly"] = "multistep",
        lr_milestones: tuple[float, ...] = (2 / 3, 8 / 9),
        lr_gamma: float = 0.1,
        poly_power: float = 1.0,
        warmup_steps: int = 1000,
        warmup_ratio: float = 0.001,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.validate_optimiser_settings()
        if not min_size or min(min_size) < 1 or max_size < max(min_size):
            raise ValueError(f"model.min_size {min_size} must be positive sizes <= model.max_size {max_size}")
        # A BEiT's window is fixed: build it for the largest batch torchvision forms (the longer side capped at
        # max_size, padded to a multiple of 32); the pyramid pads smaller batches to it, as ViTDet pads to 1024.
        backbone_module = build_dense_backbone(ckpt, backbone, backbone_kwargs, teacher, img_size=img_size,
                                               drop_path_rate=drop_path_rate, fixed_size=-(-max_size // 32) * 32)
        freeze_resnet_stages(backbone_module, freeze_at)
        self.hold_backbone(backbone_module)
        self.model: FasterRCNN | None = None
        self.metric: nn.Module | None = None
        if num_classes is not None and with_masks is not None:
            self.build_head(num_classes)

    # ------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_masks = getattr(datamodule, "with_masks", None)
        if self.hparams.with_masks is None:
            self.hparams.with_masks = bool(data_masks)
        elif self.hparams.with_masks and data_masks is False:
            raise ValueError(f"model.with_masks is true (Mask R-CNN) but {type(datamodule).__name__} gives no instance "
                             "masks: set model.with_masks false (Faster R-CNN) or data.with_masks true")
        super().setup(stage)
        if self.metric is None:
            evaluation = getattr(datamodule, "evaluation", "coco")
            self.metric = (VOCDetectionMetric(int(self.hparams.num_classes)) if evaluation == "voc"
                           else coco_detection_metric(bool(self.hparams.with_masks)))

    def build_head(self, num_classes: int) -> None:
        hp = self.hparams
        pyramid = resolve_pyramid(hp.pyramid, self.backbone.family)
        body = build_detection_body(self.backbone, pyramid, hp.fpn_channels, hp.fpn_norm)
        self.model = build_rcnn(body, pyramid, num_classes, bool(hp.with_masks), tuple(hp.min_size), hp.max_size,
                                hp.box_head, hp.head_norm, hp.res5_extra_norm, hp.detections_per_image, hp.head_dim,
                                hp.fc_dim, hp.roi_batch_size_per_image, hp.rpn_post_nms_train)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Images ``[3, H_i, W_i]`` in [0, 1] -> per image ``boxes`` ``[N, 4]`` (original coordinates),
        ``labels`` (1..C), ``scores`` and, for Mask R-CNN, ``masks`` ``[N, 1, H_i, W_i]`` probabilities."""
        return self.model(images)

    def best_checkpoint_metric(self) -> str:
        voc = getattr(getattr(self.trainer, "datamodule", None), "evaluation", "coco") == "voc"
        return "val/AP50" if voc else "val/bbox_AP"

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["images"]  # list of [3, H_i, W_i]
        targets = [_without_crowds(t) for t in batch["targets"]]
        losses = self.model(images, targets)  # RPN objectness / box, RoI classifier / box (/ mask)
        loss = sum(losses.values())
        n = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=n,
                      sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        predictions = self.model(batch["images"])
        if isinstance(self.metric, VOCDetectionMetric):
            self.metric.update(predictions, batch["targets"])
            return
        preds, targets = [], []
        for p, t in zip(predictions, batch["targets"], strict=True):
            pred = {"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]}
            target = {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"].long(), "area": t["area"]}
            if self.hparams.with_masks:
                pred["masks"] = p["masks"][:, 0] > 0.5  # [N, H, W], torchvision's paste-back threshold
                target["masks"] = t["masks"].bool()
            preds.append(pred)
            targets.append(target)
        self.metric.update(preds, targets)

    def on_validation_epoch_start(self) -> None:
        self.metric.reset()

    def on_validation_epoch_end(self) -> None:
        result = self.metric.compute()
        if isinstance(self.metric, VOCDetectionMetric):
            metrics = dict(result)
        else:
            metrics = coco_metric_names(result, bool(self.hparams.with_masks))
        self.metric.reset()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_val_metrics = metrics
            self.last_val_epoch = int(self.current_epoch)

