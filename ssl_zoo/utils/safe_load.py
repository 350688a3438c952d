"""Reading checkpoints without executing code: the one ``torch.load`` of the package.

``torch.load(weights_only=True)`` (or safetensors) refuses pickles that reference anything beyond tensors and
plain containers, so a checkpoint downloaded from anywhere cannot run code on the machine that reads it.
Backbone initialisation (:mod:`ssl_zoo.models.backbones`) and evaluation (:mod:`ssl_zoo.eval.checkpoint`)
both read through :func:`read_checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "read_checkpoint"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds pickled Python objects other than tensors and plain containers; it was not loaded."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without executing code: ``torch.load(weights_only=True)`` or safetensors.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle references anything beyond tensors and plain Python
            containers (a ``__reduce__`` payload, a class instance), so loading it could run code.
        ValueError: the file does not hold a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path))
    try:
        # DINO, MAE and BEiT training scripts save their command line as an ``argparse.Namespace`` next to the
        # weights; unpickling one only sets attributes, whose values stay restricted like everything else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
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
