"""Reading checkpoints without executing code: the one ``torch.load`` of the package.

``torch.load(weights_only=True)`` (or safetensors) refuses pickles that reference anything beyond tensors and
plain containers, so a checkpoint downloaded from anywhere cannot run code on the machine that reads it.
Backbone initialisation (:mod:`ssl_zoo.models.backbones`) and checkpoint loading (:mod:`ssl_zoo.checkpoints`)
both read through :func:`read_checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any

import torch

__all__ = ["NotACheckpointError", "UnsafeCheckpointError", "read_checkpoint"]

# torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle stream, which starts
# with the PROTO opcode; a safetensors file starts with its header length and then a JSON header.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds pickled Python objects other than tensors and plain containers; it was not loaded."""


class NotACheckpointError(ValueError):
    """The file is not a checkpoint at all (a config, a text file, an image, an empty or truncated file)."""


def _what_it_is(head: bytes) -> str:
    """A few words about a file that is not a checkpoint, for the error message."""
    if not head:
        return "it is empty (0 bytes)"
    try:
        first_line = head.decode("utf-8").strip().splitlines()[0][:60]
    except (UnicodeDecodeError, IndexError):
        return f"it starts with the bytes {head[:8]!r}"
    return f"it is a text file starting '{first_line}'"


def _not_a_checkpoint(path: str, reason: str) -> NotACheckpointError:
    return NotACheckpointError(
        f"'{path}' is not a checkpoint ({reason}): give a Lightning .ckpt (runs/<name>/<stamp>/checkpoints/"
        f"last.ckpt) or a state dict written by torch.save or safetensors"
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without executing code: ``torch.load(weights_only=True)`` or safetensors.

    Raises:
        FileNotFoundError: no such file.
        NotACheckpointError: the file is neither a torch.save archive / pickle nor safetensors (a YAML config,
            a text or image file, an empty or truncated file).
        UnsafeCheckpointError: the pickle references anything beyond tensors and plain Python
            containers (a ``__reduce__`` payload, a class instance), so loading it could run code.
        ValueError: the file does not hold a dict.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint '{path}' is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except SafetensorError as err:
            raise _not_a_checkpoint(path, f"safetensors: {err}") from err
    with open(path, "rb") as file:
        head = file.read(64)
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO])):
        raise _not_a_checkpoint(path, _what_it_is(head))
    try:
        # DINO, MAE and BEiT training scripts save their command line as an ``argparse.Namespace`` next to the
        # weights; unpickling one only sets attributes, whose values stay restricted like everything else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError) as err:  # a truncated pickle, a zip archive torch did not write
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "truncated file"
        raise _not_a_checkpoint(path, f"torch.load: {type(err).__name__}: {reason}") from err
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"refusing to load '{path}': it holds pickled Python objects other than tensors and plain "
            f"containers, and unpickling them could run arbitrary code (torch.load weights_only=True: "
            f"{reason}). Re-save the weights as a plain state dict (torch.save(model.state_dict(), f))."
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict of tensors")
    return obj
