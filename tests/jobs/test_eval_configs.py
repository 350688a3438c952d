"""The evaluation configs run through the command line: every one exists and runs, probes fit the demo data
above chance and record it, cached features are the backbone's, the frozen backbone stays frozen."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from ssl_zoo.cli import main
from ssl_zoo.eval.results import read_eval_records
from tests.helpers.pretraining_checkpoints import (
    TINY_BEIT,
    TINY_VIT,
    assert_same_weights,
    make_beit_pretraining_checkpoint,
    make_pretraining_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]


EVAL_CONFIGS = sorted((ROOT / "experiments" / "eval").glob("*.yaml"))


@pytest.mark.slow
def test_beit_finetune_config_fast_dev_run_from_a_pretraining_checkpoint(demo_root, tmp_path):
    ckpt = tmp_path / "mvp" / "20260101-000000" / "checkpoints" / "last.ckpt"
    make_beit_pretraining_checkpoint(ckpt)
    config = ROOT / "experiments" / "eval" / "finetune_vitb_mvp.yaml"
    cli = main(["fit", *_cli_args(config, demo_root, tmp_path / "eval", "--model.init_args.ckpt", str(ckpt),
                                  "--trainer.fast_dev_run", "1")])
    vit = cli.model.backbone.model
    assert isinstance(vit.fc_norm, torch.nn.LayerNorm) and isinstance(vit.norm, torch.nn.Identity)
    assert vit.rel_pos_bias is None and vit.blocks[0].attn.relative_position_bias_table is not None
    assert cli.trainer.callback_metrics["train/loss"].isfinite()
    assert "val/top1" in cli.trainer.callback_metrics


def _data_root(config: dict, demo_root: str) -> str:
    return os.path.join(demo_root, "folder") if "ImageFolder" in config["data"]["class_path"] else demo_root


def _cli_args(config_path: Path, demo_root: str, tmp_path: Path, *extra: str) -> list[str]:
    config = yaml.safe_load(config_path.read_text())
    init = config["model"]["init_args"]
    name = str(init.get("backbone", ""))
    beit, vit = "beit" in name, "vit" in name
    tiny = "beit_base_patch16_224" if beit else "vit_tiny_patch16_224" if vit else "resnet18"
    args = ["--config", str(config_path), "--data.init_args.root", _data_root(config, demo_root),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true",
            "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
            "--model.init_args.backbone", tiny, "--model.init_args.img_size", "32"]
    if beit:  # a 2-block, 192-wide BEiT in the config's layout
        model_kwargs = {**((init.get("backbone_kwargs") or {}).get("model_kwargs") or {}), **TINY_BEIT}
        args += ["--model.init_args.backbone_kwargs", json.dumps({"model_kwargs": model_kwargs})]
    elif vit:
        args += ["--model.init_args.backbone_kwargs", json.dumps({"model_kwargs": TINY_VIT["model_kwargs"]})]
    if config["data"]["init_args"].get("train_subset"):  # ImageNet's subset lists; tests/data/test_folder.py
        args += ["--data.init_args.train_subset", "null"]
    return [*args, *extra]


def _subcommand(config_path: Path) -> str:
    return "validate" if "KNNProbe" in config_path.read_text() else "fit"


def test_eval_configs_exist():
    names = {p.name for p in EVAL_CONFIGS}
    assert {"linear_demo.yaml", "gamp_demo.yaml", "finetune_demo.yaml", "linear_mocov2.yaml",
            "linear_mae_mvp.yaml", "gamp_coco_224.yaml", "gamp_coco_448.yaml", "finetune_vitb_mvp.yaml",
            "finetune_swinb_hvp_simmim.yaml", "finetune_swins_hvp_simmim.yaml", "finetune_swint_hvp_simmim.yaml",
            "finetune_vitb_hvp_simmim.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_eval_config_fast_dev_run(config, demo_root, tmp_path):
    cli = main([_subcommand(config), *_cli_args(config, demo_root, tmp_path, "--trainer.fast_dev_run", "1")])
    metrics = cli.trainer.callback_metrics
    assert "val/top1" in metrics or "val/mAP" in metrics
    if _subcommand(config) == "fit":
        assert metrics["train/loss"].isfinite()
    assert not (tmp_path / "eval.json").exists()  # debug runs are not results


def _fit_on_training_split(config: Path, demo_root: str, ckpt: Path, tmp_path: Path, *extra: str):
    """Fit, validating on the training split: the probe must be able to fit the features it is given."""
    config_dict = yaml.safe_load(config.read_text())
    if "ImageFolder" in config_dict["data"]["class_path"]:
        same_split = ["--data.init_args.val_dir", "train"]
    else:
        same_split = ["--data.init_args.val_images", "train2017",
                      "--data.init_args.val_ann", "annotations/instances_train2017.json"]
    args = _cli_args(config, demo_root, tmp_path / "eval_run", "--model.init_args.ckpt", str(ckpt),
                     "--model.init_args.img_size", "64", "--data.init_args.batch_size", "16",
                     "--trainer.logger", "false", *same_split, *extra)
    return main(["fit", *args])


@pytest.mark.slow
@pytest.mark.parametrize(("config", "metric", "chance"), [("linear_demo", "top1", 100 / 10),
                                                          ("gamp_demo", "mAP", None)])
def test_probe_fits_demo_data_above_chance_and_records_it(config, metric, chance, demo_root, tmp_path):
    ckpt = tmp_path / "pretrain" / "20260101-000000" / "checkpoints" / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    cli = _fit_on_training_split(ROOT / "experiments" / "eval" / f"{config}.yaml", demo_root, ckpt, tmp_path,
                                 "--trainer.max_epochs", "10", "--data.init_args.batch_size", "8")
    probe = cli.model
    if chance is None:  # mAP of a random ranking = the mean positive rate of the classes
        targets = torch.stack([t for _, t in cli.datamodule.labelled_dataset("train")])
        chance = 100 * targets.mean(0)[targets.sum(0) > 0].mean().item()
    assert probe.last_val_metrics[metric] > chance + 25, (probe.last_val_metrics, chance)

    records = read_eval_records(ckpt.parent.parent / "eval.json")
    assert len(records) == 1
    record = records[0]
    assert record["ckpt"] == str(ckpt.resolve()) and record["backbone"] == "resnet18"
    assert record["protocol"] == probe.protocol and record["epoch"] == 9
    assert record["metrics"][metric] == pytest.approx(probe.last_val_metrics[metric])
    assert record["settings"]["cache_features"] is True and record["date"]


@pytest.mark.slow
def test_cached_features_are_the_backbone_features_by_index(demo_root, tmp_path):
    cli = main(["fit", *_cli_args(ROOT / "experiments/eval/gamp_demo.yaml", demo_root, tmp_path,
                                  "--trainer.fast_dev_run", "1")])
    probe = cli.model
    dataset = cli.datamodule.labelled_dataset("train", transform=probe.eval_image_transform())
    for i in (0, 5, len(dataset) - 1):
        image, _ = dataset[i]
        with torch.no_grad():
            want = probe.backbone.forward_map(image[None])
        want = (want.mean(dim=(2, 3)) + want.amax(dim=(2, 3))) / 2
        torch.testing.assert_close(probe._cache["train"][i : i + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_frozen_backbone_is_unchanged_by_probe_training(demo_root, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, teacher=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = main(["fit", *_cli_args(ROOT / "experiments/eval/linear_demo.yaml", demo_root, tmp_path / "e",
                                      "--model.init_args.ckpt", str(ckpt), "--model.init_args.cache_features",
                                      "false", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                                      "--trainer.logger", "false")])
    probe = cli.model
    assert not probe.backbone.training and probe.head.training
    assert_same_weights(probe.backbone, student)  # weights and BN running statistics untouched
    assert all(not p.requires_grad for p in probe.backbone.parameters())
