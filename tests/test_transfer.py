"""Dense transfer parts: metrics against independent computations, pyramid strides, layer decay, schedules,
dataset readers and augmentations (the end-to-end runs are in tests/test_transfer_runs.py)."""

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssl_zoo.models.backbones import Backbone
from ssl_zoo.transfer.data.datasets import ADE20K, CocoInstances, VOCDetection
from ssl_zoo.transfer.data.transforms import (
    SegmentationTrainTransform,
    hflip_detection_target,
    rescale_size,
)
from ssl_zoo.transfer.detection import ObjectDetection
from ssl_zoo.transfer.metrics import SegmentationMetric, VOCDetectionMetric, voc_ap
from ssl_zoo.transfer.optim import dense_param_groups, lr_multiplier
from ssl_zoo.transfer.pyramids import (
    build_detection_body,
    build_segmentation_levels,
    dense_model_kwargs,
    measured_strides,
)
from ssl_zoo.transfer.segmentation import SemanticSegmentation, slide_windows

ROOT = Path(__file__).resolve().parents[1]
TINY_SWIN = {"img_size": 64, "model_kwargs": {"window_size": 4, "depths": [1, 1, 1, 1], "embed_dim": 24,
                                              "num_heads": [1, 1, 1, 1], **dense_model_kwargs("swin")}}
TINY_VIT = {"img_size": 64, "model_kwargs": {"depth": 4, **dense_model_kwargs("vit")}}


# --------------------------------------------------------------------------------------------- COCO AP
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


# --------------------------------------------------------------------------------------------- VOC AP
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


# --------------------------------------------------------------------------------------------- mIoU
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


# --------------------------------------------------------------------------------------------- pyramids
@pytest.mark.parametrize("family", ["resnet", "swin", "vit"])
def test_every_backbone_family_builds_pyramids_with_the_right_strides(family):
    name, kwargs = {"resnet": ("resnet18", {}), "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN),
                    "vit": ("vit_tiny_patch16_224", TINY_VIT)}[family]
    backbone = Backbone(name, **kwargs)
    size = (64, 128)  # not the pre-training size, not square
    seg = build_segmentation_levels(backbone)
    assert seg.strides == measured_strides(seg, size) == [4, 8, 16, 32]
    out = seg(torch.zeros(1, 3, *size))
    assert [m.shape[1] for m in out] == list(seg.channels)
    pyramids = {"resnet": ["fpn", "c4"], "swin": ["fpn"], "vit": ["simple_fpn"]}[family]
    for pyramid in pyramids:
        body = build_detection_body(backbone, pyramid, out_channels=32)
        expected = [16] if pyramid == "c4" else [4, 8, 16, 32, 64]
        assert body.strides == measured_strides(body, size) == expected, pyramid
        maps = body(torch.zeros(1, 3, *size))
        assert all(m.shape[1] == body.out_channels for m in maps.values())
    with pytest.raises(ValueError, match="does not fit"):
        build_detection_body(backbone, "c4" if family != "resnet" else "simple_fpn")


# --------------------------------------------------------------------------------------------- layer decay
def _lr_and_weight_decay(module, groups) -> tuple[dict[str, float], dict[str, float]]:
    """{parameter name: lr} and {parameter name: weight decay} of optimiser groups; each parameter in one group."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    lr_of, wd_of = {}, {}
    for group in groups:
        for param in group["params"]:
            name = name_of[id(param)]
            assert name not in lr_of, f"{name} in two groups"
            lr_of[name], wd_of[name] = group["lr"], group["weight_decay"]
    return lr_of, wd_of


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_vit_layer_decay_gives_each_block_its_lr(task):
    """BEiT / ViTDet: lr of block i = lr * d^(L - i) (ids 1..L), embeddings d^(L + 1), everything after the
    blocks (final norm, neck, heads) the full lr; no weight decay on norms, position embedding, class token."""
    decay, lr, depth = 0.5, 1.0, 4
    if task == "segmentation":
        module = SemanticSegmentation(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, num_classes=3,
                                      channels=16, aux_channels=8, layer_decay=decay)
    else:
        module = ObjectDetection(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, num_classes=3,
                                 with_masks=True, pyramid="simple_fpn", layer_decay=decay, fpn_channels=16,
                                 head_dim=16, fc_dim=32)
    groups = dense_param_groups(module, module.backbone, lr, weight_decay=0.05, layer_decay=decay,
                                decay_biases=False)
    lr_of, wd_of = _lr_and_weight_decay(module, groups)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(lr_of) == trainable
    checked_blocks = set()
    for name, value in lr_of.items():
        timm_name = name.split("backbone.model.", 1)[1] if "backbone.model." in name else None
        if timm_name and timm_name.startswith("blocks."):
            block = int(timm_name.split(".")[1])
            assert value == pytest.approx(lr * decay ** (depth - block)), name
            checked_blocks.add(block)
        elif timm_name and timm_name.startswith(("patch_embed.", "pos_embed", "cls_token")):
            assert value == pytest.approx(lr * decay ** (depth + 1)), name
        else:  # final norm, neck, heads
            assert value == pytest.approx(lr), name
        if name.endswith(("pos_embed", "cls_token", ".bias")) or ".norm" in name:
            assert wd_of[name] == 0.0, name
    assert checked_blocks == set(range(depth))
    assert any(v == 0.05 for v in wd_of.values())


def test_weight_decay_of_biases_follows_each_recipe():
    """detectron2 / mmdet (decay_biases): norms by module type go without weight decay, biases and BEiT's other
    1-D tensors (layer-scale gammas, q / v biases) take it. BEiT's segmentation recipe (decay_biases=False,
    ``len(param.shape) == 1 or name.endswith(".bias")``): no 1-D tensor does (timm's weight_decay_exclude_1d)."""
    beit = {"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2, "init_values": 0.1,
                                             **dense_model_kwargs("beit")}}
    module = SemanticSegmentation(backbone="beit_base_patch16_224", backbone_kwargs=beit, num_classes=3, channels=16,
                                  aux_channels=8)
    module.build_head(3)
    one_d = ("gamma_1", "gamma_2", "q_bias", "v_bias", "proj.bias")
    for decay_biases in (True, False):
        _, wd_of = _lr_and_weight_decay(module, dense_param_groups(module, module.backbone, 1.0, 0.05,
                                                                   decay_biases=decay_biases))
        block = {n: wd for n, wd in wd_of.items() if ".blocks.0." in n}
        assert {wd for n, wd in block.items() if n.endswith(one_d)} == {0.05 if decay_biases else 0.0}
        assert {wd for n, wd in block.items() if ".norm" in n} == {0.0}
        assert {wd for n, wd in block.items() if n.endswith("qkv.weight")} == {0.05}
        assert not any(v for n, v in wd_of.items() if n.endswith(("pos_embed", "cls_token", "bias_table")))


def test_resnet_neck_and_heads_sit_one_layer_after_the_last_block():
    """BEiT's numbering on a ResNet: stem 0, blocks 1..L, everything after the blocks (neck, heads) L + 1, so the
    last block already takes one decay step (the headless timm ResNet has no parameter of its own at L + 1)."""
    module = ObjectDetection(backbone="resnet18", num_classes=3, pyramid="fpn", layer_decay=0.5, fpn_channels=16,
                             head_dim=16, fc_dim=32)
    module.build_head(3)
    lr_of, _ = _lr_and_weight_decay(module, dense_param_groups(module, module.backbone, 1.0, 0.05, layer_decay=0.5))
    resnet = {n.split("backbone.model.", 1)[1]: v for n, v in lr_of.items() if "backbone.model." in n}
    assert resnet["layer4.1.conv1.weight"] == pytest.approx(0.5) and resnet["layer1.0.conv1.weight"] == 0.5 ** 8
    assert resnet["conv1.weight"] == 0.5 ** 9
    assert {v for n, v in lr_of.items() if "backbone.model." not in n} == {1.0}


def test_lr_schedules_follow_detectron2_and_mmcv():
    # detectron2 WarmupMultiStepLR: factor 0.001 -> 1 linearly over the warmup, x0.1 at each milestone.
    kwargs = dict(total_steps=900, schedule="multistep", warmup_steps=100, warmup_ratio=0.001,
                  milestones=(2 / 3, 8 / 9), gamma=0.1)
    assert lr_multiplier(0, **kwargs) == pytest.approx(0.001)
    assert lr_multiplier(50, **kwargs) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_multiplier(599, **kwargs) == pytest.approx(1.0)
    assert lr_multiplier(600, **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(800, **kwargs) == pytest.approx(0.01)
    # mmcv poly (power 1, min 0) with linear warmup from 1e-6.
    poly = dict(total_steps=1000, schedule="poly", warmup_steps=10, warmup_ratio=1e-6, power=1.0)
    assert lr_multiplier(500, **poly) == pytest.approx(0.5)
    assert lr_multiplier(5, **poly) == pytest.approx((1 - 5 / 1000) * (1e-6 * 0.5 + 0.5))


# --------------------------------------------------------------------------------------------- readers
def _write_image(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(path)


def test_coco_instances_reads_polygons_rle_and_crowds(tmp_path):
    h, w = 20, 30
    _write_image(tmp_path / "img" / "a.jpg", w, h)
    square = np.zeros((h, w), dtype=np.uint8)
    square[2:8, 3:9] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")
    runs = [0 * 0]  # uncompressed RLE (column-major run lengths) of the rectangle rows 10..14, columns 20..24
    flat = np.zeros((h, w), dtype=np.uint8)
    flat[10:15, 20:25] = 1
    values = flat.ravel(order="F")
    runs, current, count = [], 0, 0
    for v in values:
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    runs.append(count)
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": w, "height": h}],
        "categories": [{"id": 9, "name": "late"}, {"id": 3, "name": "early"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [3, 2, 6, 6], "area": 36, "iscrowd": 0,
             "segmentation": compressed},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [1, 12, 10, 6], "area": 30, "iscrowd": 0,
             "segmentation": [[1, 12, 11, 12, 11, 18, 1, 18]]},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [20, 10, 5, 5], "area": 25, "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": runs}},
            {"id": 4, "image_id": 7, "category_id": 3, "bbox": [25, 0, 0, 4], "area": 0, "iscrowd": 0,
             "segmentation": []},  # no area: dropped
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    dataset = CocoInstances(tmp_path / "img", tmp_path / "ann.json", with_masks=True)
    image, target, _, _ = dataset.load_sample(0)
    assert dataset.classes == ["early", "late"]
    assert target["labels"].tolist() == [2, 1, 1]  # category 9 -> label 2, 3 -> 1
    assert target["iscrowd"].tolist() == [0, 0, 1]
    assert torch.equal(target["masks"][0], torch.from_numpy(square))
    assert target["masks"][1].sum() > 0 and target["masks"][1][12:18, 1:11].float().mean() > 0.8
    assert torch.equal(target["masks"][2], torch.from_numpy(flat))
    assert target["boxes"][1].tolist() == [1, 12, 11, 18]
    flipped = hflip_detection_target(target, w)
    assert flipped["boxes"][0].tolist() == [w - 9, 2, w - 3, 8]
    assert torch.equal(flipped["masks"][0], torch.from_numpy(square[:, ::-1].copy()))


def test_voc_reads_two_years_with_detectron2_boxes(tmp_path):
    for year, names in (("2007", ["000001"]), ("2012", ["2008_000002", "2008_000003"])):
        base = tmp_path / f"VOC{year}"
        (base / "ImageSets" / "Main").mkdir(parents=True)
        (base / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(names) + "\n")
        (base / "Annotations").mkdir()
        for name in names:
            _write_image(base / "JPEGImages" / f"{name}.jpg", 50, 40)
            (base / "Annotations" / f"{name}.xml").write_text(
                "<annotation><object><name>dog</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>6</ymin>"
                "<xmax>20</xmax><ymax>30</ymax></bndbox></object><object><name>person</name><bndbox><xmin>1</xmin>"
                "<ymin>1</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object></annotation>")
    dataset = VOCDetection(tmp_path, "2007-trainval+2012-trainval")
    assert len(dataset) == 3
    _, target, _, _ = dataset.load_sample(2)
    assert target["boxes"].tolist() == [[4, 5, 20, 30], [0, 0, 50, 40]]
    assert target["labels"].tolist() == [12, 15] and target["difficult"].tolist() == [1, 0]
    with pytest.raises(FileNotFoundError, match="2007-test"):
        VOCDetection(tmp_path, "2007-test")


def test_ade20k_reduce_zero_label_and_bad_label(tmp_path):
    for split in ("training",):
        _write_image(tmp_path / "images" / split / "a.jpg", 6, 4)
        label = np.array([[0, 1, 2, 3, 0, 1]] * 4, dtype=np.uint8)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(label).save(tmp_path / "annotations" / split / "a.png")
    _, target, _, _ = ADE20K(tmp_path, "training", num_classes=3).load_sample(0)
    assert target[0].tolist() == [255, 0, 1, 2, 255, 0]
    with pytest.raises(ValueError, match="outside the 2 classes"):
        ADE20K(tmp_path, "training", num_classes=2).load_sample(0)


def test_segmentation_train_transform_geometry():
    """A crop of the rescaled image; the label moves with the image; small images are padded with 255."""
    torch.manual_seed(0)
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (30, 1, 3)))
    label = np.tile(np.arange(40, dtype=np.uint8)[None, :] // 10, (30, 1))  # 4 vertical bands
    transform = SegmentationTrainTransform(crop_size=32, scale=(40, 30), ratio_range=(1.0, 1.0), photometric=False,
                                           flip_prob=0.0)
    pixels, target = transform(image, label)
    assert pixels.shape == (3, 32, 32) and target.shape == (32, 32)
    assert (target[30:] == 255).all()  # 30 rows, padded to 32
    # every column of the crop holds one band, and the image's grey level agrees with it
    grey = pixels[0, 0] * 0.229 * 255 + 0.485 * 255
    assert torch.equal(target[0], (grey.round().long() // 10).clamp(max=3))
    assert rescale_size(2000, 1000, (2048, 512)) == (1024, 512)
    assert rescale_size(500, 400, (2048, 512)) == (640, 512)


def test_slide_windows_cover_the_image_like_mmseg():
    windows = slide_windows(600, 1000, 512, 341)
    assert len(windows) == 2 * 3 and all(y2 - y1 == 512 and x2 - x1 == 512 for y1, y2, x1, x2 in windows)
    cover = np.zeros((600, 1000), dtype=int)
    for y1, y2, x1, x2 in windows:
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert slide_windows(100, 200, 512, 341) == [(0, 100, 0, 200)]
    assert math.isclose(len(slide_windows(512, 512, 512, 341)), 1)


def test_the_recipes_the_paper_manifests_name_exist():
    """The papers' table manifests point at these paths; tests/test_cli.py parses every one of them."""
    names = ["detect_demo", "segment_demo", "coco_maskrcnn_r50_c4_1x", "coco_maskrcnn_r50_fpn_1x",
             "coco_maskrcnn_swint_fpn_1x", "coco_maskrcnn_swins_fpn_1x", "coco_maskrcnn_swinb_fpn_1x",
             "coco_maskrcnn_vitb_simplefpn_1x", "voc_fasterrcnn_r50_c4_24k", "ade20k_upernet_vitb_160k",
             "ade20k_upernet_vitb_160k_mvp", "ade20k_upernet_beit_base_160k", "ade20k_upernet_vitl_160k", "ade20k_upernet_swinb_160k",
             # BAM+IA-CLoss Table 3: MoCo's R50-C4 recipes at the paper's batch of 8
             "voc_fasterrcnn_r50_c4_24k_batch8", "coco_maskrcnn_r50_c4_1x_batch8"]
    found = {p.stem for p in (ROOT / "experiments" / "transfer").glob("*.yaml")}
    assert found == set(names)
