"""Dense-transfer data: COCO instances, Pascal VOC, ADE20K readers, their joint augmentations and data modules."""

from ssl_zoo.transfer.data.datamodule import ADE20KDataModule, CocoInstancesDataModule, VOCDataModule
from ssl_zoo.transfer.data.datasets import ADE20K, VOC_CLASSES, CocoInstances, VOCDetection, decode_coco_mask

__all__ = ["ADE20K", "VOC_CLASSES", "ADE20KDataModule", "CocoInstances", "CocoInstancesDataModule", "VOCDataModule",
           "VOCDetection", "decode_coco_mask"]
