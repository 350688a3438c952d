"""Dense transfer metrics (``ssl_zoo.transfer.metrics``): box and mask AP against pycocotools' COCOeval, VOC AP
by hand, mIoU against a brute-force count."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssl_zoo.transfer.detection import ObjectDetection
from ssl_zoo.transfer.metrics import SegmentationMetric, VOCDetectionMetric, voc_ap


def _polygon_mask(polygon: list[float], h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w)))


def _hand_made_coco():
    """Two 40x48 images: ground truth with polygons, one crowd region (RLE), and scored detections."""
    h, w = 40, 48
    gt = [  # image id, class, polygon, iscrowd
        (1, 1, [2, 2, 20, 2, 20, 18, 2, 18], 0),
        (1, 2, [24, 4, 44, 4, 44, 30, 24, 30], 0),
        (1, 1, [4, 24, 16, 24, 10, 38], 0),
        (2, 1, [5, 5, 30, 5, 30, 35, 5, 35], 0),
        (2, 2, [32, 2, 46, 2, 46, 38, 32, 38], 1),  # a crowd: detections on it are ignored
    ]
    dets = [  # image id, class, box xyxy, score, mask polygon
        (1, 1, [2, 2, 20, 18], 0.95, [2, 2, 20, 2, 20, 18, 2, 18]),
        (1, 1, [3, 3, 19, 19], 0.60, [3, 3, 19, 3, 19, 19, 3, 19]),       # duplicate of the first
        (1, 2, [22, 6, 44, 28], 0.80, [22, 6, 44, 6, 44, 28, 22, 28]),      # shifted
        (1, 1, [5, 26, 15, 37], 0.30, [5, 26, 15, 26, 10, 37]),
        (1, 2, [2, 22, 18, 38], 0.70, [2, 22, 18, 22, 18, 38, 2, 38]),      # wrong class
        (2, 1, [6, 6, 28, 33], 0.85, [6, 6, 28, 6, 28, 33, 6, 33]),
        (2, 2, [33, 3, 45, 36], 0.90, [33, 3, 45, 3, 45, 36, 33, 36]),      # on the crowd
        (2, 1, [34, 10, 44, 20], 0.40, [34, 10, 44, 10, 44, 20, 34, 20]),   # inside the crowd, other class
    ]
    return h, w, gt, dets


def _pycocotools_stats(h, w, gt, dets, iou_type):
    images = [{"id": i, "width": w, "height": h} for i in (1, 2)]
    annotations = []
    for n, (image, cls, polygon, crowd) in enumerate(gt, 1):
        m = _polygon_mask(polygon, h, w)
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        ys, xs = np.nonzero(m)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        annotations.append({"id": n, "image_id": image, "category_id": cls, "iscrowd": crowd,
                            "area": float(m.sum()), "bbox": box, "segmentation": rle if crowd else [polygon]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    results = []
    for image, cls, (x1, y1, x2, y2), score, polygon in dets:
        rle = mask_utils.encode(np.asfortranarray(_polygon_mask(polygon, h, w)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image, "category_id": cls, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score,
                        "segmentation": rle})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats, annotations


class _Fixed(torch.nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, images):
        return self.outputs


def test_box_and_mask_ap_match_pycocotools_cocoeval():
    """The detection module's validation path (torchvision-style outputs -> torchmetrics) gives COCOeval's AP."""
    h, w, gt, dets = _hand_made_coco()
    module = ObjectDetection(backbone="resnet18", pyramid="fpn", num_classes=2, with_masks=True, min_size=(64,),
                             max_size=64, fpn_channels=16, head_dim=16, fc_dim=32)
    from ssl_zoo.transfer.metrics import coco_detection_metric, coco_metric_names

    module.metric = coco_detection_metric(True)
    _, annotations = _pycocotools_stats(h, w, gt, dets, "bbox")
    targets, predictions = [], []
    for image in (1, 2):
        anns = [a for a in annotations if a["image_id"] == image]
        masks = [mask_utils.decode(a["segmentation"]) if a["iscrowd"] else _polygon_mask(a["segmentation"][0], h, w)
                 for a in anns]
        targets.append({
            "boxes": torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                   for a in anns]),
            "labels": torch.tensor([a["category_id"] for a in anns]),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.uint8),
            "area": torch.tensor([a["area"] for a in anns]),
            "masks": torch.from_numpy(np.stack(masks)),
        })
        mine = [d for d in dets if d[0] == image]
        predictions.append({
            "boxes": torch.tensor([d[2] for d in mine], dtype=torch.float32),
            "labels": torch.tensor([d[1] for d in mine]),
            "scores": torch.tensor([d[3] for d in mine]),
            # torchvision's mask probabilities [N, 1, H, W]: the module thresholds them at 0.5
            "masks": torch.from_numpy(np.stack([_polygon_mask(d[4], h, w) for d in mine])).float()[:, None] * 0.9,
        })
    module.model = _Fixed(predictions)  # the detector's outputs, hand-made
    module.validation_step({"images": [torch.zeros(3, h, w)] * 2, "targets": targets}, 0)
    ours = coco_metric_names(module.metric.compute(), with_masks=True)
    for iou_type in ("bbox", "segm"):
        stats, _ = _pycocotools_stats(h, w, gt, dets, iou_type)
        expected = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], stats[:6], strict=True))
        for name, value in expected.items():
            want = value if value < 0 else 100.0 * value
            assert ours[f"{iou_type}_{name}"] == pytest.approx(want, abs=1e-4), (iou_type, name)  # float32 results
    assert 0 < ours["bbox_AP"] < 100 and ours["segm_AP50"] > 0  # a non-trivial example


def test_voc_ap_hand_computed_with_difficult_and_duplicates():
    """One class, npos = 2 (the difficult object does not count): TP, duplicate FP, difficult (ignored),
    FP on another image, TP -> recall [.5, .5, .5, 1], precision [1, .5, 1/3, .5]."""
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 1]),
         "difficult": torch.tensor([0, 1], dtype=torch.uint8), "image_id": torch.tensor(0)},
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
         "difficult": torch.tensor([0], dtype=torch.uint8), "image_id": torch.tensor(1)},
    ]
    preds = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]]), "scores": torch.tensor([0.9, 0.8, 0.7]),
         "labels": torch.tensor([1, 1, 1])},
        {"boxes": torch.tensor([[40.0, 40, 50, 50], [0, 0, 10, 10]]), "scores": torch.tensor([0.6, 0.5]),
         "labels": torch.tensor([1, 1])},
    ]
    metric = VOCDetectionMetric(num_classes=1)
    metric.update(preds, targets)
    assert metric.class_aps(0.5)[0] == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)  # 11-point
    metric_2010 = VOCDetectionMetric(num_classes=1, use_07_metric=False)
    metric_2010.update(preds, targets)
    assert metric_2010.class_aps(0.5)[0] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)  # area under the envelope
    # An image seen twice (a padded distributed shard) counts once.
    metric.update(preds[1:], targets[1:])
    assert metric.class_aps(0.5)[0] == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    result = metric.compute()
    assert result["AP50"] == pytest.approx(100 * 8.5 / 11) and result["AP"] <= result["AP50"]


def test_voc_ap_curve_closed_forms():
    recall, precision = np.array([0.25, 0.5, 1.0]), np.array([1.0, 1.0, 0.5])
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 + 5 * 0.5) / 11)


def test_segmentation_metric_matches_brute_force_count():
    rng = np.random.default_rng(0)
    c = 5
    label = rng.integers(0, c - 1, size=(3, 17, 19))  # class 4 never labelled ...
    label[:, :2] = 255  # ... some pixels ignored
    pred = rng.integers(0, c - 1, size=label.shape)
    pred[0, 5, :4] = 4  # ... but predicted a few times: IoU 0, counted; no class-3-free trick needed
    metric = SegmentationMetric(c + 1)  # class 5: neither labelled nor predicted -> left out of the means
    for b in range(3):
        metric.update(torch.from_numpy(pred[b]), torch.from_numpy(label[b]))
    result = metric.compute()
    ious, accs, correct, valid = [], [], 0, 0
    for k in range(c + 1):
        tp = fp = fn = 0
        for p, t in zip(pred.ravel().tolist(), label.ravel().tolist(), strict=True):
            if t == 255:
                continue
            tp += p == k and t == k
            fp += p == k and t != k
            fn += p != k and t == k
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
        if tp + fn:
            accs.append(tp / (tp + fn))
    for p, t in zip(pred.ravel().tolist(), label.ravel().tolist(), strict=True):
        if t != 255:
            valid += 1
            correct += p == t
    assert len(ious) == c and len(accs) == c - 1
    assert result["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert result["mAcc"] == pytest.approx(100 * np.mean(accs))
    assert result["aAcc"] == pytest.approx(100 * correct / valid)
