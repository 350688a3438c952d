"""Training-step throughput against the compute limit, per method, with lightly's SimSiam and MoCo as peers.

    python -m benchmarks.step_overhead --method all --json benchmarks/results/step_overhead.json
    python -m benchmarks.step_overhead --method bam_ia --model-args '{"backbone": "resnet50", "img_size": 224}'
    python -m benchmarks.step_overhead --method mvp --device cuda --precision bf16 --compile --warmup 5   # GPU

For each method, in one process and on one batch built with the method's own ``train_transform()`` from the
demo JPEGs of its demo config (``experiments/<method>/demo.yaml``, model args overridable):

* ``step_s``: one full training step under a Lightning ``Trainer`` (the loop users run: ``training_step``,
  backward, optimiser and lr-scheduler step, the method's ``on_train_batch_end`` EMA update, ``self.log``
  bookkeeping; no logger I/O, the batch already on the device), timed between consecutive
  ``on_train_batch_start`` calls;
* ``module_step_s``: the same step without the Trainer (``training_step`` + backward + the method's
  optimiser step + EMA update), which isolates Lightning's own share;
* ``limit_s``: the unavoidable network compute of that step -- a bare timm forward + backward of a copy of
  the student backbone over exactly the views the student encodes (same calls, same shapes), plus the
  no-grad forward of every teacher (momentum encoder, CLIP tower) over the views it sees;
* ``ratio``: step / limit (1.0 would mean the heads, losses, optimiser and loop cost nothing), the median of
  the per-step ratios of paired measurements (see below); ``module_ratio`` likewise for the module step.

Peers: ``lightly_simsiam`` and ``lightly_moco`` are lightly's reference SimSiam and MoCo training steps
(lightly's heads, ``NegativeCosineSimilarity`` / ``NTXentLoss`` with a memory bank, ``update_momentum``), written
as in lightly's Lightning examples, on a copy of the same timm backbone and the very same batch as
ssl_zoo's ``simsiam`` and ``mocov2``, with their own limit, timed the same way.

Timings are paired so that a shared or noisy machine hits both sides of a ratio alike: every module step is
timed right after a limit step, and every Trainer step right after a limit step run in an
``on_train_batch_start`` callback (outside the step's own interval). ``--rounds`` rounds (a fresh optimiser
and a fresh ``Trainer.fit`` each) of ``--steps`` pairs after ``--warmup`` pairs; the times reported are medians
over all pairs (``limit_s`` over the limit steps of both kinds of pairs), the raw pairs are in the JSON. FLOPs of one module step and one limit step are counted with
``torch.utils.flop_counter.FlopCounterMode`` (eager); on a GPU with a known peak (``timing.PEAK_TFLOPS`` or
``--peak-tflops``) the JSON also holds MFU.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import default_collate

from benchmarks.timing import ROOT, autocast, environment, peak_flops, synchronizer, timed, write_json

METHODS: dict[str, str] = {
    name: f"experiments/{name}/demo.yaml"
    for name in ("bam_ia", "simsiam", "mpcl", "mocov2", "mocov3", "mvp", "hvp_mtl")
}
# Peer -> the ssl_zoo method whose backbone, head sizes and batch it reuses (and is compared with).
PEERS: dict[str, str] = {"lightly_simsiam": "simsiam", "lightly_moco": "mocov2"}
DEMO_ROOT = "data/demo"  # where the demo configs expect the demo dataset


# ---------------------------------------------------------------------- building a method and its batch
def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path '{path}' cannot be imported ({err})") from err


def load_method(
    method: str, model_args: dict | None = None, batch_size: int | None = None, config: str | None = None,
    seed: int = 0, demo_root: str | None = None,
) -> tuple[LightningModule, dict[str, Any], int]:
    """The method of ``experiments/<method>/demo.yaml`` (init args overridden by ``model_args``) and one batch.

    The batch is what the config's data module feeds the method: ``batch_size`` items (the config's data
    batch size by default) of its dataset, transformed by the method's ``train_transform()``, collated.
    ``demo_root`` relocates a data root under ``data/demo`` (e.g. ``data/demo/folder``) to another copy
    of the demo dataset.

    Returns:
        ``(model, batch, batch_size)``.
    """
    if config is None:
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        config = METHODS[method]
    config_path = ROOT / config
    if not config_path.is_file():
        raise FileNotFoundError(f"config '{config_path}' does not exist")
    cfg = yaml.safe_load(config_path.read_text())
    for key in ("model", "data"):
        if not isinstance(cfg.get(key), dict) or "class_path" not in cfg[key]:
            raise ValueError(f"{config_path}: needs a '{key}' section with a class_path")

    torch.manual_seed(seed)
    init_args = {**cfg["model"].get("init_args", {}), **(model_args or {})}
    with warnings.catch_warnings():  # the demo configs' randomly initialised CLIP teacher warns by design
        warnings.simplefilter("ignore")
        model = import_class(cfg["model"]["class_path"])(**init_args)

    data_args = dict(cfg["data"].get("init_args", {}))
    root = Path(data_args.get("root", DEMO_ROOT))
    if demo_root is not None and root.parts[:2] == Path(DEMO_ROOT).parts:
        root = Path(demo_root, *root.parts[2:])
    data_args.update(root=str(root if root.is_absolute() else ROOT / root), num_workers=0,
                     persistent_workers=False, train_transform=model.train_transform())
    if batch_size is not None:
        data_args["batch_size"] = batch_size
    datamodule = import_class(cfg["data"]["class_path"])(**data_args)
    datamodule.setup("fit")
    n = datamodule.batch_size
    batch = default_collate([datamodule.train_set[i] for i in range(n)])
    return model, batch, n


# ---------------------------------------------------------------------- the compute limit
@dataclass
class ComputeLimit:
    """The network compute a step cannot avoid.

    ``student`` (a bare timm model) runs forward + backward over each tensor of ``student_inputs`` in a
    separate call, as the method encodes them; every ``(teacher, x)`` runs a no-grad forward.
    """

    student: nn.Module
    student_inputs: list[Tensor]
    teachers: list[tuple[nn.Module, Tensor]] = field(default_factory=list)

    @property
    def student_views(self) -> int:
        return sum(x.shape[0] for x in self.student_inputs)

    def step(self) -> None:
        self.student.zero_grad(set_to_none=True)
        with torch.no_grad():
            for teacher, x in self.teachers:
                teacher(x)
        loss = sum(self.student(x).float().sum() for x in self.student_inputs)
        loss.backward()

    def to(self, device: torch.device) -> ComputeLimit:
        self.student.to(device)
        self.student_inputs = [x.to(device) for x in self.student_inputs]
        self.teachers = [(t.to(device), x.to(device)) for t, x in self.teachers]
        return self


def _bare(timm_model: nn.Module, train: bool = True) -> nn.Module:
    """A copy of a timm model: the limit never touches the method's own weights or gradients."""
    return copy.deepcopy(timm_model).train(train)


def method_limit(model: LightningModule, batch: dict[str, Tensor]) -> ComputeLimit:
    """The views each network of ``model``'s ``training_step`` sees, mirrored on bare timm models."""
    from ssl_zoo.methods import BAMIA, HVPMTL, MVP, MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
    from ssl_zoo.models.teachers import CLIPTeacher

    views = batch["views"]
    if isinstance(model, BAMIA):  # the two views of every pair, encoded as two batches of P = B*V/2
        return ComputeLimit(_bare(model.backbone.model),
                            [views[:, 0::2].flatten(0, 1), views[:, 1::2].flatten(0, 1)])
    if isinstance(model, MPCLMoCoV2 | MPCLMoCoV3):  # queries through the student, keys through the momentum encoder
        x1, x2 = views[:, 0], views[:, 1]
        teacher = _bare(model.teacher_backbone.model)  # BN in train mode, as the key encoder runs
        if isinstance(model, MPCLMoCoV3):  # both directions
            return ComputeLimit(_bare(model.backbone.model), [x1, x2], [(teacher, x2), (teacher, x1)])
        return ComputeLimit(_bare(model.backbone.model), [x1], [(teacher, x2)])
    if isinstance(model, MPCLBarlowTwins):  # both views through the one network
        return ComputeLimit(_bare(model.backbone.model), [views[:, 0], views[:, 1]])
    if isinstance(model, MVP):  # one masked student view; the frozen teacher on the same crop
        frozen = model.teacher_backbone
        tower = frozen.visual if isinstance(frozen, CLIPTeacher) else frozen.backbone.model
        return ComputeLimit(_bare(model.backbone.model), [views[:, 0]], [(tower, model.teacher_input(batch))])
    if isinstance(model, HVPMTL):  # masked view 0 (MIM); both views (clustering) or view 1; teacher on view 1
        x0, x1 = views[:, 0], views[:, 1]
        inputs = [x0] if model.mim_decoder is not None else []
        if model.prototypes is not None:
            inputs.append(torch.cat([x0, x1]))
        elif model.decoder is not None:
            inputs.append(x1)
        teachers = [(_bare(model.teacher_backbone.model, train=False), x1)] if model.teacher_backbone else []
        return ComputeLimit(_bare(model.backbone.model), inputs, teachers)
    raise TypeError(f"no compute limit is defined for {type(model).__name__}")


# ---------------------------------------------------------------------- lightly's reference steps
class LightlySimSiam(LightningModule):
    """lightly's SimSiam (``examples/pytorch_lightning/simsiam.py``) on a given backbone."""

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden_dim: int, proj_dim: int,
                 pred_hidden_dim: int, lr: float) -> None:
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        self.lr = lr
        self.backbone = backbone
        self.projection_head = SimSiamProjectionHead(feature_dim, proj_hidden_dim, proj_dim)
        self.prediction_head = SimSiamPredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return z.detach(), self.prediction_head(z)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0, x1 = batch["views"][:, 0], batch["views"][:, 1]
        z0, p0 = self(x0)
        z1, p1 = self(x1)
        loss = 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))
        self.log("train_loss_ssl", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


class LightlyMoCo(LightningModule):
    """lightly's MoCo v2 (``examples/pytorch_lightning/moco.py``): memory bank in ``NTXentLoss``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, proj_dim: int, queue_size: int,
                 temperature: float, momentum: float, lr: float) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.lr, self.momentum = lr, momentum
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(feature_dim, hidden_dim, proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, proj_dim))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=self.momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=self.momentum)
        x_query, x_key = batch["views"][:, 0], batch["views"][:, 1]
        query = self.projection_head(self.backbone(x_query).flatten(start_dim=1))
        key = self.projection_head_momentum(self.backbone_momentum(x_key).flatten(start_dim=1)).detach()
        loss = self.criterion(query, key)
        self.log("train_loss_ssl", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def load_peer(peer: str, model_args: dict | None = None, batch_size: int | None = None, seed: int = 0,
              demo_root: str | None = None) -> tuple[LightningModule, dict[str, Any], int, ComputeLimit]:
    """A lightly peer on the backbone, head sizes and batch of its ssl_zoo counterpart, with its own limit."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer '{peer}'; choose from {', '.join(PEERS)}")
    base, batch, n = load_method(PEERS[peer], model_args, batch_size, seed=seed, demo_root=demo_root)
    hp, d = base.hparams, base.backbone.num_features
    backbone = copy.deepcopy(base.backbone.model)  # the same timm architecture as ssl_zoo's student
    lr = 0.05 * n / 256
    x0, x1 = batch["views"][:, 0], batch["views"][:, 1]
    if peer == "lightly_simsiam":
        model = LightlySimSiam(backbone, d, hp.proj_hidden_dim, hp.proj_dim, hp.pred_hidden_dim, lr)
        limit = ComputeLimit(_bare(model.backbone), [x0, x1])
    else:
        hidden = hp.projector_hidden_dims
        hidden = hidden if isinstance(hidden, int) else hidden[0]
        model = LightlyMoCo(backbone, d, hidden, hp.proj_dim, hp.queue_size, hp.temperature, hp.ema_momentum, lr)
        limit = ComputeLimit(_bare(model.backbone), [x0], [(_bare(model.backbone_momentum), x1)])
    return model, batch, n, limit


# ---------------------------------------------------------------------- one step without / with the Trainer
@dataclass
class _StandInTrainer:
    """What ``configure_optimizers`` reads from a Trainer (lr scaling, schedule length), nothing else."""

    batch_size: int
    estimated_stepping_batches: int = 1000
    max_epochs: int = 1
    world_size: int = 1
    accumulate_grad_batches: int = 1

    @property
    def datamodule(self) -> SimpleNamespace:
        return SimpleNamespace(batch_size=self.batch_size)


def method_optimizer(model: LightningModule, batch_size: int) -> torch.optim.Optimizer:
    """The optimiser the method's own ``configure_optimizers`` builds, outside a Trainer."""
    model._trainer = _StandInTrainer(batch_size)  # noqa: SLF001 (read only inside configure_optimizers)
    try:
        config = model.configure_optimizers()
    finally:
        model._trainer = None  # noqa: SLF001
    return config["optimizer"] if isinstance(config, dict) else config


def module_step_fn(model: LightningModule, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer,
                   device: torch.device, precision: str) -> Callable[[], None]:
    """One step as the Trainer runs it, minus the Trainer: forward, backward, optimiser step, EMA update."""
    from ssl_zoo.methods import HVPMTL

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        if isinstance(model, HVPMTL):  # its hook updates only once per Trainer global step
            model.update_teacher()
        else:
            model.on_train_batch_end(loss, batch, 0)  # MoCo's EMA (MPCL on MoCo); a no-op for the others

    return step


class _FixedBatches(LightningDataModule):
    """The same (device-resident) batch ``num_batches`` times; ``batch_size`` is what lr scaling reads."""

    def __init__(self, batch: dict[str, Tensor], num_batches: int, batch_size: int) -> None:
        super().__init__()
        self.batch, self.num_batches, self.batch_size = batch, num_batches, batch_size

    def train_dataloader(self) -> _Repeat:
        return _Repeat(self.batch, self.num_batches)


class _Repeat:
    """An iterable of ``times`` references to one batch (a plain list would read as a list of loaders)."""

    def __init__(self, batch: dict[str, Tensor], times: int) -> None:
        self.batch, self.times = batch, times

    def __len__(self) -> int:
        return self.times

    def __iter__(self):
        return (self.batch for _ in range(self.times))


class _PairedStepClock(Callback):
    """Times every Trainer step, and one limit step just before each (outside the timed step).

    A step runs from one ``on_train_batch_start`` to the next (everything the loop does in between); the
    limit step is timed inside the hook, before the step's clock starts. Pairing them step by step means a
    change in the machine's load hits both members of a pair alike.
    """

    def __init__(self, limit_step: Callable[[], None], sync: Callable[[], None]) -> None:
        self.limit_step, self.sync = limit_step, sync
        self.limits: list[float] = []
        self.steps: list[float] = []
        self._step_start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sync()
        now = time.perf_counter()
        if self._step_start is not None:
            self.steps.append(now - self._step_start)
        self.limits.append(timed(self.limit_step, self.sync))
        self._step_start = time.perf_counter()


def trainer_step_pairs(model: LightningModule, batch: dict[str, Tensor], batch_size: int, limit_step: Callable[[], None],
                       steps: int, warmup: int, device: torch.device, precision: str) -> list[tuple[float, float]]:
    """``(limit_s, step_s)`` of ``steps`` Trainer steps over a fixed, device-resident batch, after ``warmup``."""
    clock = _PairedStepClock(limit_step, synchronizer(device))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per fit
    num_batches = warmup + steps + 1  # the last batch only closes the last timed step
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no val loop", "few workers": expected for a fixed batch
        trainer = Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            precision="bf16-mixed" if precision == "bf16" else "32-true",
            max_epochs=1, max_steps=num_batches, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, default_root_dir=tmp, callbacks=[clock],
        )
        trainer.fit(model, datamodule=_FixedBatches(batch, num_batches, batch_size))
    model.trainer = None
    model.to(device)  # the Trainer's teardown moves the module back to the CPU
    return list(zip(clock.limits, clock.steps, strict=False))[warmup:]


def module_step_pairs(step: Callable[[], None], limit_step: Callable[[], None], steps: int, warmup: int,
                      device: torch.device) -> list[tuple[float, float]]:
    """``(limit_s, module_step_s)`` pairs, a limit step and a module step in turn, after ``warmup`` pairs."""
    sync = synchronizer(device)
    pairs = [(timed(limit_step, sync), timed(step, sync)) for _ in range(warmup + steps)]
    return pairs[warmup:]


# ---------------------------------------------------------------------- FLOPs and compilation
def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def trunk_blocks(network: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a bare network: ResNet stages, ViT blocks, Swin stages, open_clip residual blocks."""
    if all(hasattr(network, f"layer{i}") for i in range(1, 5)):
        return [getattr(network, f"layer{i}") for i in range(1, 5)]
    for path in ("blocks", "layers", "transformer.resblocks"):
        blocks = network
        for attr in path.split("."):
            blocks = getattr(blocks, attr, None)
        if isinstance(blocks, nn.ModuleList | nn.Sequential):
            return list(blocks)
    raise TypeError(f"no repeated blocks found in {type(network).__name__} to compile")


def accelerate(model: LightningModule, limit: ComputeLimit, compile_blocks: bool, channels_last: bool) -> None:
    """The speed options, applied alike to the method, the peers and the limit.

    ssl_zoo's methods apply their own ``compile`` / ``channels_last`` options (regional ``torch.compile`` of the
    backbones' blocks, ``ssl_zoo.models.acceleration``) in ``configure_model``, which is called here as the
    Trainer calls it. The lightly peers' backbones and the limit's networks get the same regional
    compilation of their blocks (the limit's frozen CLIP tower included) and channels-last weights and inputs.
    """
    model.configure_model()  # a no-op unless the method was built with compile / channels_last
    bare = [limit.student, *(t for t, _ in limit.teachers)]
    if isinstance(model, LightlySimSiam | LightlyMoCo):
        bare += [model.backbone, *([model.backbone_momentum] if isinstance(model, LightlyMoCo) else [])]
    if channels_last:
        for network in bare:
            network.to(memory_format=torch.channels_last)
        limit.student_inputs = [x.contiguous(memory_format=torch.channels_last) for x in limit.student_inputs]
        limit.teachers = [(t, x.contiguous(memory_format=torch.channels_last)) for t, x in limit.teachers]
    if compile_blocks:
        for network in bare:
            for block in trunk_blocks(network):
                block.compile()


# ---------------------------------------------------------------------- one measurement
def pair_ratios(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Median and quartiles (first, third) of ``step / limit`` over ``(limit_s, step_s)`` pairs."""
    ratios = [step / lim for lim, step in pairs]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "quartiles": [quartiles[0], quartiles[2]]}


def measure(name: str, *, model_args: dict | None = None, batch_size: int | None = None, rounds: int = 3,
            steps: int = 5, warmup: int = 2, device: str = "cpu", precision: str = "32",
            compile_blocks: bool = False, channels_last: bool = False, peak_tflops: float | None = None,
            seed: int = 0, demo_root: str | None = None) -> dict[str, Any]:
    """Step, module-step and limit timings of method or peer ``name`` (see the module docstring)."""
    dev = torch.device(device)
    if name not in PEERS and (compile_blocks or channels_last):  # the methods' own speed options
        model_args = {**(model_args or {}), "compile": compile_blocks, "channels_last": channels_last}
    if name in PEERS:
        model, batch, n, limit = load_peer(name, model_args, batch_size, seed, demo_root)
    else:
        model, batch, n = load_method(name, model_args, batch_size, seed=seed, demo_root=demo_root)
        limit = method_limit(model, batch)
    batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
    model.to(dev).train()
    limit.to(dev)

    def limit_step() -> None:
        with autocast(dev, precision):
            limit.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer: expected in the module step
        flops_step = count_flops(module_step_fn(model, batch, method_optimizer(model, n), dev, precision))
        flops_limit = count_flops(limit_step)
        accelerate(model, limit, compile_blocks, channels_last)  # after counting: FLOPs are counted eagerly
        trainer_pairs, module_pairs = [], []  # (limit_s, step_s) and (limit_s, module_step_s)
        for _ in range(rounds):
            step = module_step_fn(model, batch, method_optimizer(model, n), dev, precision)
            module_pairs += module_step_pairs(step, limit_step, steps, warmup, dev)
            trainer_pairs += trainer_step_pairs(model, batch, n, limit_step, steps, warmup, dev, precision)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)

    step_s = statistics.median(s for _, s in trainer_pairs)
    module_s = statistics.median(s for _, s in module_pairs)
    limit_s = statistics.median(lim for lim, _ in trainer_pairs + module_pairs)
    ratio, module_ratio = pair_ratios(trainer_pairs), pair_ratios(module_pairs)
    peak = peak_flops(dev, precision, peak_tflops)
    return {
        "method": name,
        "images_per_s": n / step_s,
        "step_s": step_s,
        "limit_s": limit_s,
        "ratio": ratio["median"],
        "ratio_quartiles": ratio["quartiles"],
        "module_step_s": module_s,
        "module_ratio": module_ratio["median"],
        "module_ratio_quartiles": module_ratio["quartiles"],
        # from the paired ratios: the difference of two separately measured medians is mostly noise
        "lightning_share": (ratio["median"] - module_ratio["median"]) / ratio["median"],
        "batch_size": n,
        "student_views_per_step": limit.student_views,
        "teacher_views_per_step": sum(x.shape[0] for _, x in limit.teachers),
        "compared_with": PEERS.get(name),
        "model_args": model_args or {},
        "flops_step": flops_step,
        "flops_limit": flops_limit,
        "achieved_tflops_step": flops_step / step_s / 1e12,
        "achieved_tflops_limit": flops_limit / limit_s / 1e12,
        "mfu": flops_step / step_s / peak if peak else None,
        "mfu_limit": flops_limit / limit_s / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "trainer_pairs": trainer_pairs,
        "module_pairs": module_pairs,
    }


def _with_quartiles(median: float, quartiles: list[float]) -> str:
    return f"{median:.2f} ({quartiles[0]:.2f}-{quartiles[1]:.2f})"


def markdown_table(report: dict[str, Any]) -> str:
    """The results of a report as a Markdown table (peers labelled with the method they are compared with)."""
    lines = ["| method | images/s | step (ms) | module step (ms) | limit (ms) | step / limit (quartiles) "
             "| module step / limit (quartiles) | Lightning share | FLOPs step / limit | student views | teacher views |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        name = f"{r['method']} (peer of {r['compared_with']})" if r.get("compared_with") else r["method"]
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['step_s'] * 1e3:.1f} | {r['module_step_s'] * 1e3:.1f} "
                     f"| {r['limit_s'] * 1e3:.1f} | {_with_quartiles(r['ratio'], r['ratio_quartiles'])} "
                     f"| {_with_quartiles(r['module_ratio'], r['module_ratio_quartiles'])} "
                     f"| {r['lightning_share']:.0%} | {r['flops_step'] / r['flops_limit']:.3f} "
                     f"| {r['student_views_per_step']} | {r['teacher_views_per_step']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*METHODS, *PEERS]
    parser.add_argument("--method", nargs="+", default=["all"], choices=[*names, "all"],
                        help="methods and peers to time ('all': every method, then the two lightly peers)")
    parser.add_argument("--model-args", default="{}",
                        help='JSON overriding the demo config\'s model init_args, e.g. \'{"backbone": "resnet50"}\'')
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the config's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--compile", action="store_true",
                        help="regional torch.compile of the backbones' blocks (the methods' own 'compile' option)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last weights and inputs (the methods' own 'channels_last' option)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of the device for MFU (default: timing.PEAK_TFLOPS by GPU name)")
    parser.add_argument("--demo-root", default=None, help=f"the demo dataset, if not at {DEMO_ROOT}")
    parser.add_argument("--json", default="benchmarks/results/step_overhead.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --json and exit")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads((ROOT / args.json).read_text())
        print(markdown_table(report))
        return report
    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as err:
        parser.error(f"--model-args is not valid JSON ({err})")
    if not isinstance(model_args, dict):
        parser.error("--model-args must be a JSON object")

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    methods = names if "all" in args.method else args.method
    report = {
        "command": "python -m benchmarks.step_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(torch.device(args.device)),
        "settings": {k: v for k, v in vars(args).items() if k not in ("method", "json")},
        "results": [],
    }
    for name in methods:
        result = measure(name, model_args=model_args, batch_size=args.batch_size, rounds=args.rounds,
                         steps=args.steps, warmup=args.warmup, device=args.device, precision=args.precision,
                         compile_blocks=args.compile, channels_last=args.channels_last,
                         peak_tflops=args.peak_tflops, demo_root=args.demo_root)
        report["results"].append(result)
        write_json(args.json, report)  # after every method: a long run keeps what it measured
        print(f"{name:16s} step {result['step_s'] * 1e3:8.1f} ms  module {result['module_step_s'] * 1e3:8.1f} ms"
              f"  limit {result['limit_s'] * 1e3:8.1f} ms  ratio {result['ratio']:.2f}"
              f"  {result['images_per_s']:.1f} img/s", flush=True)
    return report


if __name__ == "__main__":
    main()
