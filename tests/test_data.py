"""Dataset readers, robust image loading, the bad-sample policy and the demo generator.

Fixtures are written into ``tmp_path`` by each test; expected values come from independent
computations (plain loops, numpy, torchvision's ImageFolder), never from the code under test.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.datasets import ImageFolder

from ssl_zoo.data import (
    BadImageError,
    BadSamplePolicy,
    CocoMultiLabel,
    ImageFolderDataset,
    ImageNet100,
    TencentClass,
    TencentML,
    load_image,
    parse_tencent_line,
    read_tencent_dictionary,
)
from ssl_zoo.data import io as data_io
from ssl_zoo.data.demo import DEMO_CLASSES, SUPERCLASSES, _draw_object, main, make_demo_dataset


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    """A lossless solid-colour image: its colour identifies it after loading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")  # lossless whatever the suffix
    return path


def colour_of(index: int) -> tuple[int, int, int]:
    return (index * 17 % 256, 255 - index * 29 % 256, 100 + index * 7 % 150)


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


# ============================================================================ load_image: colour modes
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


# ============================================================================ load_image: bad files
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    data = jpeg_bytes()
    files = {
        "zero-byte": b"",
        "truncated": data[: len(data) // 2],
        "text": b"<html><body>404 Not Found</body></html>\n",
        "random": bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
        "corrupt-header": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.jpg"
        out[name].write_bytes(content)
    out["missing"] = tmp_path / "missing.jpg"
    return out


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "text", "random", "corrupt-header", "missing"])
def test_load_image_bad_files_raise_bad_image_error_naming_the_file(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # Pillow's default, whatever ran before
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(BadImageError) as info:
        load_image(path)
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, ValueError)
    assert error.path == str(path) and str(path) in str(error)
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == str(error) and restored.path == error.path


def test_load_image_truncated_jpeg_decodes_when_complete(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes())
    assert load_image(tmp_path / "ok.jpg").size == (64, 48)


def test_load_image_pixel_limit(tmp_path, monkeypatch):
    path = save_solid(tmp_path / "s.png", (0, 0, 0), size=(20, 10))
    assert load_image(path, max_pixels=200).size == (20, 10)  # exactly at the limit: accepted
    with pytest.raises(BadImageError, match="exceeds the limit of 199"):
        load_image(path, max_pixels=199)
    monkeypatch.setattr(data_io, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)
    data_io.set_max_image_pixels(50)
    assert data_io.MAX_IMAGE_PIXELS == 50 and Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(ValueError, match="pixels"):
        data_io.set_max_image_pixels(0)


def test_pillow_limit_set_explicitly():
    assert Image.MAX_IMAGE_PIXELS == data_io.MAX_IMAGE_PIXELS == 2**28


# ============================================================================ bad-sample policy
def test_bad_sample_policy_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="on_bad_sample"):
        BadSamplePolicy("ignore")
    save_solid(tmp_path / "tree" / "a" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError, match="on_bad_sample"):
        ImageFolderDataset(tmp_path / "tree", on_bad_sample="warn")


def _policy_tree(tmp_path: Path, bad: set[int], n: int = 9) -> tuple[Path, list[tuple[Path, int]]]:
    """n images in classes a/b/c; those in ``bad`` are corrupt. Returns root and (path, label) in order."""
    root = tmp_path / "tree"
    files = []
    for i in range(n):
        label = i % 3
        path = root / "abc"[label] / f"{i:02d}.png"
        save_solid(path, colour_of(i))
        if i in bad:
            path.write_bytes(b"not an image")
        files.append((path, label))
    files.sort()  # ImageFolder order: by class folder, then file name
    return root, files


def test_on_bad_sample_raise_names_the_file(tmp_path):
    root, files = _policy_tree(tmp_path, bad={4})
    dataset = ImageFolderDataset(root)
    bad_position = [i for i, (p, _) in enumerate(files) if p.name == "04.png"][0]
    with pytest.raises(BadImageError) as info:
        dataset[bad_position]
    assert "04.png" in str(info.value)


def test_on_bad_sample_skip_substitutes_next_readable_with_its_label(tmp_path):
    bad_names = {1, 2, 5, 8}
    root, files = _policy_tree(tmp_path, bad=bad_names)
    dataset = ImageFolderDataset(root, on_bad_sample="skip")
    n = len(files)
    is_bad = [int(p.stem) in bad_names for p, _ in files]

    expected_skips, expected_paths = 0, []
    for index in list(range(n)) + list(range(n)):  # twice: bad indices already seen are passed over too
        image, label = dataset[index]
        # Reference: walk forward (mod n) to the first readable file.
        j = index
        while is_bad[j]:
            if str(files[j][0]) not in expected_paths:
                expected_paths.append(str(files[j][0]))
            expected_skips += 1
            j = (j + 1) % n
        path, expected_label = files[j]
        assert label == expected_label, (index, j)
        assert pixels(image)[0, 0].tolist() == list(colour_of(int(path.stem))), (index, j)
        assert dataset.num_skipped == expected_skips
    assert dataset.bad_paths == expected_paths
    assert sorted(dataset.bad_paths) == sorted(str(p) for p, _ in files if int(p.stem) in bad_names)


def test_on_bad_sample_skip_gives_up_when_everything_is_bad(tmp_path):
    root, _ = _policy_tree(tmp_path, bad=set(range(4)), n=4)
    dataset = ImageFolderDataset(root, on_bad_sample="skip")
    with pytest.raises(RuntimeError, match="none of the 4 samples"):
        dataset[2]


def test_transform_errors_are_not_treated_as_bad_files(tmp_path):
    root, _ = _policy_tree(tmp_path, bad=set(), n=3)

    def broken(image):
        raise KeyError("bug in a transform")

    dataset = ImageFolderDataset(root, transform=broken, on_bad_sample="skip")
    with pytest.raises(KeyError):
        dataset[0]
    assert dataset.num_skipped == 0


def test_index_out_of_range(tmp_path):
    root, files = _policy_tree(tmp_path, bad=set(), n=3)
    dataset = ImageFolderDataset(root)
    with pytest.raises(IndexError):
        dataset[3]
    assert dataset[-1][1] == files[-1][1]


# ============================================================================ COCO
CATEGORIES = [  # listed out of id order on purpose
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def _coco_fixture(tmp_path: Path) -> tuple[Path, Path, dict]:
    images = [
        {"id": 42, "file_name": "a.png", "width": 6, "height": 4},
        {"id": 7, "file_name": "b.png", "width": 6, "height": 4},
        {"id": 100, "file_name": "empty.png", "width": 6, "height": 4},  # no annotations
    ]
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 18, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0, 0, 3, 3], "area": 9, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 90, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 90, "bbox": [2, 1, 2, 2], "area": 4, "iscrowd": 0},
    ]
    data = {"info": {}, "images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}
    root = tmp_path / "images"
    for image in images:
        save_solid(root / image["file_name"], colour_of(image["id"]))
    ann = tmp_path / "instances_test.json"
    ann.write_text(json.dumps(data))
    return root, ann, data


def _coco_reference(data: dict) -> tuple[list[int], list[str], dict[int, list[float]]]:
    ids = sorted(c["id"] for c in data["categories"])
    names = [next(c["name"] for c in data["categories"] if c["id"] == i) for i in ids]
    targets = {}
    for image in data["images"]:
        row = [0.0] * len(ids)
        for a in data["annotations"]:
            if a["image_id"] == image["id"]:
                row[ids.index(a["category_id"])] = 1.0
        targets[image["id"]] = row
    return ids, names, targets


def test_coco_targets_follow_ascending_category_ids(tmp_path):
    root, ann, data = _coco_fixture(tmp_path)
    dataset = CocoMultiLabel(root, ann)
    ids, names, targets = _coco_reference(data)
    assert dataset.categories == names == ["person", "dog", "toothbrush"]
    assert dataset.category_ids == ids and dataset.num_classes == 3
    assert len(dataset) == 3
    assert dataset.targets.shape == (3, 3) and dataset.targets.dtype == torch.float32
    for index, image_id in enumerate(dataset.image_ids):
        image, target = dataset[index]
        assert target.dtype == torch.float32 and target.tolist() == targets[image_id]
        assert dataset.targets[index].tolist() == targets[image_id]
        assert pixels(image)[0, 0].tolist() == list(colour_of(image_id))
    by_id = dict(zip(dataset.image_ids, dataset.targets.tolist(), strict=True))
    assert by_id[42] == [1.0, 1.0, 0.0]  # iscrowd person counts
    assert by_id[100] == [0.0, 0.0, 0.0]  # kept, all zero
    target = dataset[0][1]
    target += 5
    assert dataset[0][1].max() <= 1  # items are copies of the table


def test_coco_transform_and_skip(tmp_path):
    root, ann, data = _coco_fixture(tmp_path)
    (root / "b.png").write_bytes(b"")  # image id 7, first in id order
    dataset = CocoMultiLabel(
        root, ann, transform=lambda im: torch.tensor(pixels(im)[0, 0]), on_bad_sample="skip"
    )
    _, _, targets = _coco_reference(data)
    colour, target = dataset[0]
    assert dataset.image_ids[1] == 42
    assert colour.tolist() == list(colour_of(42)) and target.tolist() == targets[42]
    assert dataset.num_skipped == 1 and dataset.bad_paths == [str(root / "b.png")]
    with pytest.raises(BadImageError, match="b.png"):
        CocoMultiLabel(root, ann)[0]


# Each case breaks the fixture in one way; the error must name the file and the offending key.
COCO_BREAKAGES = {
    "no images": (lambda d: d.pop("images"), "the top level has no 'images' key"),
    "no annotations": (lambda d: d.pop("annotations"), "the top level has no 'annotations' key"),
    "no categories": (lambda d: d.pop("categories"), "the top level has no 'categories' key"),
    "no file_name": (lambda d: d["images"][1].pop("file_name"), "images[1] has no 'file_name'"),
    "no image id": (lambda d: d["images"][0].pop("id"), "images[0] has no 'id'"),
    "no category_id": (
        lambda d: d["annotations"][2].pop("category_id"),
        "annotations[2] has no 'category_id'",
    ),
    "unknown category": (
        lambda d: d["annotations"][0].update(category_id=3),
        "annotations[0]['category_id'] = 3",
    ),
    "unknown image": (lambda d: d["annotations"][3].update(image_id=5), "annotations[3]['image_id'] = 5"),
    "duplicate image id": (lambda d: d["images"][2].update(id=42), "images[2] repeats image id 42"),
    "duplicate category id": (
        lambda d: d["categories"][2].update(id=1),
        "categories[2] repeats category id 1",
    ),
}


@pytest.mark.parametrize("case", list(COCO_BREAKAGES))
def test_coco_validation_names_file_and_key(tmp_path, case):
    root, ann, data = _coco_fixture(tmp_path)
    mutate, message = COCO_BREAKAGES[case]
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        CocoMultiLabel(root, ann)
    assert "instances_test.json" in str(info.value)


def test_coco_validate_files(tmp_path):
    root, ann, _ = _coco_fixture(tmp_path)
    CocoMultiLabel(root, ann, validate_files=True)
    (root / "empty.png").unlink()
    CocoMultiLabel(root, ann)  # not checked by default
    with pytest.raises(FileNotFoundError, match="empty.png"):
        CocoMultiLabel(root, ann, validate_files=True)


# ============================================================================ Tencent ML-Images
def test_parse_tencent_line_forms():
    assert parse_tencent_line("17382017900_f7152f6e1c_o.jpg\t940:0.8\t860:0.8\t17:1\t1:1\n") == (
        "17382017900_f7152f6e1c_o.jpg",
        [(940, 0.8), (860, 0.8), (17, 1.0), (1, 1.0)],
    )
    assert parse_tencent_line(
        "https://c4.staticflickr.com/8/7239/6997334729_e5fb3938b1_o.jpg  3:1  5193:0.9   5851:0.9 9413:1\r\n"
    ) == ("6997334729_e5fb3938b1_o.jpg", [(3, 1.0), (5193, 0.9), (5851, 0.9), (9413, 1.0)])
    assert parse_tencent_line("n04310904/n04310904_8388.JPEG 1053 1193:0.8 7") == (
        "n04310904/n04310904_8388.JPEG",
        [(1053, 1.0), (1193, 0.8), (7, 1.0)],
    )
    assert parse_tencent_line("my photo.jpg\t5:1.0 6:0.9") == ("my photo.jpg", [(5, 1.0), (6, 0.9)])
    assert parse_tencent_line("only_path.jpg") == ("only_path.jpg", [])
    assert parse_tencent_line("http://example.com/a/my%20pic.jpg?size=2#top 4") == ("my pic.jpg", [(4, 1.0)])


@pytest.mark.parametrize(
    "line, message",
    [
        ("a.jpg\t5:x", "not a number"),
        ("a.jpg\tfoo:1", "non-negative integer"),
        ("a.jpg\t-3:1", "non-negative integer"),
        ("a.jpg\t5:", "not a number"),
        ("a.jpg\t5:1.5", r"\[0, 1\]"),
        ("a.jpg\t5:nan", r"\[0, 1\]"),
        ("\t3:1", "empty image path"),
        ("   ", "empty image path"),
        ("https://example.com/ 3:1", "no file name"),
    ],
)
def test_parse_tencent_line_malformed(line, message):
    with pytest.raises(ValueError, match=message):
        parse_tencent_line(line)


TENCENT_LIST = (
    "n04310904/n04310904_8388.JPEG\t3:1\t1:0.9\n"
    "https://c2.staticflickr.com/4/3035/3033882900_a9a4263c55_o.jpg  5:0.8  2:0.8   7\n"
    "\n"
    "plain.jpg\t0:1\t6:1.0\t4:0.95\t4:0.7\n"
    "nolabels.jpg\n"
)


def _tencent_fixture(tmp_path: Path, text: str = TENCENT_LIST) -> tuple[Path, Path]:
    root = tmp_path / "root"
    names = ["n04310904/n04310904_8388.JPEG", "3033882900_a9a4263c55_o.jpg", "plain.jpg", "nolabels.jpg"]
    for i, name in enumerate(names):
        save_solid(root / name, colour_of(i), size=(5, 5))
        # .JPEG suffix with PNG content: Pillow detects the format from the bytes, not the name
    listing = tmp_path / "list.txt"
    listing.write_text(text)
    return root, listing


def _tencent_reference(text: str, num_classes: int, min_confidence=None, soft=False) -> list[list[float]]:
    rows = []
    for line in text.splitlines():
        fields = line.replace("\t", " ").split()
        if not fields:
            continue
        row = [0.0] * num_classes
        for token in fields[1:]:
            label, _, conf = token.partition(":")
            c = float(conf) if conf else 1.0
            if min_confidence is None or c >= min_confidence:
                row[int(label)] = max(row[int(label)], c if soft else 1.0)
        rows.append(row)
    return rows


@pytest.mark.parametrize("min_confidence, soft", [(None, False), (None, True), (0.9, False), (0.85, True)])
def test_tencent_targets(tmp_path, min_confidence, soft):
    root, listing = _tencent_fixture(tmp_path)
    dataset = TencentML(root, listing, num_classes=8, min_confidence=min_confidence, soft_targets=soft)
    reference = _tencent_reference(TENCENT_LIST, 8, min_confidence, soft)
    assert len(dataset) == 4
    for index in range(4):
        image, target = dataset[index]
        assert target.shape == (8,) and target.dtype == torch.float32
        assert torch.allclose(target, torch.tensor(reference[index])), (index, target, reference[index])
        assert pixels(image)[0, 0].tolist() == list(colour_of(index))
    assert torch.allclose(dataset.targets, torch.tensor(reference))
    assert dataset.paths[1] == os.path.join(str(root), "3033882900_a9a4263c55_o.jpg")


@pytest.mark.parametrize(
    "line, message",
    [
        ("b.jpg\t3:1\t2:abc", "not a number"),
        ("b.jpg\t3:1\t8:1", r"label index 8 is outside \[0, 8\)"),
        ("\t3:1", "empty image path"),
        ("b.jpg\t3;1", "non-negative integer"),
    ],
)
def test_tencent_malformed_line_reports_file_and_line_number(tmp_path, line, message):
    text = "a.jpg\t1:1\n\n" + line + "\nc.jpg\t2:1\n"  # the bad line is line 3 (a blank line counts)
    listing = tmp_path / "bad_list.txt"
    listing.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        TencentML(tmp_path, listing, num_classes=8)
    assert f"{listing}:3:" in str(info.value)


def test_tencent_argument_checks_and_skip(tmp_path):
    root, listing = _tencent_fixture(tmp_path)
    with pytest.raises(ValueError, match="min_confidence"):
        TencentML(root, listing, num_classes=8, min_confidence=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        TencentML(root, listing, num_classes=0)
    with pytest.raises(ValueError, match="on_bad_sample"):
        TencentML(root, listing, num_classes=8, on_bad_sample="drop")
    (root / "plain.jpg").write_bytes(b"GIF89a")  # header only
    dataset = TencentML(root, listing, num_classes=8, on_bad_sample="skip")
    image, target = dataset[2]
    assert pixels(image)[0, 0].tolist() == list(colour_of(3))  # next one: nolabels.jpg
    assert target.sum() == 0 and dataset.num_skipped == 1
    (root / "nolabels.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="nolabels.jpg"):
        TencentML(root, listing, num_classes=8, validate_files=True)


def test_tencent_empty_list_and_path_array(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    dataset = TencentML(tmp_path, tmp_path / "empty.txt", num_classes=4)
    assert len(dataset) == 0 and dataset.targets.shape == (0, 4)
    paths = data_io.PathArray(iter(["a", "dossier/é.jpg", "", "z"]))
    assert list(paths) == ["a", "dossier/é.jpg", "", "z"] and paths[-3] == "dossier/é.jpg"
    with pytest.raises(IndexError):
        paths[4]


DICTIONARY_CLASSES = [
    TencentClass(0, "n00002452", -1, "thing"),
    TencentClass(1, "n00020827", 0, "matter"),
    TencentClass(2, "n07697537", 1, "hotdog, hot dog, red hot"),
    TencentClass(3, "n04310904", 0, "stethoscope"),
]


def test_read_tencent_dictionary_three_columns(tmp_path):
    path = tmp_path / "dictionary_and_semantic_hierarchy.txt"
    path.write_text("".join(f"{c.wnid}\t{c.parent}\t{c.name}\n" for c in DICTIONARY_CLASSES))
    assert read_tencent_dictionary(path) == DICTIONARY_CLASSES


@pytest.mark.parametrize("separator, header", [("\t", True), (" ", True), ("  ", True), ("\t", False)])
def test_read_tencent_dictionary_four_columns(tmp_path, separator, header):
    path = tmp_path / "dictionary_and_semantic_hierarchy.txt"
    lines = ["category_index category_id index_of_parent_category category name\n"] if header else []
    for c in reversed(DICTIONARY_CLASSES):  # order in the file does not matter: the index column does
        lines.append(separator.join([str(c.index), c.wnid, str(c.parent), c.name]) + "\n")
    path.write_text("".join(lines))
    classes = read_tencent_dictionary(path)
    assert classes == DICTIONARY_CLASSES
    assert [c.index for c in classes] == list(range(4))


@pytest.mark.parametrize(
    "text, message",
    [
        ("0\tn1\t-1\tthing\n2\tn2\t0\tother\n", "index 1 is missing"),
        ("n1\t-1\tthing\nn2\t5\tother\n", r"parent 5, outside \[-1, 2\)"),
        ("n1\t-1\tthing\nn2\tx\tother\n", ":2: class and parent indices must be integers"),
        ("n1\t-1\tthing\nn2\n", ":2: expected 3 columns"),
    ],
)
def test_read_tencent_dictionary_errors(tmp_path, text, message):
    path = tmp_path / "dictionary.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_tencent_dictionary(path)
    assert "dictionary.txt" in str(info.value)


# ============================================================================ class-per-folder
def test_image_folder_matches_torchvision(tmp_path):
    root = tmp_path / "train"
    files = [
        "b/x2.png",
        "b/x1.JPG",
        "a/nested/deep/z.png",
        "a/y.jpeg",
        "c/w.bmp",
        "c/ignored.txt",
        "b/.hidden.png",
    ]
    for i, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.new("RGB", (4 + i, 3), colour_of(i)).save(path, format="PNG")  # decoded by content
    os.symlink(root / "a" / "y.jpeg", root / "c" / "linked.jpeg")
    ours = ImageFolderDataset(root)
    theirs = ImageFolder(str(root))
    assert ours.classes == theirs.classes == ["a", "b", "c"]
    assert ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets
    assert len(ours) == len(theirs) == 7
    for index in range(len(theirs)):
        image, label = ours[index]
        reference, reference_label = theirs[index]
        assert label == reference_label
        assert np.array_equal(pixels(image), pixels(reference))
    assert ImageNet100 is ImageFolderDataset


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "tree" / "empty_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "tree")


# ============================================================================ demo dataset
NUM_TRAIN, NUM_VAL, SIZE = 14, 12, 48


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("demo") / "demo", NUM_TRAIN, NUM_VAL, SIZE, seed=0, workers=1
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_and_depends_on_seed(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", NUM_TRAIN, NUM_VAL, SIZE, seed=0, workers=1)
    first, second = _tree(demo), _tree(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    other = make_demo_dataset(tmp_path / "other", NUM_TRAIN, NUM_VAL, SIZE, seed=1, workers=1)
    changed = _tree(other)
    assert changed["annotations/instances_train2017.json"] != first["annotations/instances_train2017.json"]
    assert changed["train2017/000000000001.jpg"] != first["train2017/000000000001.jpg"]


def test_demo_layout_and_coco_json(demo):
    assert (demo / ".complete").is_file() and (demo / "README.txt").read_text().startswith("ssl_zoo demo")
    assert not (demo.parent / ".demo.partial").exists()
    for split, count, first_id in (("train", NUM_TRAIN, 1), ("val", NUM_VAL, NUM_TRAIN + 1)):
        data = json.loads((demo / "annotations" / f"instances_{split}2017.json").read_text())
        assert set(data) >= {"info", "images", "annotations", "categories"}
        ids = [c["id"] for c in data["categories"]]
        assert ids == sorted(ids) and ids != list(range(1, len(ids) + 1))  # non-contiguous, like COCO
        assert [c["name"] for c in data["categories"]] == [c.name for c in DEMO_CLASSES]
        assert [im["id"] for im in data["images"]] == list(range(first_id, first_id + count))
        annotated = {a["image_id"] for a in data["annotations"]}
        assert any(im["id"] not in annotated for im in data["images"])  # background-only images exist
        for image in data["images"]:
            assert (demo / f"{split}2017" / image["file_name"]).is_file()
            assert image["width"] == image["height"] == SIZE
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
            for polygon in a["segmentation"]:
                xs, ys = polygon[0::2], polygon[1::2]
                # The polygon outlines the drawn shape: its extent matches the box within a pixel.
                assert (
                    min(xs) > x - 1.5
                    and max(xs) < x + w + 1.5
                    and min(ys) > y - 1.5
                    and max(ys) < y + h + 1.5
                )
        counts: dict[int, int] = {}
        for a in data["annotations"]:
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
        assert max(counts.values()) <= 4


def _demo_views(demo: Path, split: str):
    """Per-image labels as each of the three formats states them, parsed independently here."""
    data = json.loads((demo / "annotations" / f"instances_{split}2017.json").read_text())
    cat_name = {c["id"]: c["name"] for c in data["categories"]}
    coco: dict[str, set[str]] = {}
    largest: dict[str, str] = {}
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        coco[image["file_name"]] = {cat_name[a["category_id"]] for a in anns}
        if anns:
            best = max(anns, key=lambda a: a["bbox"][2] * a["bbox"][3])  # first on ties
            largest[image["file_name"]] = cat_name[best["category_id"]]
    dictionary = [
        line.split("\t")
        for line in (demo / "tencent" / "dictionary_and_semantic_hierarchy.txt").read_text().splitlines()
    ]
    tencent: dict[str, dict[str, float]] = {}
    for line in (demo / "tencent" / f"{split}.txt").read_text().splitlines():
        path, *pairs = line.split("\t")
        assert path.startswith(f"{split}2017/")
        tencent[path.split("/", 1)[1]] = {
            dictionary[int(p.split(":")[0])][2]: float(p.split(":")[1]) for p in pairs
        }
    folder = {p.name: p.parent.name for p in (demo / "folder" / split).glob("*/*.jpg")}
    return coco, largest, tencent, folder, dictionary


@pytest.mark.parametrize("split", ["train", "val"])
def test_demo_views_agree(demo, split):
    coco, largest, tencent, folder, dictionary = _demo_views(demo, split)
    parent_of = {name: dictionary[int(parent)][2] for _, parent, name in dictionary if int(parent) >= 0}
    assert [row[2] for row in dictionary] == list(SUPERCLASSES) + [c.name for c in DEMO_CLASSES]
    assert coco.keys() == tencent.keys()
    for name, classes in coco.items():
        leaves = {k for k, v in tencent[name].items() if v == 1.0}
        parents = {k for k, v in tencent[name].items() if v == 0.9}
        assert leaves == classes, name
        assert parents == {parent_of[c] for c in classes}, name
        assert set(tencent[name]) == leaves | parents
    assert folder == largest  # background-only images have no folder entry
    assert set(folder.values()) == {c.name for c in DEMO_CLASSES}  # every class present in both splits
    for name, cls in folder.items():
        assert (demo / "folder" / split / cls / name).read_bytes() == (
            demo / f"{split}2017" / name
        ).read_bytes()


def test_demo_is_read_by_every_reader(demo):
    coco = CocoMultiLabel(
        demo / "val2017", demo / "annotations" / "instances_val2017.json", validate_files=True
    )
    dictionary = read_tencent_dictionary(demo / "tencent" / "dictionary_and_semantic_hierarchy.txt")
    tencent = TencentML(demo, demo / "tencent" / "val.txt", num_classes=len(dictionary), validate_files=True)
    leaves_only = TencentML(
        demo, demo / "tencent" / "val.txt", num_classes=len(dictionary), min_confidence=1.0
    )
    folder = ImageFolderDataset(demo / "folder" / "val")
    assert coco.num_classes == len(DEMO_CLASSES) == len(dictionary) - len(SUPERCLASSES)
    assert len(coco) == len(tencent) == NUM_VAL
    tencent_column = [next(c.index for c in dictionary if c.name == name) for name in coco.categories]
    for index in range(NUM_VAL):
        image, target = coco[index]
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
        tencent_image, tencent_target = tencent[index]
        assert np.array_equal(pixels(image), pixels(tencent_image))
        assert torch.equal(leaves_only[index][1][tencent_column], target)
        assert torch.equal(tencent_target[tencent_column], target)
    assert folder.classes == sorted(c.name for c in DEMO_CLASSES)
    coco_by_file = {os.path.basename(p): coco.targets[i] for i, p in enumerate(coco.paths)}
    for path, label in folder.samples:
        assert coco_by_file[os.path.basename(path)][coco.categories.index(folder.classes[label])] == 1


def test_datasets_survive_pickling(demo):
    # DataLoader workers started with "spawn" (macOS, Windows, some DDP launchers) receive a pickled copy.
    datasets = [
        CocoMultiLabel(demo / "train2017", demo / "annotations" / "instances_train2017.json"),
        TencentML(demo, demo / "tencent" / "train.txt", num_classes=12, soft_targets=True),
        ImageFolderDataset(demo / "folder" / "train", on_bad_sample="skip"),
    ]
    for dataset in datasets:
        clone = pickle.loads(pickle.dumps(dataset))
        assert len(clone) == len(dataset) and list(clone.paths) == list(dataset.paths)
        for index in (0, len(dataset) - 1):
            (image, target), (image2, target2) = dataset[index], clone[index]
            assert np.array_equal(pixels(image), pixels(image2))
            assert torch.equal(torch.as_tensor(target), torch.as_tensor(target2))


def test_demo_class_shapes_are_distinct():
    # Learnability: two classes drawn at the same place and size never overlap by more than 80%
    # (soft IoU of the coverage masks), whatever the rotation of the second one.
    names = [c.name for c in DEMO_CLASSES]
    masks = {
        name: [_draw_object(name, 64, 32.0, 32.0, 20.0, angle) for angle in np.linspace(0, 2 * np.pi, 37)]
        for name in names
    }
    for i, a in enumerate(names):
        reference = masks[a][0]
        assert reference.sum() > 0.3 * 40 * 40 / 4, a  # a sizeable object, not a sliver
        for b in names[i + 1 :]:
            best = max(np.minimum(reference, m).sum() / np.maximum(reference, m).sum() for m in masks[b])
            assert best < 0.8, (a, b, best)


def test_demo_output_folder_rules(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        make_demo_dataset(foreign, 2, 2, 32, workers=1)
    assert (foreign / "thesis.tex").read_text() == "do not delete"
    out = make_demo_dataset(tmp_path / "d", 3, 2, 32, workers=1)
    make_demo_dataset(out, 2, 2, 32, workers=1)  # a previous demo is replaced
    assert len(list((out / "train2017").iterdir())) == 2
    for kwargs, name in (
        ({"num_train": 0}, "num_train"),
        ({"size": 16}, "size"),
        ({"workers": -1}, "workers"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ValueError, match=name):
            make_demo_dataset(tmp_path / "x", **{"num_train": 2, "num_val": 2, "size": 32, **kwargs})


def test_demo_command_line(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path / "cli"),
                "--num-train",
                "3",
                "--num-val",
                "2",
                "--size",
                "32",
                "--seed",
                "3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "3 + 2 demo images" in capsys.readouterr().out
    assert (tmp_path / "cli" / ".complete").is_file()
    assert len(list((tmp_path / "cli" / "val2017").glob("*.jpg"))) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--num-val", "0"])
