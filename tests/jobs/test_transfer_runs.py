"""Dense transfer end to end: a checkpoint of every pre-training method loads into detection and segmentation,
the demo recipes run (fast_dev_run) from such a checkpoint, and a real run writes its eval.json record."""

import importlib
from pathlib import Path

import pytest
import torch
import yaml

from ssl_zoo.cli import main
from ssl_zoo.eval.results import read_eval_records
from ssl_zoo.models.backbones import Backbone
from ssl_zoo.transfer.detection import ObjectDetection
from ssl_zoo.transfer.segmentation import SemanticSegmentation

ROOT = Path(__file__).resolve().parents[2]
SHALLOW_VIT = {"img_size": 64, "model_kwargs": {"depth": 2}}  # a 2-block ViT-Ti keeps the tests fast
TINY_SWIN = {"backbone": "swin_tiny_patch4_window7_224",
             "backbone_kwargs": {"img_size": 64, "model_kwargs": {"window_size": 4, "depths": [1, 1, 1, 1],
                                                                 "embed_dim": 24, "num_heads": [1, 1, 1, 1]}}}
METHODS = {  # method -> its demo config's model, with overrides; hvp_mtl is checked with both backbone families
    "bam_ia": ("bam_ia", {}),
    "simsiam": ("simsiam", {}),
    "mpcl": ("mpcl", {}),
    "mocov2": ("mocov2", {}),
    "mocov3": ("mocov3", {"backbone_kwargs": SHALLOW_VIT}),
    "mvp": ("mvp", {"backbone_kwargs": SHALLOW_VIT}),
    "hvp_mtl_vit": ("hvp_mtl", {"backbone_kwargs": SHALLOW_VIT}),
    "hvp_mtl_swin": ("hvp_mtl", TINY_SWIN),
    # MVP's own architecture: BEiT with one shared relative position table, no absolute position embedding
    "mvp_beit": ("mvp", {"backbone": "beit_base_patch16_224",
                         "backbone_kwargs": {"img_size": 64, "model_kwargs": {
                             "depth": 2, "embed_dim": 96, "num_heads": 3, "init_values": 0.1,
                             "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False, "use_abs_pos_emb": False,
                             "global_pool": "token"}}}),
}
SMALL_DETECTOR = dict(fpn_channels=16, head_dim=16, fc_dim=32, roi_batch_size_per_image=16, rpn_post_nms_train=50,
                      min_size=(64,), max_size=64)


def save_pretraining_checkpoint(method: str, path: Path):
    """Build the method as its demo config does and save what Lightning saves (state_dict + hyper_parameters)."""
    config, overrides = METHODS[method]
    spec = yaml.safe_load((ROOT / "experiments" / config / "demo.yaml").read_text())["model"]
    module_name, class_name = spec["class_path"].rsplit(".", 1)
    model = getattr(importlib.import_module(module_name), class_name)(**{**spec.get("init_args", {}), **overrides})
    with torch.no_grad():  # weights unlike a fresh initialisation, so that loading is visible
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 0}, path)
    return model


def _assert_backbone_equal(loaded, source) -> None:
    a, b = loaded.model.state_dict(), source.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_of_every_method_loads_into_detection_and_segmentation(method, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    source = save_pretraining_checkpoint(method, ckpt)
    detector = ObjectDetection(ckpt=str(ckpt), num_classes=3, with_masks=True, pyramid="auto", **SMALL_DETECTOR)
    segmenter = SemanticSegmentation(ckpt=str(ckpt), num_classes=3, channels=16, aux_channels=8)
    _assert_backbone_equal(detector.backbone, source.backbone)
    _assert_backbone_equal(segmenter.backbone, source.backbone)
    detector.eval()
    segmenter.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 64, 96)])
        assert out[0]["boxes"].shape[1] == 4 and out[0]["masks"].shape[-2:] == (64, 96)
        # a BEiT is built for one size (its relative position tables): a smaller input is padded to it
        size = (48, 64) if source.backbone.family == "beit" else (64, 96)
        logits = segmenter(torch.randn(1, 3, *size))
    assert logits.shape == (1, 3, *size) and logits.isfinite().all()
    if isinstance(getattr(source, "teacher_backbone", None), Backbone):  # momentum / EMA teacher (not MVP's CLIP)
        teacher = SemanticSegmentation(ckpt=str(ckpt), teacher=True, num_classes=3, channels=16, aux_channels=8)
        _assert_backbone_equal(teacher.backbone, source.teacher_backbone)


def _demo_args(kind: str, demo_root: str, ckpt: Path, run_dir: Path) -> list[str]:
    root = demo_root if kind == "detect" else f"{demo_root}/ADEChallengeData2016"
    return ["fit", "--config", str(ROOT / "experiments" / "transfer" / f"{kind}_demo.yaml"),
            "--model.init_args.ckpt", str(ckpt), "--data.init_args.root", root, "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_demo_recipe_fast_dev_run(kind, demo_root, tmp_path):
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    save_pretraining_checkpoint("bam_ia", ckpt)
    cli = main([*_demo_args(kind, demo_root, ckpt, tmp_path / "run"), "--trainer.fast_dev_run", "1"])
    metrics = cli.trainer.callback_metrics
    assert metrics["train/loss"].isfinite()
    names = ["val/bbox_AP", "val/segm_AP", "val/bbox_AP50"] if kind == "detect" else ["val/mIoU", "val/aAcc"]
    for name in names:
        assert name in metrics and 0.0 <= float(metrics[name]) <= 100.0 or float(metrics[name]) == -1.0, name
    assert not (tmp_path / "pre" / "eval.json").exists()  # fast_dev_run records nothing


@pytest.mark.slow
def test_segment_demo_writes_eval_json_and_keeps_the_best_checkpoint(demo_root, tmp_path):
    ckpt = tmp_path / "pre" / "20260101-000000" / "checkpoints" / "last.ckpt"
    save_pretraining_checkpoint("mocov3", ckpt)  # a ViT: BEiT's neck on the 4x4 patch grid of 64 px crops
    main([*_demo_args("segment", demo_root, ckpt, tmp_path / "run"), "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2", "--trainer.logger", "false"])
    # validated mid-epoch (an iteration-based run): the best checkpoint is picked by mIoU, not an epoch loss
    assert list((tmp_path / "run" / "checkpoints").glob("best-step*.ckpt"))
    records = read_eval_records(ckpt.parent.parent / "eval.json")
    assert len(records) == 1
    record = records[0]
    assert record["protocol"] == "segmentation" and record["ckpt"] == str(ckpt.resolve())
    assert set(record["metrics"]) == {"mIoU", "mAcc", "aAcc"} and record["backbone"] == "vit_tiny_patch16_224"
    assert record["settings"]["max_steps"] == 2 and record["settings"]["data"] == "ADE20KDataModule"


TINY = {"resnet": ("resnet18", {}),
        "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN["backbone_kwargs"]),
        "vit": ("vit_tiny_patch16_224", SHALLOW_VIT)}


@pytest.mark.slow
@pytest.mark.parametrize(("family", "task"), [("resnet", "c4"), ("swin", "fpn"), ("vit", "simple_fpn"),
                                              ("swin", "seg"), ("vit", "seg")])
def test_every_trainable_parameter_gets_a_gradient(family, task):
    """One training step reaches every trainable parameter (what DDP needs without find_unused_parameters): the
    shared res5 of C4, and ViT / Swin whose classification final norm the pyramids do not read (frozen)."""
    name, kwargs = TINY[family]
    torch.manual_seed(0)
    if task == "seg":
        module = SemanticSegmentation(backbone=name, backbone_kwargs=kwargs, num_classes=3, channels=16,
                                      aux_channels=8)
        batch = {"images": torch.randn(2, 3, 64, 64), "targets": torch.randint(0, 3, (2, 64, 64))}
    else:
        module = ObjectDetection(backbone=name, backbone_kwargs=kwargs, num_classes=3, with_masks=True, pyramid=task,
                                 **SMALL_DETECTOR)
        masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
        masks[0, 10:40, 12:44] = 1
        target = {"boxes": torch.tensor([[12.0, 10, 44, 40]]), "labels": torch.tensor([2]), "masks": masks,
                  "iscrowd": torch.zeros(1, dtype=torch.uint8)}
        batch = {"images": [torch.rand(3, 64, 64), torch.rand(3, 64, 64)], "targets": [target, dict(target)]}
    module.train()
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.isfinite()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_validation_shards_hold_every_image_once(demo_root, monkeypatch):
    """Under DDP the validation images are split without padding: box / mask AP and mIoU gathered over the
    processes see each image once (Lightning's default DistributedSampler repeats images to even the shards)."""
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    from ssl_zoo.transfer import ADE20KDataModule

    datamodule = ADE20KDataModule(root=f"{demo_root}/ADEChallengeData2016", num_classes=11, crop_size=64,
                                  scale=[128, 96], batch_size=2, num_workers=0)
    assert not isinstance(datamodule.val_dataloader().sampler, DistributedSampler)  # one process: plain order
    n = len(datamodule.val_dataloader().dataset)
    world = next(w for w in (3, 2, 4, 5, 6, 7) if n % w)  # a world size that the default sampler would pad
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        sampler = datamodule.val_dataloader().sampler
        assert isinstance(sampler, DistributedSampler)  # so Lightning keeps it instead of its padded default
        shards.append(list(sampler))
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) == 1
    padded = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    assert sum(map(len, padded)) > n  # what the default would have counted twice


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_segmentation_validation_equals_one_process(demo_root, tmp_path):
    """An odd number of validation images over 2 processes: mIoU / mAcc / aAcc equal the one-process values
    (a padded shard would count one image twice)."""
    import shutil

    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(f"{demo_root}/ADEChallengeData2016", root)
    images = sorted((root / "images" / "validation").iterdir())
    if len(images) % 2 == 0:  # make the count odd
        images[-1].unlink()
        (root / "annotations" / "validation" / f"{images[-1].stem}.png").unlink()
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    save_pretraining_checkpoint("bam_ia", ckpt)
    results = {}
    for devices in (1, 2):
        cli = main(["validate", "--config", str(ROOT / "experiments" / "transfer" / "segment_demo.yaml"),
                    # the head built in the main process: the same random weights in both runs and every process
                    "--seed_everything", "0", "--model.init_args.ckpt", str(ckpt), "--model.init_args.num_classes", "11",
                    "--data.init_args.root", str(root),
                    "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
                    "--trainer.devices", str(devices), "--trainer.strategy", "ddp_spawn" if devices > 1 else "auto",
                    "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / f"devices{devices}")])
        results[devices] = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert {"val/mIoU", "val/mAcc", "val/aAcc"} <= results[1].keys() == results[2].keys()
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, abs=1e-4), (name, results)
