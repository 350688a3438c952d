"""The published numbers ``benchmarks.paper_cost`` projects with and checks against, each with its source.

* :data:`DATASETS`: training-set sizes of the datasets the paper configs name (steps per epoch).
* :data:`GPUS`: the GPUs projected on and checked with, their peaks from ``benchmarks.timing.PEAK_TFLOPS``.
* :data:`MFU_SOURCE`: the throughput measurements the assumed MFU is derived from (NVIDIA's published
  ResNet-50 training speed, turned into MFU with our own FLOP count of a ResNet-50 training step).
* :data:`CHECKS`: published training costs of reference implementations of configs the project has.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.timing import PEAK_TFLOPS


@dataclass(frozen=True)
class Dataset:
    name: str
    train_images: int
    classes: int
    multilabel: bool = False
    masks: bool = False  # instance masks (COCO detection)
    source: str = ""


# (data module class, root directory name) -> the dataset; sizes are the published training splits.
DATASETS: dict[tuple[str, str], Dataset] = {
    ("ImageFolderDataModule", "imagenet"): Dataset("ImageNet-1K", 1_281_167, 1000, source="ILSVRC-2012 train split"),
    ("ImageFolderDataModule", "imagenet100"): Dataset(
        "ImageNet-100", 126_689, 100, source="CMC's 100-class subset of the ILSVRC-2012 train split"),
    ("CocoDataModule", "coco"): Dataset(
        "COCO train2017 (annotated)", 117_266, 80, multilabel=True,
        source="experiments/bam_ia/r50_coco_paper.yaml: the 117,266 annotated train2017 images"),
    ("TencentMLDataModule", "tencent-ml-images"): Dataset(
        "Tencent ML-Images", 17_609_752, 11_166, multilabel=True,
        source="experiments/hvp_mtl/swinb_tencentml_30ep.yaml: 17,609,752 training images"),
    ("CocoInstancesDataModule", "coco"): Dataset(
        "COCO train2017 instances", 117_266, 80, masks=True,
        source="train2017 images with annotations, as detectron2 trains"),
    ("VOCDataModule", "VOCdevkit"): Dataset("VOC07+12 trainval", 16_551, 20, source="VOC2007 + VOC2012 trainval"),
    ("ADE20KDataModule", "ADEChallengeData2016"): Dataset("ADE20K", 20_210, 150, source="ADEChallengeData2016 train"),
}
# ImageNet subsets of SimCLR's semi-supervised protocol (data.init_args.train_subset).
SUBSETS = {"1percent.txt": 12_811, "10percent.txt": 128_116}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: int
    peak_key: str  # its entry in benchmarks.timing.PEAK_TFLOPS (dense data-sheet peaks)

    def peak_tflops(self, precision: str) -> float:
        return dict(PEAK_TFLOPS)[self.peak_key][precision]


GPUS = {
    "A100-80GB": GPU("A100 80GB", 80, "A100"),
    "H100": GPU("H100 SXM 80GB", 80, "H100"),
    "V100": GPU("V100 SXM2", 32, "V100"),
}
PROJECTED = ("A100-80GB", "H100")  # the GPUs every config is projected on

# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance
# results", 1 GPU, images/s at batch 256 (AMP) / 112 (FP32): DGX A100 80GB, DGX-1 16GB (V100).
MFU_SOURCE = {
    ("A100-80GB", "bf16"): 2470.0,  # "Throughput - mixed precision"
    ("A100-80GB", "tf32"): 938.0,   # "Throughput - TF32"
    ("V100", "fp16"): 1200.0,       # "Throughput - mixed precision"
    ("V100", "32"): 367.0,          # "Throughput - FP32"
}
MFU_SOURCE_TEXT = ("NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, 'Training performance results', "
                   "1 GPU: A100 80GB 2,470 img/s mixed precision / 938 img/s TF32; V100 16GB 1,200 img/s "
                   "mixed precision / 367 img/s FP32")
# H100: no figure in that README; the A100 MFU is assumed (an H100's 3.2x higher peak is harder to fill, so
# its projection is the optimistic one).
MFU_FALLBACK = {"H100": "A100-80GB"}


@dataclass(frozen=True)
class Check:
    """A published training cost of a reference implementation of one of our configs."""

    name: str
    chain: tuple[str, ...]
    gpu: str  # key of GPUS
    precision: str  # key of GPU.peak_tflops the reference trained in
    gpus: int
    source: str
    hours: float | None = None  # wall time of the whole schedule
    seconds_per_step: float | None = None  # or the time of one iteration
    images: int = 0  # training images and epochs of the schedule (with ``hours``)
    epochs: int = 0
    memory_gb: float | None = None  # published training memory per GPU
    leave_out: tuple[str, ...] = ()  # parts of our step the reference does not run
    args: tuple[str, ...] = ()  # overrides that make our config the reference's architecture
    note: str = ""


# detectron2's baselines freeze the stem and res2 (FREEZE_AT 2) and use frozen BN; our MoCo recipes train
# everything with SyncBN. The checks run our configs with the stem and res2 frozen (their BN still normalises
# with batch statistics, which frozen BN does not).
D2_FREEZE = ("--model.init_args.freeze_at", "2")
D2_NOTE = "our config with detectron2's FREEZE_AT 2 (stem and res2 frozen)"

CHECKS = (
    Check("MoCo v2, ResNet-50, ImageNet-1K, 200 epochs", ("experiments/mocov2/r50_in1k.yaml",), "V100", "32", 8,
          "facebookresearch/moco README.md: 'pre-train time 53 hours' (200 epochs, 8 NVIDIA V100; main_moco.py "
          "trains in fp32)", hours=53.0, images=1_281_167, epochs=200),
    Check("BEiT-B, ImageNet-1K, 800 epochs (500k steps at batch 2,048)", ("experiments/mvp/vitb16_in1k_300ep.yaml",),
          "V100", "fp16", 16,
          "BEiT paper (Bao et al., ICLR 2022) §2.5: 'The 500k training steps take about five days using 16 Nvidia "
          "Telsa V100 32GB GPU cards'", hours=120.0, images=1_281_167, epochs=800,
          leave_out=("teacher",),
          note="our MVP ViT-B step without its CLIP teacher is BEiT's student step (BEiT's head maps to 8,192 "
               "codes, MVP's to CLIP's 512 dimensions); BEiT's DALL-E tokenizer forward is not counted"),
    Check("Mask R-CNN R50-C4 1x, COCO (detectron2)", ("experiments/transfer/coco_maskrcnn_r50_c4_1x.yaml",), "V100",
          "32", 8, "detectron2 MODEL_ZOO.md, mask_rcnn_R_50_C4_1x: train time 0.584 s/iter, train mem 5.2 GB "
          "(8 V100, 2 images per GPU, fp32)", seconds_per_step=0.584, memory_gb=5.2, args=D2_FREEZE,
          note=D2_NOTE + "; torchvision's Mask R-CNN runs res5 again on the positive RoIs for the mask branch, "
               "where detectron2's Res5ROIHeads reuses the box branch's res5 features"),
    Check("Mask R-CNN R50-FPN 1x, COCO (detectron2)", ("experiments/transfer/coco_maskrcnn_r50_fpn_1x.yaml",),
          "V100", "32", 8, "detectron2 MODEL_ZOO.md, mask_rcnn_R_50_FPN_1x: train time 0.261 s/iter, train mem "
          "3.4 GB (8 V100, 2 images per GPU, fp32)", seconds_per_step=0.261, memory_gb=3.4,
          args=(*D2_FREEZE, "--model.init_args.box_head", "2fc", "--model.init_args.head_norm", "none",
                "--model.init_args.fpn_norm", "none"),
          note=D2_NOTE + "; and detectron2's baseline heads: 2fc box head, no normalisation in the FPN and heads "
               "(our recipe: 4conv1fc with SyncBN)"),
    Check("Faster R-CNN R50-C4, VOC07+12 (detectron2)",
          ("experiments/transfer/voc_fasterrcnn_r50_c4_24k_batch8.yaml",), "V100", "32", 8,
          "detectron2 MODEL_ZOO.md, PascalVOC-Detection faster_rcnn_R_50_C4: train time 0.537 s/iter, train mem "
          "4.8 GB (8 V100, 2 images per GPU, fp32)", seconds_per_step=0.537, memory_gb=4.8, args=D2_FREEZE,
          note=D2_NOTE),
)
