"""Tencent-ML-Images reader (``ssl_zoo.data.tencent``): line forms, targets and confidences against an independent
parse, several lists each with its image root, the class dictionary, and malformed lines named by file and line."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from ssl_zoo.data import (
    TencentClass,
    TencentML,
    image_list,
    parse_tencent_line,
    read_tencent_dictionary,
)
from tests.data.images import colour_encoding, index_from_colour, pixels, save_solid


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
        save_solid(root / name, colour_encoding(i), size=(5, 5))
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
    assert index_from_colour(pixels(image)[0, 0]) == 3  # the next one, d.jpg, with its (empty) label set
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


def colour_of_index(index: int) -> tuple[int, int, int]:
    return (index * 17 % 256, 255 - index * 29 % 256, 100 + index * 7 % 150)


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
        save_solid(root / name, colour_of_index(i), size=(5, 5))
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
        assert pixels(image)[0, 0].tolist() == list(colour_of_index(index))
    assert torch.allclose(dataset.targets, torch.tensor(reference))
    assert dataset.paths[1] == os.path.join(str(root), "3033882900_a9a4263c55_o.jpg")


def test_tencent_empty_list_and_path_array(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    dataset = TencentML(tmp_path, tmp_path / "empty.txt", num_classes=4)
    assert len(dataset) == 0 and dataset.targets.shape == (0, 4)
    paths = image_list.PathArray(iter(["a", "dossier/é.jpg", "", "z"]))
    assert list(paths) == ["a", "dossier/é.jpg", "", "z"] and paths[-3] == "dossier/é.jpg"
    with pytest.raises(IndexError):
        paths[4]


def test_parse_tencent_url_file_names():
    """A URL stands for its basename, or for <last directory>_<basename> as the release's
    download_urls_multithreading.py names the file (url.split('/')[-2] + '_' + url.split('/')[-1])."""
    url = "https://c4.staticflickr.com/8/7239/6997334729_e5fb3938b1_o.jpg  3:1  5193:0.9"
    assert parse_tencent_line(url)[0] == "6997334729_e5fb3938b1_o.jpg"
    parts = url.split()[0].split("/")
    assert parse_tencent_line(url, url_file_name="parent_basename") == (
        f"{parts[-2]}_{parts[-1]}", [(3, 1.0), (5193, 0.9)])
    assert parse_tencent_line("n04310904/n04310904_8388.JPEG 1", url_file_name="parent_basename")[0] == (
        "n04310904/n04310904_8388.JPEG")  # not a URL: kept as it is


# The two parts of the release, each listed relative to its own image folder.
IMAGENET_PART = "n01/n01_1.JPEG\t3:1\t1:1\n\nn02/n02_7.JPEG 2:1 1:0.9\n"


OPENIMAGES_PART = ("https://c1.staticflickr.com/4/3593/5715926508_bb4fe6d4bc_o.jpg  5:0.9  4:1\n"
                   "https://c2.staticflickr.com/4/3035/3033882900_a9a4263c55_o.jpg\t0:1\n")


def _two_part_fixture(tmp_path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    roots = [tmp_path / "imagenet", tmp_path / "openimages"]
    files = [roots[0] / "n01/n01_1.JPEG", roots[0] / "n02/n02_7.JPEG",
             roots[1] / "3593_5715926508_bb4fe6d4bc_o.jpg", roots[1] / "3035_3033882900_a9a4263c55_o.jpg"]
    for i, path in enumerate(files):
        save_solid(path, colour_of_index(i), size=(5, 5))
    lists = [tmp_path / "train_image_id_from_imagenet.txt", tmp_path / "train_urls_from_openimages.txt"]
    lists[0].write_text(IMAGENET_PART)
    lists[1].write_text(OPENIMAGES_PART)
    return roots, lists, files


def test_tencent_several_lists_each_with_its_image_root(tmp_path):
    roots, lists, files = _two_part_fixture(tmp_path)
    dataset = TencentML(roots, lists, num_classes=6, url_file_name="parent_basename", soft_targets=True)
    reference = _tencent_reference(IMAGENET_PART + OPENIMAGES_PART, 6, soft=True)
    assert len(dataset) == 4 and list(dataset.list_offsets) == [0, 2, 4]
    assert [dataset.paths[i] for i in range(4)] == [str(f) for f in files]
    for index in range(4):
        image, target = dataset[index]
        assert pixels(image)[0, 0].tolist() == list(colour_of_index(index))
        assert torch.allclose(target, torch.tensor(reference[index])), index
    # One folder for every list is also accepted; a count of folders that fits neither form is not.
    assert len(TencentML(tmp_path, lists[:1], num_classes=6)) == 2
    with pytest.raises(ValueError, match="one folder for all lists or one per list"):
        TencentML([tmp_path, tmp_path, tmp_path], lists, num_classes=6)
    with pytest.raises(ValueError, match="url_file_name"):
        TencentML(roots, lists, num_classes=6, url_file_name="stem")


def test_tencent_several_lists_name_the_list_and_line_at_fault(tmp_path):
    roots, lists, files = _two_part_fixture(tmp_path)
    files[1].unlink()  # the ImageNet list's line 3 (line 2 is blank)
    files[3].unlink()  # the Open Images list's line 2
    with pytest.raises(FileNotFoundError) as info:
        TencentML(roots, lists, num_classes=6, url_file_name="parent_basename", validate_files=True)
    message = str(info.value)
    assert "2 of 4 images" in message
    assert f"{lists[0]}:3: '{files[1]}'" in message and f"{lists[1]}:2: '{files[3]}'" in message
    # With the basename reading the Open Images files are not found under their download names.
    with pytest.raises(FileNotFoundError, match=f"{lists[1]}:1: "):
        TencentML(roots, lists, num_classes=6, validate_files=True)
    lists[1].write_text(OPENIMAGES_PART + "a.jpg\t9:1\n")
    with pytest.raises(ValueError, match=rf"{lists[1]}:3: label index 9 is outside \[0, 6\)"):
        TencentML(roots, lists, num_classes=6)


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
