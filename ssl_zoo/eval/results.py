"""The ``eval.json`` results file of a pre-training run.

Every probe / fine-tuning / kNN run appends one record to ``eval.json`` in the run directory that owns the
evaluated checkpoint (``runs/<name>/<stamp>/checkpoints/last.ckpt`` -> ``runs/<name>/<stamp>/eval.json``;
a plain state dict gets an ``eval.json`` next to it; a randomly initialised baseline writes into its own
evaluation run directory). The file is a JSON list, newest record last; concurrent writers on one machine
are serialised with an exclusive lock on the run directory, and the file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["append_eval_record", "make_eval_record", "pretraining_run_info", "read_eval_records",
           "results_file_for"]

RESULTS_FILE = "eval.json"


def results_file_for(ckpt: str | os.PathLike | None, fallback_dir: str | os.PathLike) -> Path:
    """Where the record of evaluating ``ckpt`` goes (see the module docstring)."""
    if ckpt is None:
        return Path(fallback_dir) / RESULTS_FILE
    path = Path(ckpt).resolve()
    owner = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return owner / RESULTS_FILE


def pretraining_run_info(ckpt: str | os.PathLike | None) -> dict[str, Any]:
    """Method and run name of the pre-training run owning ``ckpt``, read from its resolved ``config.yaml``."""
    if ckpt is None:
        return {}
    run_dir = results_file_for(ckpt, ".").parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    try:
        import yaml

        cfg = yaml.safe_load(config.read_text()) or {}
    except Exception:  # an unreadable config must not lose the evaluation result
        return {}
    model = cfg.get("model") or {}
    return {k: v for k, v in {"name": cfg.get("name"), "method": model.get("class_path"),
                               "run_dir": str(run_dir)}.items() if v is not None}


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), tensors and numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        with contextlib.suppress(Exception):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def make_eval_record(
    ckpt: str | os.PathLike | None,
    protocol: str,
    metrics: Mapping[str, float],
    settings: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One ``eval.json`` entry: checkpoint, pre-training run, protocol and its settings, metrics, date."""
    record = {
        "ckpt": str(Path(ckpt).resolve()) if ckpt is not None else None,
        "pretraining": pretraining_run_info(ckpt),
        "protocol": protocol,
        "settings": dict(settings or {}),
        "metrics": dict(metrics),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    return _json_safe(record)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on the run directory (not on the file, which is replaced, nor on a stray lock file)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): writers are not serialised
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_eval_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of an ``eval.json`` (empty list if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = json.loads(path.read_text() or "[]")
    if not isinstance(records, list):
        raise ValueError(f"'{path}' should hold a JSON list of evaluation records, found {type(records).__name__}")
    return records


def append_eval_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append ``record`` to the JSON list in ``path`` (created with its parent folders if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        records = read_eval_records(path)
        records.append(_json_safe(dict(record)))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    return path
