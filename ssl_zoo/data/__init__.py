"""Dataset readers for the real formats (COCO, Tencent ML-Images, class-per-folder), streaming shards of them
(:mod:`ssl_zoo.data.shard`, :class:`StreamingDataModule`) and the demo data."""

from ssl_zoo.data.bad_sample_policy import BadSamplePolicy
from ssl_zoo.data.coco import CocoMultiLabel, read_coco_multilabel
from ssl_zoo.data.datamodule import (
    CocoDataModule,
    ImageFolderDataModule,
    PretrainDataModule,
    TencentMLDataModule,
    ViewDataset,
    eval_transform,
)
from ssl_zoo.data.decode import BadImageError, load_image, set_max_image_pixels
from ssl_zoo.data.demo_images import DEMO_CLASSES, SUPERCLASSES
from ssl_zoo.data.folder import ImageFolderDataset
from ssl_zoo.data.image_list import ImageListDataset
from ssl_zoo.data.streaming import ShardDataset, StreamingDataModule
from ssl_zoo.data.tencent import TencentClass, TencentML, parse_tencent_line, read_tencent_dictionary


def __getattr__(name: str):
    # The demo generator is imported on first use, so `python -m ssl_zoo.data.demo` runs the module once.
    if name == "make_demo_dataset":
        from ssl_zoo.data.demo import make_demo_dataset

        return make_demo_dataset
    raise AttributeError(f"module 'ssl_zoo.data' has no attribute {name!r}")


__all__ = [
    "DEMO_CLASSES",
    "SUPERCLASSES",
    "BadImageError",
    "BadSamplePolicy",
    "CocoDataModule",
    "CocoMultiLabel",
    "ImageFolderDataModule",
    "PretrainDataModule",
    "ShardDataset",
    "StreamingDataModule",
    "TencentMLDataModule",
    "ViewDataset",
    "eval_transform",
    "ImageFolderDataset",
    "ImageListDataset",
    "TencentClass",
    "TencentML",
    "load_image",
    "make_demo_dataset",
    "parse_tencent_line",
    "read_coco_multilabel",
    "read_tencent_dictionary",
    "set_max_image_pixels",
]
