"""The paper configs as jobs: each resolved as the CLI resolves it, built on fake tensors, one GPU's step measured.

:func:`measure` gives a config's FLOPs by part and its memory per GPU (:mod:`benchmarks.paper_cost_step` says
how the step runs on fake tensors); ``benchmarks.paper_cost`` projects and reports them.

Every config's step is ``training_step`` + backward on its own batch (the method's views of ``batch_size``
images; a segmentation crop batch), except detection: its proposal stage (anchors, NMS, sampling) has box
counts that depend on values, so the step is sized without it: the backbone, the pyramid and the RPN head run
on the padded image batch, the box head on ``roi_batch_size_per_image`` RoIs per image and the mask head on a
quarter of them (detectron2's positive fraction, their upper bound). FLOPs are counted at the mean of the
training scales, memory at the largest; images are 4:3 (COCO's 640 x 480).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.paper_cost_refs import DATASETS, SUBSETS, Dataset
from benchmarks.paper_cost_step import (
    StepCost,
    build_on_meta,
    default_parts,
    fake_mode,
    measure_step,
    optimizer_state_bytes,
    paper_batch,
    quiet,
    to_fake,
    transformed_sample,
)
from benchmarks.timing import ROOT

MANIFESTS = tuple(f"experiments/{m}/tables.yaml" for m in ("bam_ia", "hvp_mtl", "mpcl", "mvp"))
GIB = 2**30
# Settings that change no tensor shape and no operation of a step (augmentation, optimiser hyperparameters,
# loss weights, temperatures; not momentum, whose buffer is optimiser state): configs that differ only in them
# share one measured step.
SHAPE_FREE = {
    "overlap", "min_scale", "blur", "color_jitter", "randaugment", "rotation", "auto_augment", "re_prob",
    "crop_scale", "label_smoothing", "mask_sampling", "base_lr", "lr", "lr_batch_size", "lr_reference",
    "lr_reference_batch", "head_base_lr", "weight_decay", "betas", "warmup_epochs",
    "warmup_steps", "warmup_ratio", "warmup_lr", "min_lr", "min_lr_ratio", "final_lr_ratio", "lr_schedule",
    "lr_milestones", "lr_gamma", "lr_interval", "poly_power", "nesterov", "layer_decay", "decay_biases",
    "bias_lr_scale", "fix_predictor_lr", "lam", "temperature", "epsilon", "ema_momentum", "ema_cosine",
    "cluster_temperature", "sinkhorn_epsilon", "sinkhorn_iterations", "sinkhorn_clamp_max", "asl_eta",
    "asl_gamma_pos", "asl_gamma_neg", "distill_temperature", "ptb", "ptb_scale", "freeze_prototypes_niters",
    "bt_lambda", "head_init_std", "threshold", "val_interpolation", "teacher_pretrained", "ckpt",
}


# ---------------------------------------------------------------------- configs
@dataclass
class Job:
    """One paper config as the CLI resolves it, with what the cost model reads from it."""

    chain: tuple[str, ...]
    args: tuple[str, ...]
    role: str  # "pretrain" or "eval"
    config: dict[str, Any]
    dataset: Dataset
    train_images: int

    @property
    def label(self) -> str:
        return " + ".join(c.removeprefix("experiments/") for c in self.chain) + (
            f" {' '.join(self.args)}" if self.args else "")

    @property
    def model(self) -> dict[str, Any]:
        return self.config["model"]

    @property
    def trainer(self) -> dict[str, Any]:
        return self.config["trainer"]

    @property
    def batch_size(self) -> int:
        return int(self.config["data"]["init_args"]["batch_size"])

    @property
    def world(self) -> int:
        devices = self.trainer.get("devices")
        devices = len(devices) if isinstance(devices, list) else int(devices)
        return devices * int(self.trainer.get("num_nodes") or 1)

    @property
    def accumulate(self) -> int:
        return int(self.trainer.get("accumulate_grad_batches") or 1)

    @property
    def precision(self) -> str:
        return str(self.trainer.get("precision") or "32-true")

    @property
    def step_precision(self) -> str:
        """Peak the step runs at: bf16 tensor cores, or TF32 (fp32 configs: cuDNN's convolutions use TF32)."""
        return "bf16" if self.precision.startswith(("bf16", "16")) else "tf32"

    def micro_steps(self) -> int:
        """Forward / backward passes of one GPU over the whole schedule."""
        max_steps = int(self.trainer.get("max_steps") or -1)
        if max_steps > 0:
            return max_steps * self.accumulate
        per_epoch = math.ceil(self.train_images / (self.batch_size * self.world))
        return int(self.trainer["max_epochs"]) * per_epoch

    def optimizer_steps(self) -> int:
        return self.micro_steps() // self.accumulate

    def signature(self) -> str:
        """What decides the step's cost: configs with equal signatures share one measurement."""
        init = {k: v for k, v in self.model.get("init_args", {}).items() if k not in SHAPE_FREE}
        data = self.config["data"]
        crop = data["init_args"].get("crop_size")
        return json.dumps([self.model["class_path"], init, self.batch_size, self.step_precision, self.world > 1,
                           data["class_path"], self.dataset.classes, crop], sort_keys=True, default=str)


def manifest_chains(manifests: tuple[str, ...] = MANIFESTS) -> list[tuple[tuple[str, ...], tuple[str, ...], str]]:
    """``(chain, args, role)`` of every pre-training chain and every evaluation chain of the manifests, once each."""
    from ssl_zoo.tables import load_manifest

    seen: dict[tuple, str] = {}
    for path in manifests:
        for _, row in load_manifest(ROOT / path).rows():
            if row.pretrain:
                seen.setdefault((row.pretrain, row.pretrain_args), "pretrain")
            if row.eval:
                seen.setdefault((row.eval, row.eval_args), "eval")
    return [(chain, args, role) for (chain, args), role in seen.items()]


def load_job(chain: tuple[str, ...], args: tuple[str, ...] = (), role: str = "pretrain") -> Job:
    """The resolved config of ``chain`` and the dataset its data section names."""
    from ssl_zoo.tables import resolve_chain

    with quiet():
        config = resolve_chain(chain, args, root=ROOT)
    data = config["data"]
    key = (data["class_path"].rsplit(".", 1)[-1], Path(str(data["init_args"].get("root", ""))).name)
    if key not in DATASETS:
        raise ValueError(f"{' + '.join(chain)}: no training-set size is known for data {key}; add it to "
                         "benchmarks/paper_cost_refs.py DATASETS")
    dataset = DATASETS[key]
    subset = data["init_args"].get("train_subset")
    images = SUBSETS[Path(subset).name] if subset else dataset.train_images
    return Job(tuple(chain), tuple(args), role, config, dataset, images)


# ---------------------------------------------------------------------- building the module and its step
def build_module(job: Job) -> torch.nn.Module:
    """The config's LightningModule on ``meta`` (no weights loaded: ``ckpt`` and the teacher's tag are dropped),
    with the heads the data module's class count would give it."""
    from benchmarks.step_overhead import import_class
    from ssl_zoo.eval.module import EvalModule
    from ssl_zoo.transfer.detection import ObjectDetection
    from ssl_zoo.transfer.module import DenseTransferModule

    cls = import_class(job.model["class_path"])
    args = dict(job.model.get("init_args", {}))
    for key in ("teacher_pretrained", "ckpt"):
        if key in args:
            args[key] = None
    if issubclass(cls, DenseTransferModule):
        args["num_classes"] = job.dataset.classes
        if issubclass(cls, ObjectDetection) and args.get("with_masks") is None:
            args["with_masks"] = job.dataset.masks

    def factory() -> torch.nn.Module:
        model = cls(**args)
        if isinstance(model, EvalModule) and not isinstance(model, DenseTransferModule):
            model.hparams.num_classes = job.dataset.classes
            model.hparams.multilabel = job.dataset.multilabel
            model.setup("fit")  # the head (and fine-tuning's mixup) as the data module's classes give them
        return model

    return build_on_meta(factory)


def classification_batch(model, job: Job, mode) -> dict[str, torch.Tensor]:
    """What the data module feeds one GPU: the method's views of ``batch_size`` images, targets, indices."""
    b = job.batch_size
    batch = paper_batch(transformed_sample(model.train_transform()), b, mode)
    batch["index"] = torch.arange(b)
    if job.dataset.multilabel:
        with mode:
            batch["target"] = torch.empty(b, job.dataset.classes)
    else:
        batch["target"] = torch.zeros(b, dtype=torch.long)
    return batch


def detection_image_size(model, largest: bool) -> tuple[int, int]:
    """Padded input of a 4:3 image at the mean (FLOPs) or largest (memory) training scale, as torchvision's
    transform resizes (shorter side to the scale, longer side capped) and pads (multiples of 32)."""
    sizes = [int(s) for s in model.hparams.min_size]
    short = max(sizes) if largest else sum(sizes) / len(sizes)
    long = min(short * 4 / 3, float(model.hparams.max_size))
    return tuple(int(math.ceil(round(x) / 32) * 32) for x in (short, long))


class RoIPool(torch.nn.Module):
    """RoIAlign of ``boxes`` from one level (a module, so that its output counts to the RoI heads)."""

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, size: int, scale: float) -> torch.Tensor:
        from torchvision.ops import roi_align

        return roi_align(features, boxes, size, scale, 0)


def detection_forward(model, batch_size: int, size: tuple[int, int], mode):
    """One Faster / Mask R-CNN training step without its value-dependent proposal stage (module docstring):
    ``(forward, inputs, pool)``, ``pool`` the RoI pooling module it runs (part of the RoI heads)."""
    rcnn = model.model
    heads = rcnn.roi_heads
    pool = RoIPool()
    with mode:
        images = torch.empty(batch_size, 3, *size)
        rois = batch_size * heads.fg_bg_sampler.batch_size_per_image
        positives = int(rois * heads.fg_bg_sampler.positive_fraction)
        boxes = torch.empty(rois, 5)

    def forward():
        features = rcnn.backbone(images)
        first = next(iter(features.values()))
        objectness, deltas = rcnn.rpn.head(list(features.values()))
        scale = first.shape[-1] / size[-1]
        box_features = heads.box_head(pool(first, boxes, heads.box_roi_pool.output_size[0], scale))
        scores, regression = heads.box_predictor(box_features)
        total = sum(t.float().mean() for t in [*objectness, *deltas]) + scores.float().mean() + \
            regression.float().mean()
        if heads.has_mask():
            mask_features = heads.mask_head(pool(first, boxes[:positives], heads.mask_roi_pool.output_size[0], scale))
            total = total + heads.mask_predictor(mask_features).float().mean()
        return total

    return forward, [images], pool


# Finer parts of some modules -> the table's columns (student, teacher, heads, losses).
COLUMNS = {"teacher_decoder": "teacher", "label_decoder": "heads", "roi_heads": "heads"}


def parts_for(model) -> dict[str, list[torch.nn.Module]]:
    """The parts a step's FLOPs and activations are counted in: :func:`default_parts`, with HVP-MTL's
    Query2Label decoders apart from the rest (student's in the heads, the EMA teacher's in the teacher) and a
    detector's RoI heads apart from the backbone (R50-C4 runs the backbone's res5 there, on every RoI)."""
    from ssl_zoo.methods import HVPMTL
    from ssl_zoo.transfer.detection import ObjectDetection

    parts = default_parts(model)
    if isinstance(model, HVPMTL) and model.decoder is not None:
        teacher = [model.teacher_backbone] if model.teacher_backbone is not None else []
        decoders = [model.teacher_decoder] if model.teacher_decoder is not None else []
        parts = {"student": parts["student"], "teacher": teacher, "teacher_decoder": decoders,
                 "label_decoder": [model.decoder], "losses": parts["losses"]}
    if isinstance(model, ObjectDetection):
        parts = {"roi_heads": [model.model.roi_heads], **parts}
    return parts


def columns(flops: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Fine parts summed into the table's four columns."""
    out = {p: {"forward": 0, "backward": 0} for p in ("student", "teacher", "heads", "losses")}
    for part, value in flops.items():
        for direction in ("forward", "backward"):
            out[COLUMNS.get(part, part)][direction] += value[direction]
    return out


def optimizer_bytes(model, job: Job) -> int:
    from benchmarks.step_overhead import method_optimizer

    with quiet():
        return optimizer_state_bytes(method_optimizer(model, job.batch_size))


def measure(job: Job) -> dict[str, Any]:
    """FLOPs by part and memory of one GPU's step of ``job`` (fake tensors throughout)."""
    from ssl_zoo.transfer.detection import ObjectDetection
    from ssl_zoo.transfer.segmentation import SemanticSegmentation

    start = time.perf_counter()
    mode = fake_mode()
    model = to_fake(build_module(job), mode)
    parts = parts_for(model)
    precision = job.precision
    if isinstance(model, ObjectDetection):
        forward, inputs, pool = detection_forward(model, job.batch_size, detection_image_size(model, False), mode)
        parts["roi_heads"].append(pool)
        flops = measure_step(model, inputs, forward, precision, mode, parts).flops
        size = detection_image_size(model, True)
        forward, inputs, pool = detection_forward(model, job.batch_size, size, mode)
        parts["roi_heads"].append(pool)
        cost = measure_step(model, inputs, forward, precision, mode, parts)
        cost = StepCost(flops=flops, memory=cost.memory, activations_by_part=cost.activations_by_part)
        shape = f"{job.batch_size} x 3 x {size[0]} x {size[1]} (memory), mean scale for FLOPs"
    elif isinstance(model, SemanticSegmentation):
        crop = int(job.config["data"]["init_args"].get("crop_size") or 512)
        with mode:
            batch = {"images": torch.empty(job.batch_size, 3, crop, crop),
                     "targets": torch.empty(job.batch_size, crop, crop, dtype=torch.long)}
        cost = measure_step(model, list(batch.values()), lambda: model.training_step(batch, 0), precision, mode, parts)
        shape = f"{job.batch_size} x 3 x {crop} x {crop}"
    else:
        batch = classification_batch(model, job, mode)
        cost = measure_step(model, list(batch.values()), lambda: model.training_step(batch, 0), precision, mode, parts)
        shape = " ".join(f"{k} {list(v.shape)}" for k, v in batch.items() if v.is_floating_point())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    memory = dict(cost.memory)
    memory["optimizer"] = optimizer_bytes(model, job)
    memory["ddp_buckets"] = trainable if job.world > 1 else 0  # DDP's bucket copy of the gradients
    memory["all_gradients"] = trainable
    memory["total"] = memory["peak"] + memory["optimizer"] + memory["ddp_buckets"]
    return {"flops": columns(cost.flops), "flops_by_part": cost.flops, "memory": memory,
            "activations_by_part": cost.activations_by_part, "inputs": shape, "measure_s": time.perf_counter() - start}
