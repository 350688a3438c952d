"""Data modules (``ssl_zoo.data.datamodule``): every format of the demo data through the same loaders, the
view-transform hook, subset lists, errors."""

import json
import os

import pytest
import torch
from lightning.pytorch import Trainer
from torchvision.transforms import v2 as T

from ssl_zoo.data.datamodule import CocoDataModule, ImageFolderDataModule, TencentMLDataModule
from ssl_zoo.eval.finetune import FineTune
from tests.data.images import imagenet_tree


class TwoViews:
    """A minimal view transform: two resized copies."""

    def __init__(self):
        self.t = T.Compose([T.PILToTensor(), T.Resize((32, 32), antialias=True), T.ToDtype(torch.float32, scale=True)])

    def __call__(self, img):
        v = self.t(img)
        return {"views": torch.stack([v, v.flip(-1)]), "block_ids": torch.zeros(2, dtype=torch.long)}


def _modules(root):
    common = dict(batch_size=4, num_workers=0, train_transform=TwoViews(), eval_size=32)
    return {
        "coco": CocoDataModule(root=root, **common),
        "tencent": TencentMLDataModule(root=root, num_classes=32, **common),
        "folder": ImageFolderDataModule(root=f"{root}/folder", **common),
    }


@pytest.mark.parametrize("fmt", ["coco", "tencent", "folder"])
def test_train_batches_carry_views_and_metadata(demo_root, fmt):
    dm = _modules(demo_root)[fmt]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["views"].shape == (4, 2, 3, 32, 32)
    assert batch["block_ids"].shape == (4, 2)
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.long
    if fmt == "folder":
        assert batch["target"].dtype == torch.long and not dm.multilabel
    else:
        assert batch["target"].shape == (4, dm.num_classes) and dm.multilabel
    # every sample's target is the dataset's own target for that index (labels never shift)
    base = dm.train_set.dataset
    for i, idx in enumerate(batch["index"].tolist()):
        expected = base[idx][1]
        assert torch.equal(torch.as_tensor(batch["target"][i]), torch.as_tensor(expected))


@pytest.mark.parametrize("fmt", ["coco", "tencent", "folder"])
def test_labelled_split_uses_eval_transform(demo_root, fmt):
    dm = _modules(demo_root)[fmt]
    x, y = next(iter(dm.labelled_dataloader("val", batch_size=3)))
    assert x.shape == (3, 3, 32, 32)
    # deterministic: the same images twice
    x2, _ = next(iter(dm.labelled_dataloader("val", batch_size=3)))
    torch.testing.assert_close(x, x2)


def test_transform_must_return_views(demo_root):
    dm = CocoDataModule(root=demo_root, batch_size=2, train_transform=lambda img: img, num_workers=0)
    dm.setup("fit")
    with pytest.raises(TypeError, match="'views'"):
        dm.train_set[0]


def test_coco_annotated_only_on_the_demo_data(demo_root):
    """The demo's background-only images are dropped from both splits; labels stay with their images."""
    for split in ("train", "val"):
        with open(os.path.join(demo_root, "annotations", f"instances_{split}2017.json")) as f:
            data = json.load(f)
        annotated = {a["image_id"] for a in data["annotations"]}
        file_of = {im["id"]: im["file_name"] for im in data["images"]}
        kept_files = sorted(file_of[i] for i in annotated)
        everything = CocoDataModule(root=demo_root, num_workers=0).labelled_dataset(split)
        only = CocoDataModule(root=demo_root, num_workers=0, annotated_only=True).labelled_dataset(split)
        assert len(everything) == len(data["images"])
        assert sorted(os.path.basename(p) for p in only.paths) == kept_files
        if split == "train":
            assert len(only) < len(everything)  # the demo data does hold background-only images
        assert bool(only.targets.any(dim=1).all())
        rows = {i: r for i, r in zip(everything.image_ids, everything.targets, strict=True)}
        for image_id, target in zip(only.image_ids, only.targets, strict=True):
            assert torch.equal(target, rows[image_id])


def test_tencent_several_lists_each_with_its_image_root(demo_root, tmp_path):
    """train_lists / val_lists read several lists into one dataset, each relative to its own image folder (the
    release's ImageNet-id and Open Images lists); the result is the single-list dataset, re-rooted."""
    from pathlib import Path

    demo = Path(demo_root)
    lines = [line for line in (demo / "tencent" / "train.txt").read_text().splitlines() if line.strip()]
    half = len(lines) // 2
    # Part 1 relative to the demo root; part 2 relative to train2017/ (its paths lose that prefix).
    (tmp_path / "part1.txt").write_text("\n".join(lines[:half]) + "\n")
    (tmp_path / "part2.txt").write_text("\n".join(line.removeprefix("train2017/") for line in lines[half:]) + "\n")
    common = dict(batch_size=4, num_workers=0, train_transform=TwoViews(), eval_size=32, num_classes=32)
    single = TencentMLDataModule(root=demo_root, **common)
    several = TencentMLDataModule(root=demo_root, **common, train_lists=[
        {"list_file": str(tmp_path / "part1.txt")},  # absolute list path, images under root
        {"list_file": str(tmp_path / "part2.txt"), "image_root": "train2017"},
    ])
    reference, dataset = single.build_dataset("train", None), several.build_dataset("train", None)
    assert len(dataset) == len(reference) == len(lines)
    assert list(dataset.list_offsets) == [0, half, len(lines)]
    for i in range(len(reference)):
        assert Path(dataset.paths[i]) == Path(reference.paths[i])
        assert torch.equal(dataset.target(i), reference.target(i))
    several.setup("fit")
    assert next(iter(several.train_dataloader()))["views"].shape == (4, 2, 3, 32, 32)
    assert len(several.build_dataset("val", None)) == len(single.build_dataset("val", None))  # val: the default


def test_tencent_list_arguments_errors(demo_root):
    with pytest.raises(ValueError, match="data.train_list and data.train_lists are both set"):
        TencentMLDataModule(root=demo_root, train_list="a.txt", train_lists=[{"list_file": "b.txt"}])
    with pytest.raises(ValueError, match=r"data.val_lists\[1\] = .*'root'.*needs 'list_file'"):
        TencentMLDataModule(root=demo_root, val_lists=[{"list_file": "a.txt"}, {"list_file": "b.txt", "root": "x"}])
    with pytest.raises(ValueError, match="data.train_lists is empty"):
        TencentMLDataModule(root=demo_root, train_lists=[])


@pytest.mark.slow
def test_data_module_trains_on_the_subset_and_validates_on_the_whole_split(tmp_path):
    names = imagenet_tree(tmp_path)
    (tmp_path / "10percent.txt").write_text("\n".join(names[::3]) + "\n")  # 4 of the 12 training images
    finetune = FineTune(backbone="resnet18", backbone_kwargs={"model_kwargs": {"layers": [1, 1, 1, 1]}}, img_size=32,
                        optimizer="sgd", nesterov=False, base_lr=0.005, head_base_lr=0.5, lr_batch_size=256,
                        weight_decay=0.0, layer_decay=1.0, warmup_epochs=0, lr_interval="epoch", drop_path_rate=0.0,
                        mixup=0.0, cutmix=0.0, label_smoothing=0.0, auto_augment=None, re_prob=0.0, color_jitter=None)
    data = ImageFolderDataModule(root=str(tmp_path), train_subset="10percent.txt", batch_size=2, num_workers=0)
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path / "run"))
    trainer.fit(finetune, datamodule=data)
    assert len(data.train_set) == 4 and data.num_classes == 3
    assert trainer.num_training_batches == 2  # 4 subset images / batch 2
    assert trainer.num_val_batches[0] == 6  # the whole validation split: 12 images / batch 2
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults["nesterov"]  # Barlow Twins' evaluate.py
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
    steps = [type(t).__name__ for t in finetune.train_transform().transform.transforms]
    assert "ColorJitter" not in steps and steps[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
