"""Tencent ML-Images list files and class dictionary (the HVP-MTL pre-training data).

List format, one image per line: the image, then ``<label index>:<confidence>`` pairs::

    17382017900_f7152f6e1c_o.jpg<TAB>940:0.8<TAB>860:0.8<TAB>17:1<TAB>1:1
    https://c4.staticflickr.com/8/7239/6997334729_e5fb3938b1_o.jpg  3:1  5193:0.9  5851:0.9 9413:1
    n04310904/n04310904_8388.JPEG 1053 1193:0.8

Fields are separated by tabs or runs of spaces. When a line contains a tab, the image is the text before
the first tab (so tab-separated lists may have spaces in file names); otherwise it is the first
whitespace-separated field. A URL stands for its basename (``url_file_name="basename"``, what the first
download script saved), or for ``<last directory>_<basename>`` (``"parent_basename"``: what today's
``data/download_urls_multithreading.py`` of the release saves). A label without ``:conf`` has confidence
1.0. The published annotations give every image its labels *and their ancestors* in the semantic hierarchy,
ancestors often at a lower confidence (0.8 / 0.9).

The data set as released today comes in two parts with their own lists, each part with its own images:

* ``train_image_id_from_imagenet.txt`` / ``val_image_id_from_imagenet.txt``: ImageNet image ids
  (``n04310904/n04310904_8388.JPEG``), relative to a copy of the full ImageNet release (10,706,941 training
  and 50,000 validation images);
* ``train_urls_from_openimages.txt`` / ``val_urls_from_openimages.txt``: Open Images URLs (6,902,811 and
  38,739), downloaded into a folder of their own.

17,609,752 training and 88,739 validation images in all (the combined ``train_urls.txt`` / ``val_urls.txt``
of the first release are withdrawn). :class:`TencentML` reads several lists into one dataset, each list
with its own image root.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple, TypeAlias
from urllib.parse import unquote

import numpy as np
import torch
from torch import Tensor

from ssl_zoo.data.image_list import ImageListDataset, PathArray

__all__ = [
    "TENCENT_NUM_CLASSES",
    "TencentClass",
    "TencentML",
    "parse_tencent_line",
    "read_tencent_dictionary",
]

TENCENT_NUM_CLASSES = 11166

UrlFileName: TypeAlias = Literal["basename", "parent_basename"]
URL_FILE_NAMES: tuple[str, ...] = ("basename", "parent_basename")

_DICTIONARY_HEADER = ("category_index", "category_id", "index_of_parent_category")


class TencentClass(NamedTuple):
    """One class of the Tencent ML-Images semantic hierarchy."""

    index: int  # class index 0..K-1, the label index used in the list files
    wnid: str  # WordNet id, e.g. "n00002452"
    parent: int  # index of the parent class, -1 for a root
    name: str  # readable name(s), may contain spaces and commas


def _image_from_field(field: str, url_file_name: UrlFileName = "basename") -> str:
    """A URL becomes its (percent-decoded) basename, or ``<last directory>_<basename>``; relative paths and
    file names are kept as they are."""
    if "://" not in field:
        return field
    # The file name is the last segment of the URL path (query and fragment dropped). Done by hand
    # rather than with urllib.parse.urlsplit, which costs as much as the rest of the line's parsing.
    location = field.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]  # host/dir/name
    _, _, url_path = location.partition("/")
    parent, _, name = url_path.rpartition("/")
    if not name:
        raise ValueError(f"URL {field!r} has no file name")
    if url_file_name == "parent_basename":
        # download_urls_multithreading.py: im_name = url.split('/')[-2] + '_' + url.split('/')[-1]
        name = f"{parent.rsplit('/', 1)[-1]}_{name}"
    return unquote(name) if "%" in name else name


def _parse_pair(token: str) -> tuple[int, float]:
    label_text, sep, conf_text = token.partition(":")
    if not (label_text.isascii() and label_text.isdigit()):  # rejects "", "-1", "+1", "1.5", "abc"
        raise ValueError(f"label pair {token!r}: label index must be a non-negative integer")
    if not sep:
        return int(label_text), 1.0
    try:
        confidence = float(conf_text)
    except ValueError:
        raise ValueError(f"label pair {token!r}: confidence {conf_text!r} is not a number") from None
    if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
        raise ValueError(f"label pair {token!r}: confidence must lie in [0, 1]")
    return int(label_text), confidence


def parse_tencent_line(line: str, url_file_name: UrlFileName = "basename") -> tuple[str, list[tuple[int, float]]]:
    """Parse one line of a Tencent ML-Images list (pure function, no range check on label indices).

    Args:
        line: ``<image path, file name or URL>`` followed by ``label[:confidence]`` fields separated by
            tabs or runs of spaces; a trailing newline is ignored.
        url_file_name: the file a URL stands for: its ``basename`` or ``parent_basename``
            (``<last directory>_<basename>``, the name today's download script of the release saves).

    Returns:
        ``(path, [(label, confidence), ...])`` in the order listed; ``path`` is a URL's file name.

    Raises:
        ValueError: empty path, or a field that is not ``<int>`` / ``<int>:<float in [0, 1]>``.
    """
    line = line.rstrip("\r\n")
    if "\t" in line:
        # Tab-separated list: the path is everything before the first tab, so it may contain spaces.
        head, _, rest = line.partition("\t")
        path = head.strip()
        tokens = rest.split()
    else:
        tokens = line.split()
        path = tokens[0] if tokens else ""
        tokens = tokens[1:]
    if not path:
        raise ValueError("empty image path")
    return _image_from_field(path, url_file_name), [_parse_pair(token) for token in tokens]


def read_tencent_dictionary(path: str | os.PathLike[str]) -> list[TencentClass]:
    """Read ``dictionary_and_semantic_hierarchy.txt`` in either published form.

    - 3 columns, ``wnid<TAB>parent_index<TAB>names``, line ``i`` describing class ``i``;
    - 4 columns ``category_index category_id index_of_parent_category category name`` (tabs or spaces,
      the name may contain spaces and commas), usually with that header line.

    Returns:
        Classes ordered by index (``result[i].index == i``).

    Raises:
        ValueError: wrong column count, non-integer index, indices not exactly ``0..K-1``, or a parent
            index outside ``[-1, K)``; the message names the file and line number.
    """
    source = os.fspath(path)
    with open(source, encoding="utf-8") as f:
        lines = [(number, text.rstrip("\r\n")) for number, text in enumerate(f, start=1)]
    lines = [(number, text) for number, text in lines if text.strip()]
    if not lines:
        raise ValueError(f"{source}: empty class dictionary")
    if tuple(lines[0][1].split()[:3]) == _DICTIONARY_HEADER:
        lines = lines[1:]
        four_columns = True
    else:
        # Without a header, a leading integer index marks the 4-column form ("0<TAB>n00002452<TAB>-1<TAB>thing").
        first = lines[0][1].split()
        four_columns = len(first) >= 4 and first[0].isascii() and first[0].isdigit()

    classes: list[TencentClass] = []
    for position, (number, text) in enumerate(lines):
        where = f"{source}:{number}"
        if four_columns:
            fields = text.split(maxsplit=3)
            if len(fields) < 4:
                raise ValueError(
                    f"{where}: expected 4 columns (index, wnid, parent, name), got {len(fields)}"
                )
            index_text, wnid, parent_text, name = fields
        else:
            fields = text.split("\t", 2) if "\t" in text else text.split(maxsplit=2)
            if len(fields) < 3:
                raise ValueError(f"{where}: expected 3 columns (wnid, parent, names), got {len(fields)}")
            wnid, parent_text, name = fields
            index_text = str(position)
        try:
            index, parent = int(index_text), int(parent_text)
        except ValueError:
            raise ValueError(f"{where}: class and parent indices must be integers, got {text!r}") from None
        classes.append(TencentClass(index, wnid.strip(), parent, name.strip()))

    classes.sort(key=lambda c: c.index)
    count = len(classes)
    for position, cls in enumerate(classes):
        if cls.index != position:
            raise ValueError(
                f"{source}: class indices must be exactly 0..{count - 1}; index {position} is "
                f"{'missing' if cls.index > position else 'repeated'}"
            )
        if not -1 <= cls.parent < count:
            raise ValueError(f"{source}: class {cls.index} has parent {cls.parent}, outside [-1, {count})")
    return classes


PathLike: TypeAlias = str | os.PathLike[str]


def _as_tuple(value: PathLike | Sequence[PathLike], what: str) -> tuple[str, ...]:
    if isinstance(value, str | os.PathLike):
        return (os.fspath(value),)
    values = tuple(os.fspath(v) for v in value)
    if not values:
        raise ValueError(f"{what}: give at least one")
    return values


class TencentML(ImageListDataset):
    """Tencent ML-Images multi-label dataset: ``item = (image, target Float[num_classes])``.

    One list, or several read one after the other into one dataset (the release's ImageNet and Open Images
    lists), each list with its own image folder.

    Args:
        root: folder the list's image paths are relative to (a URL's file name is looked up directly in it);
            with several lists, one folder for all of them or one per list, in the same order.
        list_file: the image list (e.g. ``train_urls_from_openimages.txt``, or ``train.txt``), or several.
        num_classes: target length; every label index must lie in ``[0, num_classes)``.
        transform: applied to the decoded RGB ``PIL.Image``.
        on_bad_sample: ``"raise"`` or ``"skip"`` (see :class:`~ssl_zoo.data.bad_sample_policy.BadSamplePolicy`).
        min_confidence: keep only labels with confidence ``>= min_confidence``; None keeps every listed label.
        soft_targets: target values are the confidences (the largest if a label is listed twice)
            instead of 1.
        validate_files: check at construction that every listed image exists.
        url_file_name: the file a URL stands for, ``basename`` or ``parent_basename`` (see
            :func:`parse_tencent_line`).

    Samples are numbered list after list (``list_offsets[i]`` is the first sample of list ``i``). Labels are
    stored as flat arrays (``label_offsets``, ``labels``, ``confidences``), not one Python list
    per image: the 17M-line lists would otherwise cost gigabytes in every DataLoader worker.
    """

    def __init__(
        self,
        root: PathLike | Sequence[PathLike],
        list_file: PathLike | Sequence[PathLike],
        num_classes: int = TENCENT_NUM_CLASSES,
        transform: Callable | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        min_confidence: float | None = None,
        soft_targets: bool = False,
        validate_files: bool = False,
        url_file_name: UrlFileName = "basename",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must lie in [0, 1] or be None, got {min_confidence}")
        if url_file_name not in URL_FILE_NAMES:
            raise ValueError(f"url_file_name must be one of {URL_FILE_NAMES}, got {url_file_name!r}")
        self.list_files = _as_tuple(list_file, "list_file")
        roots = _as_tuple(root, "root")
        if len(roots) == 1:
            roots = roots * len(self.list_files)
        if len(roots) != len(self.list_files):
            raise ValueError(f"root: give one folder for all lists or one per list; got {len(roots)} folders "
                             f"for the {len(self.list_files)} lists {list(self.list_files)}")
        self.roots = roots
        # The arguments as given: one path, or the tuple of paths.
        self.root = roots[0] if isinstance(root, str | os.PathLike) else roots
        self.list_file = self.list_files[0] if isinstance(list_file, str | os.PathLike) else self.list_files
        self.num_classes = num_classes
        self.min_confidence = min_confidence
        self.soft_targets = soft_targets

        # Compact accumulators (4-8 bytes per value): the full lists have ~17.6M lines and ~8 labels per line.
        counts = array("q")
        labels = array("i")
        confidences = array("f")
        list_starts = array("q")

        def image_paths() -> Iterator[str]:
            # Parses each list once; yields each image path and records its labels on the side.
            # Binary lines decoded one by one, so that a stray non-UTF-8 byte is reported with its line.
            for list_path, image_root in zip(self.list_files, self.roots, strict=True):
                list_starts.append(len(counts))
                with open(list_path, "rb") as f:
                    for number, raw in enumerate(f, start=1):
                        try:
                            line = raw.decode("utf-8")
                        except UnicodeDecodeError as error:
                            raise ValueError(f"{list_path}:{number}: not valid UTF-8 ({error})") from None
                        if not line.strip():
                            continue
                        try:
                            path, pairs = parse_tencent_line(line, url_file_name)
                        except ValueError as error:
                            raise ValueError(f"{list_path}:{number}: {error}") from None
                        for label, _ in pairs:
                            if label >= num_classes:
                                raise ValueError(
                                    f"{list_path}:{number}: label index {label} is outside "
                                    f"[0, {num_classes}) (num_classes={num_classes})"
                                )
                        if min_confidence is not None:
                            pairs = [(label, conf) for label, conf in pairs if conf >= min_confidence]
                        counts.append(len(pairs))
                        labels.extend(label for label, _ in pairs)
                        confidences.extend(conf for _, conf in pairs)
                        yield os.path.join(image_root, path)

        super().__init__(PathArray(image_paths()), transform, on_bad_sample)
        self.url_file_name = url_file_name
        # [lists + 1]: samples list_offsets[i] .. list_offsets[i + 1] - 1 come from list i.
        self.list_offsets = np.append(np.frombuffer(list_starts, dtype=np.int64), len(counts)).astype(np.int64)
        self.label_offsets = np.zeros(len(counts) + 1, dtype=np.int64)  # [N+1], CSR row pointers
        np.cumsum(np.frombuffer(counts, dtype=np.int64), out=self.label_offsets[1:])
        self.labels = np.frombuffer(labels, dtype=np.int32).copy()  # [L], all listed labels
        self.confidences = np.frombuffer(confidences, dtype=np.float32).copy()  # [L]
        if validate_files:
            self.check_files(" + ".join(self.list_files))

    def locate(self, indices: Sequence[int]) -> list[str]:
        # Line numbers are not stored (4-8 bytes x 17M lines in every worker); one pass over each list that holds
        # a wanted sample finds them when an error message needs them. Blank lines are skipped by the parser and
        # are not samples.
        where: dict[int, str] = {}
        for list_index, list_path in enumerate(self.list_files):
            start, end = int(self.list_offsets[list_index]), int(self.list_offsets[list_index + 1])
            wanted = {index for index in indices if start <= index < end}
            if not wanted:
                continue
            with open(list_path, "rb") as f:  # split into lines exactly as the parser does
                sample = start
                for number, raw in enumerate(f, start=1):
                    if not raw.decode("utf-8", errors="replace").strip():
                        continue
                    if sample in wanted:
                        where[sample] = f"{list_path}:{number}"
                        if len(where) == len(set(indices)):
                            break
                    sample += 1
        return [where.get(index, f"sample {index}") for index in indices]

    def label_pairs(self, index: int) -> list[tuple[int, float]]:
        """The ``(label, confidence)`` pairs of sample ``index`` that pass ``min_confidence``."""
        start, end = self.label_offsets[index], self.label_offsets[index + 1]
        return [
            (int(a), float(c))
            for a, c in zip(self.labels[start:end], self.confidences[start:end], strict=True)
        ]

    def target(self, index: int) -> Tensor:
        start, end = self.label_offsets[index], self.label_offsets[index + 1]
        target = torch.zeros(self.num_classes, dtype=torch.float32)  # [C]
        if end > start:
            labels = torch.from_numpy(self.labels[start:end].astype(np.int64))
            values = (
                torch.from_numpy(self.confidences[start:end].copy())
                if self.soft_targets
                else torch.ones(end - start)
            )
            target.scatter_reduce_(0, labels, values, reduce="amax")  # duplicate labels keep the largest
        return target

    @property
    def targets(self) -> Tensor:
        """All targets as a float32 ``Tensor[N, num_classes]`` (dense: only for small lists / evaluation)."""
        return (
            torch.stack([self.target(i) for i in range(len(self))])
            if len(self)
            else torch.zeros(0, self.num_classes)
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, list_file={self.list_file!r}, images={len(self)}, "
            f"num_classes={self.num_classes}, min_confidence={self.min_confidence}, "
            f"soft_targets={self.soft_targets}, on_bad_sample={self.on_bad_sample!r})"
        )
