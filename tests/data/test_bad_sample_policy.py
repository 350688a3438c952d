"""``on_bad_sample`` (``ssl_zoo.data.bad_sample_policy``): ``raise`` names the file, ``skip`` substitutes the next
readable image with its own label; the skip count against a brute-force walk, also with DataLoader workers.

Generated images encode their own identity in their pixels, so a label that shifted to another image is caught.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_zoo.data import (
    BadImageError,
    BadSamplePolicy,
    ImageFolderDataset,
)
from ssl_zoo.data.datamodule import CocoDataModule, ViewDataset
from ssl_zoo.utils.bad_samples import read_bad_files
from tests.data.images import (
    BAD_KINDS,
    expected_walk,
    index_from_colour,
    labelled_tree,
    pixel_views,
    pixels,
    remove_missing,
    save_solid,
)


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
