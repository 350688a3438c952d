"""What a dataset does when an image cannot be read: ``on_bad_sample="raise"`` (stop, naming the file) or
``"skip"`` (replace the sample deterministically and count it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, Literal, NamedTuple, TypeVar

import torch

from ssl_zoo.data.decode import BadImageError, EncodedImage

__all__ = ["BAD_SAMPLE_POLICIES", "BadSamplePolicy", "Fetched", "check_bad_sample_policy", "transform_encoded"]

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("raise", "skip")

T = TypeVar("T")


def transform_encoded(transform: Callable[[EncodedImage], T], image: EncodedImage) -> T:
    """``transform(image)`` for a transform that decodes ``image`` itself; on :class:`BadImageError` (a corrupt
    body found by the decode) the torch RNG is put back, so a substitute sample draws what it would have drawn
    had the bad file been rejected before any view was sampled (as a full decode up front rejects it)."""
    state = torch.random.get_rng_state()
    try:
        return transform(image)
    except BadImageError:
        torch.random.set_rng_state(state)
        raise


def check_bad_sample_policy(on_bad_sample: str) -> str:
    """Validate an ``on_bad_sample`` value; returns it unchanged."""
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    return on_bad_sample


class Fetched(NamedTuple, Generic[T]):
    """What :meth:`BadSamplePolicy.fetch` read: the index actually used, its value, the bad files passed over."""

    index: int  # index whose value is returned (the requested one unless it was unreadable)
    value: T
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of every unreadable index passed over, in order


class BadSamplePolicy:
    """What a dataset does when an image cannot be read: ``"raise"`` or ``"skip"``.

    With ``"skip"``, index ``i`` is replaced by the first readable index among ``i+1, i+2, ...`` (modulo
    the dataset length), so the replacement is deterministic and the returned label is always the one of
    the image actually returned. Indices found bad are remembered and passed over without re-reading.
    Every bad index passed over increments :attr:`num_skipped` and is reported in the
    :class:`Fetched` result, so the count can travel with the sample out of a DataLoader worker; the
    first :attr:`max_recorded` distinct bad files are kept in :attr:`bad_paths` and logged. If no index
    is readable, a ``RuntimeError`` says so.

    :attr:`num_skipped` and :attr:`bad_paths` are per process: each DataLoader worker holds its own copy
    of the dataset. Use the ``skipped`` field of :meth:`fetch`'s result (what the data modules put in
    every batch) for counts that include the workers.

    Args:
        on_bad_sample: ``"raise"`` or ``"skip"``.
        max_recorded: how many distinct bad paths to keep and log, ``>= 0``.
    """

    def __init__(self, on_bad_sample: Literal["raise", "skip"] = "raise", max_recorded: int = 100) -> None:
        self.mode = check_bad_sample_policy(on_bad_sample)
        if max_recorded < 0:
            raise ValueError(f"max_recorded must be >= 0, got {max_recorded}")
        self.max_recorded = max_recorded
        self.num_skipped = 0
        self.bad_paths: list[str] = []
        self.bad_indices: dict[int, tuple[str, str]] = {}  # index -> (path, reason), read once

    def _record(self, index: int, error: BadImageError) -> tuple[str, str]:
        self.bad_indices[index] = (error.path, error.reason)
        if len(self.bad_paths) < self.max_recorded and error.path not in self.bad_paths:
            self.bad_paths.append(error.path)
            logger.warning("on_bad_sample='skip': skipping unreadable image (%s)", error)
        return self.bad_indices[index]

    def fetch(self, index: int, length: int, read: Callable[[int], T]) -> Fetched[T]:
        """Read sample ``index`` with ``read``, or with ``"skip"`` the first readable one after it.

        Only :class:`BadImageError` counts as a bad sample; any other exception propagates.
        """
        if self.mode == "raise":
            return Fetched(index, read(index), ())
        skipped: list[tuple[str, str]] = []
        for step in range(length):
            candidate = (index + step) % length
            known = self.bad_indices.get(candidate)
            if known is None:
                try:
                    return Fetched(candidate, read(candidate), tuple(skipped))
                except BadImageError as error:
                    known = self._record(candidate, error)
            skipped.append(known)
            self.num_skipped += 1
        raise RuntimeError(
            f"on_bad_sample='skip': none of the {length} samples could be read; "
            f"first unreadable files: {self.bad_paths[:5]}"
        )
