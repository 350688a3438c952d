"""``on_bad_sample`` (``ssl_zoo.data.bad_sample_policy``): ``raise`` names the file, ``skip`` substitutes the next
readable image with its own label; the skip count against a brute-force walk, also with DataLoader workers.

Generated images encode their own identity in their pixels, so a label that shifted to another image is caught.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ssl_zoo.data import (
    BadImageError,
    BadSamplePolicy,
    ImageFolderDataset,
)
from ssl_zoo.data.datamodule import CocoDataModule, ViewDataset
from ssl_zoo.utils.bad_samples import read_bad_files
from tests.data.images import pixels, save_solid


def colour_encoding(index: int) -> tuple[int, int, int]:
    """A colour that encodes ``index`` exactly (for ``index < 65536``)."""
    return (index % 256, index // 256, 77)


def index_from_colour(colour) -> int:
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
    """``root/<class>/<i>.png`` with image ``i`` of class ``i % num_classes`` coloured ``colour_encoding(i)``.

    ``bad`` maps image numbers to a kind of breakage. A class-per-folder dataset lists what is on disk, so
    "missing" files are written here and must be removed with :func:`remove_missing` after the dataset
    is built (a file deleted while a run goes on). Returns ``(path, label, is_bad)`` in ImageFolder order
    (class folder, then file name).
    """
    files = []
    for i in range(n):
        label = i % num_classes
        path = save_solid(root / f"c{label}" / f"{i:03d}.png", colour_encoding(i))
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
        assert index_from_colour(pixels(image)[0, 0]) == int(files[used][0].stem), (position, used)
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
                image_number = index_from_colour(batch["views"][b, 0, :, 0, 0].long().tolist())
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
