"""Transfer to dense prediction on pre-trained backbones: object detection and instance segmentation (torchvision
Faster / Mask R-CNN) and semantic segmentation (UperNet), with the data modules of COCO, Pascal VOC and ADE20K.

    python -m ssl_zoo fit --config experiments/transfer/detect_demo.yaml --model.init_args.ckpt <run>/checkpoints/last.ckpt
    python -m ssl_zoo fit --config experiments/transfer/segment_demo.yaml --model.init_args.ckpt <run>/checkpoints/last.ckpt
"""

from ssl_zoo.transfer.data.datamodule import ADE20KDataModule, CocoInstancesDataModule, VOCDataModule
from ssl_zoo.transfer.detection import ObjectDetection
from ssl_zoo.transfer.segmentation import SemanticSegmentation

__all__ = ["ADE20KDataModule", "CocoInstancesDataModule", "ObjectDetection", "SemanticSegmentation", "VOCDataModule"]
