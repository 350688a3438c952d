"""Every method's demo config runs a ``bf16-mixed`` fast_dev_run on a CPU with finite float32 losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ssl_zoo.methods import BAMIA, HVPMTL, MVP, MPCLMoCoV2, MPCLMoCoV3

ROOT = Path(__file__).resolve().parents[2]


EXPERIMENTS = ROOT / "experiments"


PRETRAINING_DIRS = ("bam_ia", "simsiam", "mocov2", "mocov3", "mpcl", "mvp", "hvp_mtl")


DEMO_CONFIGS = sorted(p for d in PRETRAINING_DIRS for p in (EXPERIMENTS / d).glob("demo*.yaml"))


def test_every_method_has_a_demo_config():
    assert {p.parent.name for p in DEMO_CONFIGS} == set(PRETRAINING_DIRS)
    classes = {yaml.safe_load(p.read_text())["model"]["class_path"] for p in DEMO_CONFIGS}
    assert classes == {f"ssl_zoo.methods.{c.__name__}" for c in (BAMIA, MPCLMoCoV2, MPCLMoCoV3, MVP, HVPMTL)}


def _small_model_args(config: Path) -> list[str]:
    """The config's model family at a fraction of its cost: bf16 convolutions are emulated on most CPUs."""
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    if init["backbone"].startswith("resnet"):  # one block per stage at 32 px
        return ["--model.init_args.img_size", "32",
                "--model.init_args.backbone_kwargs", '{"model_kwargs": {"layers": [1, 1, 1, 1]}}']
    return ["--model.init_args.backbone_kwargs", '{"img_size": 64, "model_kwargs": {"depth": 2}}']  # 2 ViT blocks


@pytest.mark.slow
@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_demo_config_fast_dev_run_in_bf16_mixed_on_cpu(config, demo_root, tmp_path):
    from ssl_zoo.cli import main

    data = yaml.safe_load(config.read_text())["data"]
    root = f"{demo_root}/folder" if data["class_path"].endswith("ImageFolderDataModule") else demo_root
    cli = main(["--config", str(config), "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu",
                "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
                "--data.init_args.root", root, "--data.init_args.num_workers", "0",
                "--data.init_args.batch_size", "2", "--model.init_args.channels_last", "true",
                *_small_model_args(config)], run=False)
    # Autocast is on: the first linear layer of the trained network computes in bfloat16.
    linear = next(m for m in cli.model.backbone.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    dtypes: list[torch.dtype] = []
    linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert cli.trainer.precision == "bf16-mixed" and dtypes and dtypes[0] == torch.bfloat16
    # The Trainer ran the configure_model hook: the convolutions are channels-last (the GPU bf16 layout).
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in cli.model.backbone.parameters() if p.ndim == 4)
    losses = {k: v for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/loss")}
    assert "train/loss" in losses
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
