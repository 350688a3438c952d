"""Checkpoint loading, LARS, eval.json records and the evaluation protocols run through the CLI."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer

from ssl_zoo.cli import main
from ssl_zoo.data import ImageFolderDataModule
from ssl_zoo.eval.checkpoint import UnsafeCheckpointError, describe_state_dict, load_backbone
from ssl_zoo.eval.finetune import FineTune
from ssl_zoo.eval.knn import KNNMonitor
from ssl_zoo.eval.linear import LinearProbe
from ssl_zoo.eval.module import first_occurrences
from ssl_zoo.eval.optim import LARS
from ssl_zoo.eval.results import append_eval_record, read_eval_records, results_file_for
from ssl_zoo.eval.transforms import SingleView, center_crop_transform, finetune_train_transform
from ssl_zoo.models import Backbone

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIGS = sorted((ROOT / "experiments" / "eval").glob("*.yaml"))
TINY_VIT = {"img_size": 32, "model_kwargs": {"depth": 2}}  # a 2-block ViT-Ti keeps the tests fast


# --------------------------------------------------------------------------------------------- fixtures
def _random_backbone(name: str, seed: int, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    model = Backbone(name, **kwargs)
    with torch.no_grad():  # make BN statistics differ from their defaults too
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.normal_()
    return model


def make_pretraining_checkpoint(path: Path, name: str = "resnet18", teacher: bool = True,
                                backbone_kwargs: dict | None = None) -> tuple[Backbone, Backbone | None]:
    """A checkpoint laid out as the pre-training methods save it (Lightning dict, prefixed modules)."""
    student = _random_backbone(name, 0, **(backbone_kwargs or {}))
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    state["projector.0.weight"] = torch.randn(4, student.num_features)
    other = None
    if teacher:
        other = _random_backbone(name, 1, **(backbone_kwargs or {}))
        state.update({f"teacher_backbone.{k}": v for k, v in other.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 30, "state_dict": state,
                "hyper_parameters": {"backbone": name, "backbone_kwargs": backbone_kwargs, "lam": 4.0}}, path)
    return student, other


def assert_same_weights(a: Backbone, b: Backbone) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------------------------- checkpoints
def test_load_backbone_student_and_teacher(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    student, teacher = make_pretraining_checkpoint(ckpt)
    loaded_student = load_backbone(ckpt)
    loaded_teacher = load_backbone(ckpt, teacher=True)
    assert loaded_student.name == "resnet18"
    assert_same_weights(loaded_student, student)
    assert_same_weights(loaded_teacher, teacher)
    assert not torch.equal(loaded_student.model.conv1.weight, loaded_teacher.model.conv1.weight)
    assert_same_weights(load_backbone(ckpt, backbone="resnet18"), student)  # same name given explicitly


def test_architecture_mismatch_names_both(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    with pytest.raises(ValueError, match=r"'resnet18'.*'resnet34'"):
        load_backbone(ckpt, backbone="resnet34")
    plain = tmp_path / "plain.pth"
    torch.save(_random_backbone("resnet18", 0).model.state_dict(), plain)
    with pytest.raises(ValueError, match=r"resnet18.*'resnet50'") as info:
        load_backbone(plain, backbone="resnet50")
    assert "missing" in str(info.value) and "shape" in str(info.value)


def test_changed_backbone_kwargs_report_tensor_shapes(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                backbone_kwargs=TINY_VIT)
    with pytest.raises(ValueError, match=r"architecture mismatch.*vit_tiny_patch16_224.*patch_embed.proj.weight"):
        load_backbone(ckpt, backbone_kwargs={"model_kwargs": {"patch_size": 8}})


def test_teacher_requested_but_absent(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_pretraining_checkpoint(ckpt, teacher=False)
    with pytest.raises(ValueError, match="no teacher backbone"):
        load_backbone(ckpt, teacher=True)
    plain = tmp_path / "plain.pth"
    torch.save(_random_backbone("resnet18", 0).model.state_dict(), plain)
    with pytest.raises(ValueError, match="not an ssl_zoo pre-training checkpoint"):
        load_backbone(plain, backbone="resnet18", teacher=True)


def test_plain_timm_state_dict_with_head_and_ddp_prefix(tmp_path):
    import timm

    torch.manual_seed(0)
    with_head = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "timm.pth"
    torch.save({"model": {f"module.{k}": v for k, v in with_head.state_dict().items()}}, path)
    loaded = load_backbone(path, backbone="resnet18")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, with_head.state_dict()[k]), k
    with pytest.raises(ValueError, match="pass backbone=<timm name>") as info:
        load_backbone(path)
    assert "resnet18" in str(info.value)  # the guess from the tensors' names and shapes


def test_describe_state_dict_guesses_architectures():
    assert describe_state_dict(Backbone("resnet50").model.state_dict()) == "resnet50"
    vit = describe_state_dict(Backbone("vit_tiny_patch16_224", **TINY_VIT).model.state_dict())
    assert "embed dim 192, 2 blocks, patch 16" in vit


def test_vit_position_embeddings_resampled_to_a_new_resolution(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    student, _ = make_pretraining_checkpoint(ckpt, name="vit_tiny_patch16_224", teacher=False,
                                             backbone_kwargs=TINY_VIT)
    with pytest.warns(UserWarning, match="resampled"):
        loaded = load_backbone(ckpt, backbone_kwargs={"img_size": 64})
    assert loaded.model.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(loaded.model.pos_embed[:, :1], student.model.pos_embed[:, :1])  # CLS kept
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, student.model.blocks[0].attn.qkv.weight)
    assert loaded(torch.randn(1, 3, 64, 64)).shape == (1, 192)


class _Payload:
    """Pickles into a call of ``exec`` that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    state = {f"backbone.{k}": v for k, v in Backbone("resnet18").state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "resnet18"}, "x": _Payload(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_backbone(ckpt)
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler does run it.
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "pwned"


# --------------------------------------------------------------------------------------------- LARS
def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.1 * w0
    d = d * (0.01 * w0.norm() / d.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: plain SGD, no decay, no trust ratio
    # second step: momentum buffer v = 0.9 v + d
    w1 = w.detach().clone()
    w.grad = gw.clone()
    opt.step()
    d2 = gw + 0.1 * w1
    d2 = d2 * (0.01 * w1.norm() / d2.norm())
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * d + d2))


def test_lars_scales_even_without_weight_decay():
    """Linear probes use weight decay 0: the trust ratio must still apply (lightly's LARS skips it)."""
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 100.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2) - 0.001 * 0.5 * 2)  # |w| = 2, step = 0.001*|w|


# --------------------------------------------------------------------------------------------- eval.json
def test_results_file_location(tmp_path):
    ckpt = tmp_path / "runs" / "bam_ia" / "20260101-000000" / "checkpoints" / "last.ckpt"
    assert results_file_for(ckpt, "x") == (ckpt.parent.parent / "eval.json").resolve()
    plain = tmp_path / "weights" / "resnet50.pth"
    assert results_file_for(plain, "x") == (plain.parent / "eval.json").resolve()
    assert results_file_for(None, tmp_path / "eval_run") == tmp_path / "eval_run" / "eval.json"


def test_append_eval_record_keeps_earlier_records(tmp_path):
    path = tmp_path / "run" / "eval.json"
    append_eval_record(path, {"protocol": "a", "metrics": {"mAP": float("nan")}})
    append_eval_record(path, {"protocol": "b", "metrics": {"top1": torch.tensor(12.5)}})
    records = json.loads(path.read_text())
    assert [r["protocol"] for r in records] == ["a", "b"]
    assert records[0]["metrics"]["mAP"] is None and records[1]["metrics"]["top1"] == 12.5
    assert read_eval_records(path) == records


def test_concurrent_appends_lose_no_record(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "eval.json"
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda i: append_eval_record(path, {"i": i}), range(30)))
    assert sorted(r["i"] for r in read_eval_records(path)) == list(range(30))
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no lock or temporary files left


# --------------------------------------------------------------------------------------------- modules
def test_first_occurrences_drops_padded_duplicates():
    # two processes' shards of a 5-sample split, the second padded with sample 0 again
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    keep = first_occurrences(index)
    assert keep.tolist() == [0, 3, 1, 4, 2]
    assert index[keep].tolist() == [0, 1, 2, 3, 4]


def test_finetune_randaugment_survives_zero_bit_posterize():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    transform = finetune_train_transform(32, "rand-m9-mstd0.5-inc1", 0.25)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops
           if op.name.startswith("Posterize")]
    assert ops
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the maximum magnitude keeps 0 bits
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits: 200 -> 192, 100 -> 64, 50 -> 0
    assert op(image).getpixel((0, 0)) == (192, 64, 0)


def test_finetune_layer_decay_follows_beit():
    """lr scale of ViT layer l is decay^(L + 1 - l): patch embedding l = 0, block i l = i + 1, head L + 1."""
    model = FineTune(backbone="vit_tiny_patch16_224", backbone_kwargs={"model_kwargs": {"depth": 3}}, img_size=32,
                     num_classes=5, layer_decay=0.5)
    groups = model.param_groups(lr=1.0)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["lr"], group["weight_decay"])
    vit = model.backbone.model
    depth = len(vit.blocks)
    assert scale_of[id(vit.patch_embed.proj.weight)][0] == pytest.approx(0.5 ** (depth + 1))
    for i in (0, depth - 1):
        scale, lr, wd = scale_of[id(vit.blocks[i].mlp.fc1.weight)]
        assert scale == pytest.approx(0.5 ** (depth - i)) and lr == pytest.approx(scale) and wd == 0.05
        assert scale_of[id(vit.blocks[i].norm1.weight)][2] == 0.0  # no decay on norms
    assert scale_of[id(vit.norm.weight)][0] == 1.0  # the final norm sits with the head, as in BEiT / MAE
    assert scale_of[id(model.head.weight)] == (1.0, 1.0, 0.05)
    assert scale_of[id(model.head.bias)][2] == 0.0
    assert scale_of[id(vit.pos_embed)][2] == 0.0 and scale_of[id(vit.cls_token)][2] == 0.0
    assert len(scale_of) == sum(1 for _ in model.parameters())  # every parameter is optimised once


def test_probe_requires_a_backbone_without_checkpoint():
    with pytest.raises(ValueError, match="model.backbone"):
        LinearProbe()
    with pytest.raises(ValueError, match="model.pooling"):
        LinearProbe(backbone="resnet18", pooling="avg")


def test_linear_probe_refuses_multilabel_data(demo_root, tmp_path):
    with pytest.raises(ValueError, match="MultiLabelLinearProbe"):
        main(["fit", "--config", str(ROOT / "experiments/eval/linear_demo.yaml"), "--trainer.fast_dev_run", "1",
              "--data", "ssl_zoo.data.CocoDataModule", "--data.init_args.root", demo_root,
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--trainer.default_root_dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------- CLI runs
def _data_root(config: dict, demo_root: str) -> str:
    return os.path.join(demo_root, "folder") if "ImageFolder" in config["data"]["class_path"] else demo_root


def _cli_args(config_path: Path, demo_root: str, tmp_path: Path, *extra: str) -> list[str]:
    config = yaml.safe_load(config_path.read_text())
    init = config["model"]["init_args"]
    vit = "vit" in str(init.get("backbone", ""))
    args = ["--config", str(config_path), "--data.init_args.root", _data_root(config, demo_root),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32-true",
            "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
            "--model.init_args.backbone", "vit_tiny_patch16_224" if vit else "resnet18",
            "--model.init_args.img_size", "32"]
    if vit:
        args += ["--model.init_args.backbone_kwargs", json.dumps({"model_kwargs": TINY_VIT["model_kwargs"]})]
    if config["data"]["init_args"].get("train_subset"):  # ImageNet's subset lists; tests/test_subset_list.py
        args += ["--data.init_args.train_subset", "null"]
    return [*args, *extra]


def _subcommand(config_path: Path) -> str:
    return "validate" if "KNNProbe" in config_path.read_text() else "fit"


def test_eval_configs_exist():
    names = {p.name for p in EVAL_CONFIGS}
    assert {"linear_demo.yaml", "gamp_demo.yaml", "finetune_demo.yaml", "linear_mocov2.yaml",
            "linear_mae_mvp.yaml", "gamp_coco_224.yaml", "gamp_coco_448.yaml", "finetune_vitb_mvp.yaml"} <= names


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


class _TinyPretraining(LightningModule):
    """The minimum a pre-training method has for the kNN monitor: a ``.backbone`` and a view transform."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone("resnet18")

    def train_transform(self):
        return SingleView(center_crop_transform(32))

    def training_step(self, batch, batch_idx):
        return self.backbone(batch["views"][:, 0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_knn_monitor_logs_knn_accuracy(demo_root, tmp_path):
    datamodule = ImageFolderDataModule(root=os.path.join(demo_root, "folder"), batch_size=8, num_workers=0)
    trainer = Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu",
                      callbacks=[KNNMonitor(img_size=32, k=5)])
    trainer.fit(_TinyPretraining(), datamodule=datamodule)
    top1 = trainer.callback_metrics["knn/top1"]
    assert 0.0 <= top1 <= 100.0 and "knn/top5" in trainer.callback_metrics
