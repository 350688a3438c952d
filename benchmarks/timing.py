"""Helpers shared by the speed benchmarks: a median timer, the environment record, JSON output.

Speed is only ever measured here, in benchmarks, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense (no sparsity) peak throughput in TFLOP/s per GPU, from the vendors' data sheets, by precision.
# "32" is the plain FP32 (non-tensor-core) figure: PyTorch keeps TF32 matmuls off by default ("tf32", the
# tensor-core figure, is what cuDNN's convolutions use, TF32 being on by default for them). The first
# entry whose key is contained in ``torch.cuda.get_device_name()`` wins, so specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.7, "32": 67.0}),  # SXM5
    ("H200", {"bf16": 989.0, "tf32": 494.7, "32": 67.0}),
    ("GH200", {"bf16": 989.0, "tf32": 494.7, "32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "32": 19.5}),
    ("L40S", {"bf16": 362.0, "32": 91.6}),
    ("A10G", {"bf16": 70.0, "32": 31.2}),
    ("L4", {"bf16": 121.0, "32": 30.3}),
    ("V100", {"fp16": 125.0, "32": 15.7}),  # SXM2; no bf16
]


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device`` at ``precision`` (``"32"`` or ``"bf16"``): the override, the table, or None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision] * 1e12 if precision in peaks else None
    return None


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Wall time of one ``fn()`` in seconds; ``sync`` runs before each clock read (queued GPU work counts)."""
    sync = sync or (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` untimed calls.

    ``sync`` (e.g. :func:`synchronizer`) runs before each clock read so queued GPU work is counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, sync) for _ in range(repeats))


def paired_medians(first: Callable[[], Any], second: Callable[[], Any], repeats: int, warmup: int = 1,
                   sync: Callable[[], None] | None = None) -> tuple[float, float, float]:
    """``first()`` and ``second()`` timed alternately: their median times and the median per-pair ratio.

    Alternating makes a change in the machine's load hit both alike, so the ratio stays meaningful on a
    shared machine even when the absolute times do not.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        first()
        second()
    pairs = [(timed(first, sync), timed(second, sync)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Machine, library versions, thread count and date: what a timing needs next to it to be read."""
    import lightly
    import lightning
    import timm

    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "lightly": lightly.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device is not None:
        env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: str | os.PathLike, report: Any) -> Path:
    """Write ``report`` as indented JSON to ``path`` (relative paths are taken from the repository root)."""
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
