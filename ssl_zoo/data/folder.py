"""Class-per-folder trees (ImageNet-1K, ImageNet-100, the demo's ``folder/`` view).

The file discovery is torchvision's own (``find_classes`` / ``make_dataset``), so classes, their indices
and the sample order are exactly those of ``torchvision.datasets.ImageFolder``; only the decoding (robust
:func:`~ssl_zoo.data.decode.load_image`) and the ``on_bad_sample`` policy differ. ImageNet-100 is this class
on a folder holding the 100 chosen class directories. A subset list (SimCLR's ``1percent.txt`` /
``10percent.txt`` for semi-supervised fine-tuning) keeps only the listed images, with the classes of the full tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ssl_zoo.data.image_list import ImageListDataset

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "read_subset_list"]


def read_subset_list(path: str | os.PathLike[str]) -> dict[str, int]:
    """The image file names of a subset list, one per line (SimCLR's format: ``n01440764_10026.JPEG``).

    A line may also be a path relative to the split folder (``n01440764/n01440764_10026.JPEG``); only its
    file name is used. Blank lines are ignored. Returns ``{file name: line number}``; a name listed twice
    raises ``ValueError`` naming both lines.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subset list '{path}' does not exist")
    names: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            name = os.path.basename(line.strip())
            if not name:
                continue
            if name in names:
                raise ValueError(f"{path}:{line_no}: '{name}' is listed twice (first on line {names[name]})")
            names[name] = line_no
    if not names:
        raise ValueError(f"subset list '{path}' lists no images")
    return names


class ImageFolderDataset(ImageListDataset):
    """``root/<class>/**/<image>`` as ``item = (image, int label)`` with torchvision ImageFolder semantics.

    Classes are the sub-directories of ``root`` sorted by name, ``class_to_idx`` maps them to
    ``0..K-1``; files with an image extension (``IMG_EXTENSIONS``, case-insensitive) are collected
    recursively, following symlinks, in sorted order. A class folder without images raises
    ``FileNotFoundError``, as in torchvision.

    Args:
        root: the split folder, e.g. ``imagenet/train``.
        transform: applied to the decoded RGB ``PIL.Image``.
        on_bad_sample: ``"raise"`` or ``"skip"`` (see :class:`~ssl_zoo.data.bad_sample_policy.BadSamplePolicy`).
        subset: optional subset list (:func:`read_subset_list`): keep only the images it names, in the
            tree's order; classes and their indices stay those of the whole tree. A listed name that is not
            in the tree raises ``ValueError`` naming the list file and line.

    Attributes:
        classes, class_to_idx: as in torchvision.
        samples: ``list[(path, label)]``, as in torchvision (built from compact arrays on each access).
        targets: ``list[int]`` label of each sample.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        subset: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root '{self.root}' does not exist or is not a directory")
        self.classes, self.class_to_idx = find_classes(self.root)
        samples = make_dataset(self.root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        if subset is not None:
            wanted = read_subset_list(subset)
            samples = [s for s in samples if os.path.basename(s[0]) in wanted]
            found = {os.path.basename(p) for p, _ in samples}
            missing = [(name, line_no) for name, line_no in wanted.items() if name not in found]
            if missing:
                name, line_no = missing[0]
                raise ValueError(f"{os.fspath(subset)}:{line_no}: '{name}' is not an image under '{self.root}' "
                                 f"({len(missing)} of the {len(wanted)} listed images are missing)")
        super().__init__([path for path, _ in samples], transform, on_bad_sample)
        self._labels = np.asarray([label for _, label in samples], dtype=np.int64)  # [N]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return self._labels.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        return list(zip(self.paths, self.targets, strict=True))

    def target(self, index: int) -> int:
        return int(self._labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, images={len(self)}, classes={self.num_classes}, "
            f"on_bad_sample={self.on_bad_sample!r})"
        )
