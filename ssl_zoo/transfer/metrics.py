"""Metrics of the transfer protocols, all as torchmetrics ``Metric`` objects (synchronised over processes).

* COCO box / mask AP: torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend (COCO's own
  ``COCOeval``; crowd ground truth marks ignored regions, areas come from the annotations), reported in
  percent as ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs/m/l`` and the same for ``segm_``.
* Pascal VOC AP (:class:`VOCDetectionMetric`): detectron2's ``PascalVOCDetectionEvaluator`` — per class,
  detections sorted by score are matched greedily to unmatched ground truth at IoU >= t; difficult ground
  truth is neither counted nor penalised; VOC2007's 11-point interpolated AP (``use_07_metric``) or the
  area under the monotone precision envelope (VOC2010+). ``AP50`` is the VOC number; ``AP`` averages
  t = 0.50:0.05:0.95 and ``AP75`` is t = 0.75, as MoCo reports them.
* Semantic segmentation (:class:`SegmentationMetric`): one confusion matrix over all valid pixels (label
  != ignore index); IoU_c = TP / (TP + FP + FN), acc_c = TP / (TP + FN); ``mIoU`` and ``mAcc`` average the
  classes whose value is defined (mmseg's ``nanmean``: a class absent from both labels and predictions does
  not count), ``aAcc`` = correct / valid pixels. In percent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["SegmentationMetric", "VOCDetectionMetric", "coco_detection_metric", "coco_metric_names",
           "segmentation_scores", "voc_ap"]

_COCO_KEYS = {"map": "AP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm",
              "map_large": "APl"}


def coco_detection_metric(with_masks: bool) -> MeanAveragePrecision:
    """COCO AP of boxes (and masks) through torchmetrics with pycocotools' ``COCOeval``."""
    return MeanAveragePrecision(iou_type=("bbox", "segm") if with_masks else "bbox", backend="pycocotools",
                                box_format="xyxy")


def coco_metric_names(result: dict[str, Any], with_masks: bool) -> dict[str, float]:
    """``MeanAveragePrecision.compute()`` -> ``{"bbox_AP": 37.1, ..., "segm_AP": ...}`` in percent (-1 stays -1:
    COCO's value when no ground truth of that kind exists)."""
    out = {}
    for kind in ("bbox", "segm") if with_masks else ("bbox",):
        for key, name in _COCO_KEYS.items():
            value = result.get(f"{kind}_{key}" if with_masks else key)
            if value is not None:
                v = float(value)
                out[f"{kind}_{name}"] = v if v < 0 else 100.0 * v
    return out


# ------------------------------------------------------------------------------------------ VOC
# Ours: torchmetrics' MeanAveragePrecision is COCO's 101-point AP; VOC2007's 11-point AP (detectron2's) is not in it.
def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a precision / recall curve (detectron2's ``voc_ap``): VOC2007's mean of the interpolated
    precision at recall 0, 0.1, ..., 1, or the area under the monotone precision envelope."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = np.max(precision[recall >= t]) if np.any(recall >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box ``[4]`` with ``[M, 4]`` (continuous coordinates; VOC's "+1" pixel convention is the
    same as the 1-pixel shift of the readers' ``xmin - 1``)."""
    ix1, iy1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    ix2, iy2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


class VOCDetectionMetric(Metric):
    """Pascal VOC detection AP (see the module docstring); ``update(preds, targets)`` takes torchvision-style
    lists of dicts (``boxes``, ``scores``, ``labels``; targets ``boxes``, ``labels``, ``difficult``,
    ``image_id``). Images are told apart by ``image_id``; one seen twice (a padded distributed shard) counts
    once."""

    full_state_update = False

    def __init__(self, num_classes: int, use_07_metric: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.use_07_metric = use_07_metric
        for name in ("det_boxes", "det_scores", "det_labels", "det_image", "det_token", "gt_boxes", "gt_labels",
                     "gt_difficult", "gt_image", "gt_token"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._updates = 0

    def _token(self) -> int:
        """A number unique to one (process, image update): tells a repeated image's copies apart after gathering."""
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        self._updates += 1
        return rank * 2**40 + self._updates

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        for pred, target in zip(preds, targets, strict=True):
            image, token = int(target["image_id"]), self._token()
            n, m = len(pred["boxes"]), len(target["boxes"])
            self.det_boxes.append(pred["boxes"].detach().double().reshape(-1, 4))
            self.det_scores.append(pred["scores"].detach().double())
            self.det_labels.append(pred["labels"].detach().long())
            self.det_image.append(torch.full((n,), image, dtype=torch.long, device=self.device))
            self.det_token.append(torch.full((n,), token, dtype=torch.long, device=self.device))
            self.gt_boxes.append(target["boxes"].detach().double().reshape(-1, 4))
            self.gt_labels.append(target["labels"].detach().long())
            difficult = target.get("difficult", torch.zeros(m, dtype=torch.uint8))
            self.gt_difficult.append(difficult.detach().bool().to(self.device))
            self.gt_image.append(torch.full((m,), image, dtype=torch.long, device=self.device))
            self.gt_token.append(torch.full((m,), token, dtype=torch.long, device=self.device))

    @staticmethod
    def _cat(values: Any, columns: int | None, dtype: torch.dtype) -> np.ndarray:
        if isinstance(values, Tensor):
            return values.cpu().numpy()
        if not values:
            return torch.zeros((0, columns) if columns else (0,), dtype=dtype).numpy()
        return torch.cat([v.cpu() for v in values]).numpy()

    def _gathered(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Detections and ground truth as arrays, each image's first evaluated copy only."""
        det = {k: self._cat(getattr(self, f"det_{k}"), 4 if k == "boxes" else None, dt) for k, dt in
               (("boxes", torch.float64), ("scores", torch.float64), ("labels", torch.long), ("image", torch.long),
                ("token", torch.long))}
        gt = {k: self._cat(getattr(self, f"gt_{k}"), 4 if k == "boxes" else None, dt) for k, dt in
              (("boxes", torch.float64), ("labels", torch.long), ("difficult", torch.bool), ("image", torch.long),
               ("token", torch.long))}
        first: dict[int, int] = {}  # image -> token of the copy kept
        for image, token in zip(gt["image"].tolist() + det["image"].tolist(),
                                gt["token"].tolist() + det["token"].tolist(), strict=True):
            first[image] = min(first.get(image, token), token)
        for rows in (det, gt):
            keep = np.array([first[i] == t for i, t in zip(rows["image"].tolist(), rows["token"].tolist(),
                                                          strict=True)], dtype=bool)
            for k in rows:
                rows[k] = rows[k][keep] if len(keep) else rows[k]
        return det, gt

    def class_aps(self, iou_threshold: float) -> np.ndarray:
        """AP of each class ``[C]`` at one IoU threshold (NaN for a class without non-difficult ground truth)."""
        return self._class_aps(*self._gathered(), iou_threshold)

    def _class_aps(self, det: dict[str, np.ndarray], gt: dict[str, np.ndarray], iou_threshold: float) -> np.ndarray:
        aps = np.full(self.num_classes, np.nan)
        for c in range(1, self.num_classes + 1):
            g = gt["labels"] == c
            npos = int((~gt["difficult"][g]).sum())
            if npos == 0:
                continue
            gt_boxes, gt_difficult, gt_image = gt["boxes"][g], gt["difficult"][g], gt["image"][g]
            per_image = {img: (gt_boxes[gt_image == img], gt_difficult[gt_image == img]) for img in np.unique(gt_image)}
            used = {img: np.zeros(len(v[0]), dtype=bool) for img, v in per_image.items()}
            d = np.where(det["labels"] == c)[0]
            d = d[np.argsort(-det["scores"][d], kind="stable")]
            tp, fp = np.zeros(len(d)), np.zeros(len(d))
            for k, j in enumerate(d):
                img = int(det["image"][j])
                if img not in per_image:
                    fp[k] = 1
                    continue
                boxes, difficult = per_image[img]
                overlaps = _iou(det["boxes"][j], boxes)
                best = int(np.argmax(overlaps))
                if overlaps[best] > iou_threshold:
                    if difficult[best]:
                        continue  # matched a difficult object: neither a true nor a false positive
                    if not used[img][best]:
                        tp[k], used[img][best] = 1, True
                    else:
                        fp[k] = 1  # a duplicate detection of an object already found
                else:
                    fp[k] = 1
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            recall = tp / npos
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            aps[c - 1] = voc_ap(recall, precision, self.use_07_metric)
        return aps

    def compute(self) -> dict[str, float]:
        det, gt = self._gathered()
        maps = []
        for t in np.arange(0.5, 0.951, 0.05):
            aps = self._class_aps(det, gt, float(t))
            maps.append(float(np.nanmean(aps)) if np.any(~np.isnan(aps)) else float("nan"))
        return {"AP": 100.0 * float(np.mean(maps)), "AP50": 100.0 * maps[0], "AP75": 100.0 * maps[5]}


# ------------------------------------------------------------------------------------------ segmentation
def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """``mIoU``, ``mAcc``, ``aAcc`` (percent) from a confusion matrix ``[C, C]`` (rows: label, columns: prediction)."""
    confusion = confusion.double()
    tp = confusion.diag()
    label_count, pred_count = confusion.sum(1), confusion.sum(0)
    union = label_count + pred_count - tp
    iou = tp / union  # NaN where the class is in neither
    acc = tp / label_count  # NaN where the class has no labelled pixel
    total = confusion.sum()
    return {"mIoU": 100.0 * float(iou.nanmean()), "mAcc": 100.0 * float(acc.nanmean()),
            "aAcc": 100.0 * float(tp.sum() / total) if total > 0 else float("nan")}


class SegmentationMetric(Metric):
    """Confusion matrix of predicted vs labelled classes over valid pixels; ``compute`` gives mIoU / mAcc / aAcc."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, prediction: Tensor, label: Tensor) -> None:
        """``prediction``, ``label``: int ``[..., H, W]`` class maps of the same shape."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != self.ignore_index
        index = label[valid].long() * self.num_classes + prediction[valid].long()
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def compute(self) -> dict[str, float]:
        return segmentation_scores(self.confusion)

    def per_class_iou(self) -> Tensor:
        confusion = self.confusion.double()
        tp = confusion.diag()
        return tp / (confusion.sum(0) + confusion.sum(1) - tp)
