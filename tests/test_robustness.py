"""Robustness: bad images, bad annotations, bad configs, safe loading, logging without network.

Web-crawled pre-training data always holds broken files. Each bad input is built in ``tmp_path`` and the
exact behaviour is asserted: the error type and what its message names, or, under
``on_bad_sample="skip"``, the skip count against a brute-force walk and the label of every returned
image. Generated images encode their own identity in their pixels, so a label that shifted to another
image is caught.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import pickle
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import DataLoader

from ssl_zoo.augment import (
    BlockwiseAugmentation,
    HVPTransform,
    MVPTransform,
    mocov2_transform,
    mocov3_transform,
)
from ssl_zoo.cli import main
from ssl_zoo.data import (
    BadImageError,
    BadSamplePolicy,
    CocoMultiLabel,
    ImageFolderDataset,
    TencentML,
    load_image,
    parse_tencent_line,
)
from ssl_zoo.data import decode as image_decode
from ssl_zoo.data.datamodule import CocoDataModule, ImageFolderDataModule, ViewDataset
from ssl_zoo.data.demo import make_demo_dataset
from ssl_zoo.utils.bad_samples import BadSampleMonitor, read_bad_files

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ helpers
def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    """A lossless solid-colour image: its colour identifies it after loading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # lossless whatever the suffix
    return path


def colour_of(index: int) -> tuple[int, int, int]:
    """A colour that encodes ``index`` exactly (for ``index < 65536``)."""
    return (index % 256, index // 256, 77)


def index_of(colour) -> int:
    return int(colour[0]) + 256 * int(colour[1])


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


#: One of each kind of broken file met in crawled data; "missing" is a listed file that is not on disk.
BAD_CONTENT = {
    "zero-byte": b"",
    "truncated": jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "text": b"<html><body>404 Not Found</body></html>\n",
    "random": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
    "corrupt-header": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
}
BAD_KINDS = [*BAD_CONTENT, "missing"]


def break_file(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(BAD_CONTENT[kind])


def pixel_views(image: Image.Image) -> dict[str, torch.Tensor]:
    """A view transform that keeps the identity of the image: its top-left pixel as a 1x1 view."""
    colour = torch.as_tensor(pixels(image)[0, 0])  # [3]
    return {"views": colour.view(1, 3, 1, 1).float()}


def labelled_tree(root: Path, n: int, bad: dict[int, str], num_classes: int = 4) -> list[tuple[Path, int, bool]]:
    """``root/<class>/<i>.png`` with image ``i`` of class ``i % num_classes`` coloured ``colour_of(i)``.

    ``bad`` maps image numbers to a kind of breakage. A class-per-folder dataset lists what is on disk, so
    "missing" files are written here and must be removed with :func:`remove_missing` after the dataset
    is built (a file deleted while a run goes on). Returns ``(path, label, is_bad)`` in ImageFolder order
    (class folder, then file name).
    """
    files = []
    for i in range(n):
        label = i % num_classes
        path = save_solid(root / f"c{label}" / f"{i:03d}.png", colour_of(i))
        if i in bad and bad[i] != "missing":
            break_file(path, bad[i])
        files.append((path, label, i in bad))
    return sorted(files)


def remove_missing(root: Path, bad: dict[int, str]) -> None:
    for i, kind in bad.items():
        if kind == "missing":
            next(root.glob(f"*/{i:03d}.png")).unlink()


def expected_walk(is_bad: list[bool], position: int) -> tuple[int, int]:
    """Brute force of the skip policy: (position actually read, bad files passed over) for a request."""
    j, skipped = position, 0
    while is_bad[j]:
        skipped += 1
        j = (j + 1) % len(is_bad)
    return j, skipped


# ============================================================================ 1. images: every mode -> 8-bit RGB
def test_load_image_grayscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and image.size == (8, 6)
    assert np.array_equal(pixels(image), np.repeat(grey[..., None].astype(np.int64), 3, axis=2))


def test_load_image_cmyk(tmp_path):
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (100, 0, 50, 100)]
    image = Image.new("CMYK", (len(cmyk), 1))
    image.putdata(cmyk)
    image.save(tmp_path / "c.tif")
    loaded = pixels(load_image(tmp_path / "c.tif"))[0]  # [6, 3]
    for (c, m, y, k), rgb in zip(cmyk, loaded, strict=True):
        # Subtractive model: each ink absorbs its complement, black scales everything.
        expected = [255 * (1 - ink / 255) * (1 - k / 255) for ink in (c, m, y)]
        assert np.allclose(rgb, expected, atol=1.0), ((c, m, y, k), rgb, expected)


def test_load_image_cmyk_jpeg(tmp_path):
    # CMYK JPEGs (print workflows, Adobe) are the common case on the web, not CMYK TIFFs.
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg")
    assert image.mode == "RGB" and image.size == (8, 8)
    r, g, b = pixels(image).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta + yellow = red


def test_load_image_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 200, 128], [10, 20, 30, 64]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    loaded = pixels(load_image(tmp_path / "a.png"))
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    expected = alpha * rgba[..., :3] + (1.0 - alpha) * 255.0
    assert np.abs(loaded - expected).max() <= 1.0


def test_load_image_grey_with_alpha(tmp_path):
    la = np.array([[[0, 0], [50, 255], [200, 255]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    loaded = pixels(load_image(tmp_path / "la.png"))
    assert loaded.tolist() == [[[255] * 3, [50] * 3, [200] * 3]]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_load_image_palette_with_transparent_index(tmp_path, suffix):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    palette.info["transparency"] = 0
    palette.save(tmp_path / f"p{suffix}", transparency=0)
    assert Image.open(tmp_path / f"p{suffix}").mode == "P"
    loaded = pixels(load_image(tmp_path / f"p{suffix}"))
    assert loaded.tolist() == [[[255, 255, 255], [0, 255, 0], [0, 0, 255]]]


def test_load_image_palette_without_transparency(tmp_path):
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putdata([0, 1, 1, 0])
    palette.save(tmp_path / "p.png")
    loaded = pixels(load_image(tmp_path / "p.png"))
    assert loaded.tolist() == [[[10, 20, 30], [200, 100, 0]], [[200, 100, 0], [10, 20, 30]]]


def test_load_image_16bit_png_scaled_to_8bit(tmp_path):
    values = np.array([[0, 1, 128, 129, 257], [1000, 32896, 40000, 65279, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    loaded = pixels(load_image(tmp_path / "deep.png"))
    expected = np.rint(values.astype(np.float64) * 255.0 / 65535.0)
    assert np.array_equal(loaded, np.repeat(expected[..., None], 3, axis=2))
    assert loaded[1, -1, 0] == 255 and loaded[0, 0, 0] == 0


def test_load_image_applies_exif_orientation(tmp_path):
    # 40 x 20 (wide): left half red, right half blue.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    references = {
        1: array,
        3: np.rot90(array, k=2),  # rotated 180 degrees
        6: np.rot90(array, k=-1),  # "rotate 90 CW to display": the left edge goes to the top
        8: np.rot90(array, k=1),  # "rotate 90 CCW to display": the left edge goes to the bottom
    }
    for orientation, reference in references.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        Image.fromarray(array).save(path, quality=95, exif=exif)
        loaded = pixels(load_image(path))
        assert loaded.shape == reference.shape, orientation
        # JPEG is lossy at the colour edge: compare away from it.
        far = np.abs(loaded - reference.astype(np.int64)).max(axis=2)
        assert np.median(far) < 8 and (far < 40).mean() > 0.8, orientation
    assert pixels(load_image(tmp_path / "o6.jpg"))[2, 10].argmax() == 0  # red on top after rotation
    assert pixels(load_image(tmp_path / "o6.jpg"))[-3, 10].argmax() == 2  # blue at the bottom


def test_load_image_owns_its_pixels(tmp_path):
    path = save_solid(tmp_path / "s.png", (1, 2, 3))
    image = load_image(path)
    path.unlink()
    assert pixels(image)[0, 0].tolist() == [1, 2, 3]


# ============================================================================ 1. images: unreadable files
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_load_image_bad_files_raise_bad_image_error_naming_the_file(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # Pillow's default, whatever ran before
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(b"x")
    break_file(path, kind)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, ValueError)
    assert error.path == str(path) and str(path) in str(error)
    restored = pickle.loads(pickle.dumps(error))  # DataLoader workers send it to the main process
    assert str(restored) == str(error) and restored.path == error.path


def test_load_image_truncated_jpeg_decodes_when_complete(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes())
    assert load_image(tmp_path / "ok.jpg").size == (64, 48)


def test_load_image_pixel_limit(tmp_path, monkeypatch):
    path = save_solid(tmp_path / "s.png", (0, 0, 0), size=(20, 10))
    assert load_image(path, max_pixels=200).size == (20, 10)  # exactly at the limit: accepted
    with pytest.raises(BadImageError, match="exceeds the limit of 199"):
        load_image(path, max_pixels=199)
    monkeypatch.setattr(image_decode, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)
    image_decode.set_max_image_pixels(50)
    assert image_decode.MAX_IMAGE_PIXELS == 50 and Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(ValueError, match="pixels"):
        image_decode.set_max_image_pixels(0)


def test_pillow_limit_set_explicitly():
    assert Image.MAX_IMAGE_PIXELS == image_decode.MAX_IMAGE_PIXELS == 2**28


def test_huge_image_is_rejected_from_its_header_without_decoding(tmp_path, monkeypatch):
    # A 1-bit PNG of 20000 x 20000 = 4e8 pixels is ~50 kB on disk and would be 1.2 GB as RGB.
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000

    def decode(self):  # any pixel decode of the bomb is the bug under test
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(BadImageError, match=r"20000x20000 = 400000000 pixels exceeds the limit of 268435456") as info:
        load_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(info.value)


def _method_transforms():
    return {
        "bam_gamma0": BlockwiseAugmentation(size=32, overlap=0.0),
        "bam": BlockwiseAugmentation(size=32),
        "simsiam": BlockwiseAugmentation(size=32, bam=False),
        "mocov2": mocov2_transform(32),
        "mocov3": mocov3_transform(32),
        "mvp": MVPTransform(size=32, patch_size=16, num_masking_patches=1, min_num_patches=1),
        "hvp_mtl": HVPTransform(size=32, model_patch_size=16, mask_patch_size=32),
    }


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (1, 300), (300, 1), (5, 3)])
def test_images_smaller_than_the_crop_give_full_size_views_in_every_method(size):
    torch.manual_seed(0)
    image = Image.new("RGB", size, (200, 30, 90))
    for name, transform in _method_transforms().items():
        views = transform(image)["views"]
        assert views.shape[-3:] == (3, 32, 32) and torch.isfinite(views).all(), (name, size)


# ============================================================================ 1. the on_bad_sample policy
def test_bad_sample_policy_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="on_bad_sample"):
        BadSamplePolicy("ignore")
    save_solid(tmp_path / "tree" / "a" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError, match="on_bad_sample"):
        ImageFolderDataset(tmp_path / "tree", on_bad_sample="warn")
    with pytest.raises(ValueError, match="on_bad_sample"):
        CocoDataModule(root=str(tmp_path), on_bad_sample="ignore")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_on_bad_sample_raise_names_the_file(tmp_path, kind):
    files = labelled_tree(tmp_path / "tree", 6, bad={4: kind})
    dataset = ImageFolderDataset(tmp_path / "tree")
    remove_missing(tmp_path / "tree", {4: kind})
    position = next(i for i, (path, _, _) in enumerate(files) if path.name == "004.png")
    with pytest.raises(BadImageError, match=re.escape(str(files[position][0]))):
        dataset[position]


def test_on_bad_sample_skip_substitutes_next_readable_with_its_label(tmp_path):
    # Adjacent bad files in dataset order (c1/001, c1/005 and the wrap-around from the last file) included.
    bad = {1: "text", 5: "zero-byte", 2: "missing", 11: "truncated", 8: "random"}
    files = labelled_tree(tmp_path / "tree", 12, bad=bad, num_classes=3)
    dataset = ImageFolderDataset(tmp_path / "tree", on_bad_sample="skip")
    remove_missing(tmp_path / "tree", bad)
    is_bad = [b for _, _, b in files]

    expected_skips, expected_paths = 0, []
    for position in list(range(len(files))) * 2:  # twice: bad indices already seen are passed over too
        used, skipped = expected_walk(is_bad, position)
        for j in range(position, position + skipped):
            path = str(files[j % len(files)][0])
            if path not in expected_paths:
                expected_paths.append(path)
        expected_skips += skipped
        image, label = dataset[position]
        assert label == files[used][1], (position, used)
        assert index_of(pixels(image)[0, 0]) == int(files[used][0].stem), (position, used)
        sample = dataset.load_sample(position)
        assert sample.index == used and len(sample.skipped) == skipped
        assert [p for p, _ in sample.skipped] == [str(files[j % len(files)][0]) for j in range(position, position + skipped)]
    assert dataset.num_skipped == 2 * expected_skips
    assert dataset.bad_paths == expected_paths
    assert sorted(dataset.bad_paths) == sorted(str(p) for p, _, b in files if b)


def test_on_bad_sample_skip_gives_up_when_everything_is_bad(tmp_path):
    labelled_tree(tmp_path / "tree", 4, bad=dict.fromkeys(range(4), "text"))
    dataset = ImageFolderDataset(tmp_path / "tree", on_bad_sample="skip")
    with pytest.raises(RuntimeError, match="none of the 4 samples"):
        dataset[2]


def test_transform_errors_are_not_treated_as_bad_files(tmp_path):
    labelled_tree(tmp_path / "tree", 3, bad={})

    def broken(image):
        raise KeyError("bug in a transform")

    dataset = ImageFolderDataset(tmp_path / "tree", transform=broken, on_bad_sample="skip")
    with pytest.raises(KeyError):
        dataset[0]
    assert dataset.num_skipped == 0


def test_skip_count_is_exact_with_dataloader_workers(tmp_path):
    """Counts made in worker processes reach the main process with the batches, and labels never shift."""
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "missing", 29: "random", 35: "corrupt-header"}
    files = labelled_tree(tmp_path / "tree", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    dataset = ViewDataset(ImageFolderDataset(tmp_path / "tree", transform=pixel_views, on_bad_sample="skip"))
    remove_missing(tmp_path / "tree", bad)
    loader = DataLoader(dataset, batch_size=5, shuffle=True, num_workers=2, persistent_workers=True,
                        generator=torch.Generator().manual_seed(0))
    for _epoch in range(2):  # the second epoch passes over the bad indices each worker already knows
        skipped, listed = 0, set()
        for batch in loader:
            for b in range(batch["views"].shape[0]):
                image_number = index_of(batch["views"][b, 0, :, 0, 0].long().tolist())
                position = int(batch["index"][b])
                assert int(files[position][0].stem) == image_number  # "index" is the image returned
                assert int(batch["target"][b]) == files[position][1] == image_number % 4  # and so is the label
                assert not files[position][2]
            skipped += int(batch["num_skipped"].sum())
            bad_files = read_bad_files(batch)
            assert len(bad_files) == int(batch["num_skipped"].sum())
            listed |= {path for path, _ in bad_files}
        assert skipped == reference
        assert listed == {str(p) for p, _, b in files if b}


# ============================================================================ 1. skip reporting in a fit
class PixelModule(LightningModule):
    """The smallest module a Trainer accepts: a linear map of the 1x1 views (the data is what is tested)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x = batch["views"][:, 0, :, 0, 0] / 255.0  # [B, 3]
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _metric_rows(path: Path, key: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _fit_with_monitor(root: Path, run_dir: Path, num_workers: int, **trainer_kwargs) -> None:
    datamodule = ImageFolderDataModule(root=str(root), train_dir="train", batch_size=5, num_workers=num_workers,
                                       on_bad_sample="skip", train_transform=pixel_views)
    trainer = Trainer(max_epochs=2, logger=CSVLogger(run_dir, name="", version=""), default_root_dir=run_dir,
                      callbacks=[BadSampleMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(PixelModule(), datamodule=datamodule)


def _check_reported(run_dir: Path, files: list[tuple[Path, int, bool]], reference: int) -> None:
    assert _metric_rows(run_dir / "metrics.csv", "data/skipped_epoch") == [reference, reference]
    assert _metric_rows(run_dir / "metrics.csv", "data/skipped_total") == [reference, 2 * reference]
    lines = (run_dir / "bad_samples.txt").read_text().splitlines()
    listed = dict(line.split("\t") for line in lines)
    assert set(listed) == {str(p) for p, _, b in files if b}
    reasons = {Path(p).stem: reason for p, reason in listed.items()}
    assert reasons["003"] == "empty file (0 bytes)" and reasons["017"] == "not a recognised image format"


def test_bad_sample_monitor_logs_the_epoch_count_and_lists_the_files(tmp_path):
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "random"}
    files = labelled_tree(tmp_path / "tree" / "train", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    _fit_with_monitor(tmp_path / "tree", tmp_path / "run", num_workers=2, devices=1)
    _check_reported(tmp_path / "run", files, reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_sample_monitor_sums_over_ddp_ranks(tmp_path):
    bad = {3: "zero-byte", 4: "truncated", 17: "text", 22: "random", 30: "corrupt-header"}
    files = labelled_tree(tmp_path / "tree" / "train", 40, bad=bad)
    is_bad = [b for _, _, b in files]
    reference = sum(expected_walk(is_bad, position)[1] for position in range(len(files)))
    # 40 images over 2 ranks: 20 each, no padding, so every position is drawn exactly once per epoch.
    _fit_with_monitor(tmp_path / "tree", tmp_path / "run", num_workers=0, devices=2, strategy="ddp_spawn")
    _check_reported(tmp_path / "run", files, reference)


# ============================================================================ 2. annotations: COCO
def _coco(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Three images (ids 42, 7, 100), three categories listed out of id order, image 100 unannotated."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 6, "height": 4} for i in (42, 7, 100)]
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 18},
        {"id": 2, "image_id": 42, "category_id": 1},
        {"id": 3, "image_id": 7, "category_id": 90},
        {"id": 4, "image_id": 7, "category_id": 90},
    ]
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    root = tmp_path / "images"
    for image in images:
        save_solid(root / image["file_name"], colour_of(image["id"]))
    ann = tmp_path / "instances_test.json"
    ann.write_text(json.dumps(data))
    return root, ann, data


# Each case breaks the fixture in one way; the error must name the file and the offending key.
COCO_BREAKAGES = {
    "no images": (lambda d: d.pop("images"), "the top level has no 'images' key"),
    "no annotations": (lambda d: d.pop("annotations"), "the top level has no 'annotations' key"),
    "no categories": (lambda d: d.pop("categories"), "the top level has no 'categories' key"),
    "images not a list": (lambda d: d.update(images={}), "'images' must be a list, got dict"),
    "no file_name": (lambda d: d["images"][1].pop("file_name"), "images[1] has no 'file_name'"),
    "empty file_name": (lambda d: d["images"][1].update(file_name=""), "images[1]['file_name'] must be a non-empty"),
    "no image id": (lambda d: d["images"][0].pop("id"), "images[0] has no 'id'"),
    "mixed id types": (lambda d: d["images"][0].update(id="42"), "image 'id' values must all be integers"),
    "no category_id": (lambda d: d["annotations"][2].pop("category_id"), "annotations[2] has no 'category_id'"),
    "no category name": (lambda d: d["categories"][1].pop("name"), "categories[1] has no 'name'"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=3), "annotations[0]['category_id'] = 3"),
    "unknown image": (lambda d: d["annotations"][3].update(image_id=5), "annotations[3]['image_id'] = 5"),
    "duplicate image id": (lambda d: d["images"][2].update(id=42), "images[2] repeats image id 42"),
    "duplicate category id": (lambda d: d["categories"][2].update(id=1), "categories[2] repeats category id 1"),
    "annotation not an object": (lambda d: d["annotations"].append([1, 2]), "annotations[4] must be a JSON object"),
}


@pytest.mark.parametrize("case", list(COCO_BREAKAGES))
def test_coco_validation_names_file_and_key(tmp_path, case):
    root, ann, data = _coco(tmp_path)
    mutate, message = COCO_BREAKAGES[case]
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        CocoMultiLabel(root, ann)
    assert "instances_test.json" in str(info.value)


def test_coco_not_json_names_the_file(tmp_path):
    root, ann, _ = _coco(tmp_path)
    ann.write_text('{"images": [')  # an interrupted download
    with pytest.raises(ValueError, match=r"instances_test\.json: not valid JSON"):
        CocoMultiLabel(root, ann)


def test_coco_validate_files_names_the_image_id(tmp_path):
    root, ann, _ = _coco(tmp_path)
    CocoMultiLabel(root, ann, validate_files=True)
    (root / "100.png").unlink()
    CocoMultiLabel(root, ann)  # not checked by default
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images listed in '.*instances_test\.json' do not exist, "
                                                 r"e\.g\. image id 100: '.*100\.png'"):
        CocoMultiLabel(root, ann, validate_files=True)


def test_coco_skip_returns_the_substitute_with_its_own_target(tmp_path):
    root, ann, _ = _coco(tmp_path)
    (root / "7.png").write_bytes(b"")  # image id 7, first in id order
    dataset = CocoMultiLabel(root, ann, transform=lambda im: index_of(pixels(im)[0, 0]), on_bad_sample="skip")
    image_id, target = dataset[0]
    assert image_id == 42 and dataset.image_ids[1] == 42
    # categories in ascending id order: person (1), dog (18), toothbrush (90); image 42 has person and dog
    assert target.tolist() == [1.0, 1.0, 0.0]
    assert dataset.num_skipped == 1 and dataset.bad_paths == [str(root / "7.png")]
    with pytest.raises(BadImageError, match="7.png"):
        CocoMultiLabel(root, ann)[0]


# ============================================================================ 2. annotations: Tencent ML-Images
@pytest.mark.parametrize(
    "line, message",
    [
        ("a.jpg\t5:x", "not a number"),
        ("a.jpg\tfoo:1", "non-negative integer"),
        ("a.jpg\t-3:1", "non-negative integer"),
        ("a.jpg\t5:", "not a number"),
        ("a.jpg\t5:1.5", r"\[0, 1\]"),
        ("a.jpg\t5:nan", r"\[0, 1\]"),
        ("a.jpg\t5:0.8:1", "not a number"),
        ("\t3:1", "empty image path"),
        ("   ", "empty image path"),
        ("https://example.com/ 3:1", "no file name"),
    ],
)
def test_parse_tencent_line_malformed(line, message):
    with pytest.raises(ValueError, match=message):
        parse_tencent_line(line)


@pytest.mark.parametrize(
    "line, message",
    [
        ("b.jpg\t3:1\t2:abc", "confidence 'abc' is not a number"),
        ("b.jpg\t3:1\t8:1", r"label index 8 is outside \[0, 8\)"),
        ("b.jpg\t3:1\t123456:1", r"label index 123456 is outside \[0, 8\)"),
        ("\t3:1", "empty image path"),
        ("b.jpg\t3;1", "non-negative integer"),
        ("b.jpg 3:1 7:0.9.1", "not a number"),
    ],
)
def test_tencent_malformed_line_reports_file_and_line_number(tmp_path, line, message):
    text = "a.jpg\t1:1\n\n" + line + "\nc.jpg\t2:1\n"  # the bad line is line 3 (a blank line counts)
    listing = tmp_path / "bad_list.txt"
    listing.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        TencentML(tmp_path, listing, num_classes=8)
    assert f"{listing}:3:" in str(info.value)


def test_tencent_non_utf8_line_reports_its_line_number(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.jpg\t1:1\nb.jpg\t2:1\n\xff\xfe.jpg\t3:1\n")
    with pytest.raises(ValueError, match=re.escape(f"{listing}:3: not valid UTF-8")):
        TencentML(tmp_path, listing, num_classes=8)


def _tencent(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    names = ["n01/a.JPEG", "b.jpg", "c.jpg", "d.jpg"]
    for i, name in enumerate(names):
        save_solid(root / name, colour_of(i), size=(5, 5))
    listing = tmp_path / "list.txt"
    listing.write_text("n01/a.JPEG\t3:1\t1:0.9\n\nhttps://x.org/p/b.jpg  5:0.8  2\nc.jpg\t0:1\t6:1.0\nd.jpg\n")
    return root, listing


def test_tencent_argument_checks(tmp_path):
    root, listing = _tencent(tmp_path)
    with pytest.raises(ValueError, match="min_confidence"):
        TencentML(root, listing, num_classes=8, min_confidence=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        TencentML(root, listing, num_classes=0)
    with pytest.raises(ValueError, match="on_bad_sample"):
        TencentML(root, listing, num_classes=8, on_bad_sample="drop")


def test_tencent_skip_returns_the_substitute_with_its_own_target(tmp_path):
    root, listing = _tencent(tmp_path)
    (root / "c.jpg").write_bytes(b"GIF89a")  # header only
    dataset = TencentML(root, listing, num_classes=8, on_bad_sample="skip")
    image, target = dataset[2]
    assert index_of(pixels(image)[0, 0]) == 3  # the next one, d.jpg, with its (empty) label set
    assert target.sum() == 0 and dataset.num_skipped == 1


def test_tencent_validate_files_names_the_line(tmp_path):
    root, listing = _tencent(tmp_path)
    TencentML(root, listing, num_classes=8, validate_files=True)
    (root / "b.jpg").unlink()  # listed on line 3 (line 2 is blank)
    (root / "d.jpg").unlink()  # line 5
    with pytest.raises(FileNotFoundError) as info:
        TencentML(root, listing, num_classes=8, validate_files=True)
    message = str(info.value)
    assert "2 of 4 images" in message
    assert f"{listing}:3: '{root / 'b.jpg'}'" in message and f"{listing}:5: '{root / 'd.jpg'}'" in message


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "tree" / "empty_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "tree")


# ============================================================================ 3. configs
SIMSIAM = str(ROOT / "experiments/simsiam/demo.yaml")


def _parse_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_unknown_key_in_a_config_file_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(Path(SIMSIAM).read_text())
    cfg["model"]["init_args"]["no_such_option"] = 1
    bad.write_text(yaml.safe_dump(cfg))
    err = _parse_error(capsys, "fit", "--config", str(bad))
    assert "no_such_option" in err and "not accepted" in err


def test_misspelt_override_is_rejected(capsys):
    err = _parse_error(capsys, "fit", "--config", SIMSIAM, "--model.init_args.overlapp", "0.3")
    assert "'overlapp' is not accepted" in err


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("--data.init_args.batch_size", "1.5", r"data\.init_args\.batch_size: Expected a <class 'int'>\. Got value: 1\.5"),
        ("--model.init_args.overlap", "wide", r"model\.init_args\.overlap: Expected a <class 'float'>\. Got value: wide"),
        ("--data.init_args.on_bad_sample", "ignore", r"data\.init_args\.on_bad_sample: .*ignore"),
        ("--model.init_args.head_norm", "group", r"model\.init_args\.head_norm: .*group"),
    ],
    ids=["batch_size", "overlap", "on_bad_sample", "head_norm"],
)
def test_wrong_types_name_the_key(capsys, key, value, expected):
    err = _parse_error(capsys, "fit", "--config", SIMSIAM, key, value)
    assert re.search(expected, err, flags=re.S), err


def _instantiate(*overrides: str, config: str = SIMSIAM):
    return main(["--config", config, "--trainer.logger", "false", *overrides], run=False)


@pytest.mark.parametrize("overlap", ["-0.1", "0.7"])
def test_overlap_out_of_range_is_rejected_before_training(overlap):
    with pytest.raises(ValueError, match=re.escape(f"model.overlap (gamma) must lie in [0, 0.5], got {overlap}")):
        _instantiate("--model.init_args.bam", "true", "--model.init_args.overlap", overlap)


def test_patch_grid_mismatch_says_what_to_change():
    # The demo's student is a ViT/16 at 64 px (4x4 patches); a /32 teacher sees 2x2 patches.
    config = str(ROOT / "experiments/mvp/demo.yaml")
    teacher = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["teacher_kwargs"]
    teacher["vision_cfg"]["patch_size"] = 32
    with pytest.raises(ValueError, match=r"patch grids differ.*4x4.*2x2.*give the student and the teacher the "
                                         r"same patch size") as info:
        _instantiate("--model.init_args.teacher_kwargs", json.dumps(teacher), config=config)
    assert "vit_tiny_patch16_224" in str(info.value)


def _fit(tmp_path: Path, *overrides: str, config: str = SIMSIAM):
    return main(["fit", "--config", config, "--trainer.logger", "false", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_workers", "0",
                 "--model.init_args.img_size", "32", *overrides])


def test_missing_dataset_root_fails_at_setup(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"data\.root: dataset root '.*nowhere' does not exist"):
        _fit(tmp_path, "--data.init_args.root", str(tmp_path / "nowhere"))
    assert time.perf_counter() - start < 30  # seconds, not hours
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_image_files_fail_at_setup_with_validate_files(tmp_path, demo_root):
    root = tmp_path / "coco"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns("folder", "tencent"))
    victim = sorted((root / "train2017").iterdir())[5]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{victim}'")) as info:
        _fit(tmp_path, "--data.init_args.root", str(root), "--data.init_args.validate_files", "true")
    assert "instances_train2017.json" in str(info.value) and "1 of 48 images" in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # SimSiam's heads hold BatchNorm over the batch: one image per process cannot be normalised.
        (["--data.init_args.batch_size", "1"],
         r"data\.batch_size=1 is too small for BAMIA: it needs at least 2 images per process \(the projector "
         r"and predictor normalise with BatchNorm.*head_norm: layer\); set data\.init_args\.batch_size >= 2"),
        (["--data.init_args.batch_size", "100"],
         r"data\.batch_size=100 is larger than the 48 training images.*set data\.init_args\.batch_size <= 48"),
    ],
    ids=["below_the_method_minimum", "above_the_dataset"],
)
def test_unusable_batch_size_is_rejected_at_setup(tmp_path, demo_root, overrides, message):
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, "--data.init_args.root", demo_root, *overrides)


@pytest.mark.parametrize("bam", [True, False])
def test_min_batch_size_is_where_batchnorm_fails(bam):
    """The declared minimum is the real one: SimSiam's BatchNorm heads fail on one image, BAM's do not."""
    from ssl_zoo.methods import BAMIA

    model = BAMIA("resnet18", img_size=32, proj_hidden_dim=16, proj_dim=16, pred_hidden_dim=8, bam=bam,
                  ia_loss="none")
    num_views = 8 if bam else 2
    batch = {"views": torch.randn(1, num_views, 3, 32, 32), "index": torch.zeros(1, dtype=torch.long),
             "block_ids": torch.arange(num_views // 2).repeat_interleave(2)[None]}
    minimum, reason = model.min_batch_size()
    if bam:
        assert minimum == 1 and torch.isfinite(model.training_step(batch, 0))
    else:
        assert minimum == 2 and "BatchNorm" in reason
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model.training_step(batch, 0)


@pytest.mark.parametrize("framework, head_norm, minimum", [
    ("MPCLMoCoV2", None, 1), ("MPCLMoCoV3", None, 2), ("MPCLMoCoV3", "layer", 1), ("MPCLBarlowTwins", "layer", 2)])
def test_mpcl_min_batch_size_follows_its_head_norm(framework, head_norm, minimum):
    import ssl_zoo.methods

    options = {} if head_norm is None else {"head_norm": head_norm}  # None: the framework's default
    model = getattr(ssl_zoo.methods, framework)("resnet18", img_size=32, num_projectors=2, projector_hidden_dims=8,
                                                proj_dim=8, **options)
    assert model.min_batch_size()[0] == minimum


# ============================================================================ 4. safe loading
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            yield (owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)), node.func.attr, node


def test_every_load_in_the_package_is_safe():
    """torch.load with weights_only=True, YAML with a safe loader, never pickle / jit / unsafe YAML."""
    unsafe = []
    files = sorted((ROOT / "ssl_zoo").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        for owner, name, call in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            keywords = {k.arg: k.value for k in call.keywords}
            if (owner, name) == ("torch", "load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            elif owner == "yaml" and name in ("load", "load_all"):
                loader = keywords.get("Loader", call.args[1] if len(call.args) > 1 else None)
                if loader is None or "Safe" not in ast.unparse(loader):
                    unsafe.append(f"{where}: yaml.{name} without a SafeLoader")
            elif owner == "yaml" and name in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all"):
                unsafe.append(f"{where}: yaml.{name}")
            elif (owner, name) in {("pickle", "load"), ("pickle", "loads"), ("torch.jit", "load"),
                                   ("dill", "load"), ("joblib", "load")}:
                unsafe.append(f"{where}: {owner}.{name}")
            elif (owner, name) == ("np", "load") and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                    and keywords["allow_pickle"].value:
                unsafe.append(f"{where}: np.load(allow_pickle=True)")
    assert not unsafe, "\n".join(unsafe)


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_checkpoint(tmp_path: Path, state: dict) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({**state, "payload": _Payload(marker)}, path)
    return path, marker


def test_backbone_weights_with_a_pickled_object_are_refused(tmp_path):
    from ssl_zoo.models import Backbone

    weights = Backbone("resnet18").model.state_dict()
    path, marker = _malicious_checkpoint(tmp_path, {"state_dict": weights})
    with pytest.raises(pickle.UnpicklingError):
        Backbone("resnet18", pretrained=str(path))
    assert not marker.exists()


def test_resuming_from_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, demo_root):
    path, marker = _malicious_checkpoint(tmp_path, {"state_dict": {}, "epoch": 0, "global_step": 0})
    with pytest.raises(pickle.UnpicklingError):
        _fit(tmp_path, "--data.init_args.root", demo_root, "--data.init_args.batch_size", "4",
             "--ckpt_path", str(path))
    assert not marker.exists()


def test_config_files_are_parsed_with_safe_yaml(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "evil.yaml"
    bad.write_text(Path(SIMSIAM).read_text()
                   + f"wandb_project: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                     f"['{marker}']]\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad), "--print_config"])
    capsys.readouterr()
    assert not marker.exists()


# ============================================================================ 5. logging without network
@pytest.mark.slow
def test_offline_wandb_run_completes_and_resumes_from_its_weights_only_checkpoint(tmp_path, demo_root,
                                                                                 monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no stored key, no ~/.netrc
    run_dir = tmp_path / "run"
    common = ["fit", "--config", SIMSIAM, "--trainer.default_root_dir", str(run_dir),
              "--trainer.log_every_n_steps", "1", "--trainer.limit_train_batches", "2",
              "--data.init_args.root", demo_root, "--data.init_args.num_workers", "0",
              "--data.init_args.batch_size", "4", "--model.init_args.img_size", "32"]
    # Without network the run must not wait on wandb: a hang would stall here (no wall-clock assertion, which
    # fails on a loaded machine; the offline run files below show the run went offline).
    main([*common, "--trainer.max_epochs", "1"])
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].glob("*.wandb"))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "train/loss_step" in (run_dir / "metrics.csv").read_text()
    # The run's own checkpoint is plain data: it resumes under weights_only loading.
    torch.load(last, map_location="cpu", weights_only=True)
    cli = main([*common, "--trainer.max_epochs", "2", "--ckpt_path", str(last), "--weights_only", "true"])
    assert cli.trainer.global_step == 4


# ============================================================================ acceptance: 5% corrupt data
def _demo_images(target: Path, count: int) -> list[Path]:
    """A ``count``-image demo set (COCO layout, the built-in generator) in ``target``; training paths in id order."""
    make_demo_dataset(target, num_train=count, num_val=8, size=64, seed=0)
    data = json.loads((target / "annotations" / "instances_train2017.json").read_text())
    return [target / "train2017" / image["file_name"] for image in sorted(data["images"], key=lambda im: im["id"])]


@pytest.mark.slow
def test_demo_pretraining_with_5_percent_corrupt_images_completes_and_reports_them(tmp_path):
    paths = _demo_images(tmp_path / "data", 200)
    bad_positions = range(7, 200, 20)  # 10 files, none adjacent: each is passed over once per epoch
    kinds = BAD_KINDS * 2
    for position, kind in zip(bad_positions, kinds, strict=False):
        break_file(paths[position], kind)
    run_dir = tmp_path / "run"
    main(["fit", "--config", SIMSIAM, "--trainer.default_root_dir", str(run_dir), "--trainer.logger", "true",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1.0", "--trainer.log_every_n_steps", "4",
          "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.batch_size", "25",
          "--data.init_args.num_workers", "2", "--data.init_args.on_bad_sample", "skip",
          "--model.init_args.img_size", "32", "--model.init_args.proj_hidden_dim", "128",
          "--model.init_args.proj_dim", "128", "--model.init_args.pred_hidden_dim", "32"])
    # 200 images / 25 = 8 steps: every image, the bad ones included, is drawn once in the epoch.
    assert _metric_rows(run_dir / "metrics.csv", "data/skipped_epoch") == [10.0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    listed = dict(line.split("\t") for line in (run_dir / "bad_samples.txt").read_text().splitlines())
    assert set(listed) == {str(paths[p]) for p in bad_positions}
    assert all(reason for reason in listed.values())
