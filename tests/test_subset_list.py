"""Semi-supervised subsets: SimCLR's subset lists (``1percent.txt`` / ``10percent.txt``) on a class-per-folder
tree, and the SGD fine-tuning they are used with (experiments/eval/semisup_in1k_r50_*pct.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from ssl_zoo.data import ImageFolderDataModule
from ssl_zoo.data.folder import ImageFolderDataset
from ssl_zoo.eval.finetune import FineTune

CLASSES = ["n01440764", "n01443537", "n01484850"]


def _tree(root: Path, per_class: int = 4) -> list[str]:
    """An ImageNet-style tree ``root/{train,val}/<wnid>/<wnid>_<k>.JPEG`` of tiny images; returns the train names."""
    names = []
    for split in ("train", "val"):
        for c, wnid in enumerate(CLASSES):
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                name = f"{wnid}_{100 + k}.JPEG"
                Image.new("RGB", (32, 32), (40 * c, 20 * k, 90)).save(root / split / wnid / name, format="JPEG")
                if split == "train":
                    names.append(name)
    return names


def test_subset_list_keeps_the_listed_images_with_the_full_trees_labels(tmp_path):
    _tree(tmp_path)
    # SimCLR's format (bare file names), a relative path, blank lines; nothing from the second class
    (tmp_path / "1percent.txt").write_text("n01484850_101.JPEG\n\nn01440764/n01440764_100.JPEG\nn01484850_103.JPEG\n")
    full = ImageFolderDataset(tmp_path / "train")
    subset = ImageFolderDataset(tmp_path / "train", subset=tmp_path / "1percent.txt")
    assert subset.classes == full.classes == CLASSES  # class indices of the whole tree
    assert [(Path(p).name, label) for p, label in subset.samples] == [
        ("n01440764_100.JPEG", 0), ("n01484850_101.JPEG", 2), ("n01484850_103.JPEG", 2)]  # the tree's order
    for i in range(len(subset)):
        image, label = subset[i]
        assert image.size == (32, 32) and label == subset.targets[i]


def test_subset_list_errors_name_the_file_and_line(tmp_path):
    _tree(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764_100.JPEG\nn01440764_999.JPEG\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: 'n01440764_999\.JPEG' is not an image under"):
        ImageFolderDataset(tmp_path / "train", subset=bad)
    bad.write_text("n01440764_100.JPEG\nn01440764_101.JPEG\nn01440764_100.JPEG\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: .* listed twice \(first on line 1\)"):
        ImageFolderDataset(tmp_path / "train", subset=bad)
    with pytest.raises(FileNotFoundError, match="subset list"):
        ImageFolderDataset(tmp_path / "train", subset=tmp_path / "10percent.txt")


@pytest.mark.slow
def test_data_module_trains_on_the_subset_and_validates_on_the_whole_split(tmp_path):
    names = _tree(tmp_path)
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


def test_finetune_crop_scale_reaches_the_training_crop():
    """``crop_scale`` is the area range of the training RandomResizedCrop (timm's (0.08, 1) by default)."""
    kwargs = dict(backbone="resnet18", backbone_kwargs={"model_kwargs": {"layers": [1, 1, 1, 1]}}, img_size=32,
                  auto_augment=None, re_prob=0.0)
    default, narrow = FineTune(**kwargs), FineTune(**kwargs, crop_scale=(0.35, 1.0))
    assert default.train_transform().transform.transforms[0].scale == (0.08, 1.0)
    assert narrow.train_transform().transform.transforms[0].scale == (0.35, 1.0)
    with pytest.raises(ValueError, match="model.crop_scale"):
        FineTune(**kwargs, crop_scale=(0.5, 0.2))
