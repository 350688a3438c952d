"""What the resume tests share: the callbacks a run under test loads by class path (``tests.helpers.resume.X``),
the environment of its subprocesses, and the comparison of a killed-then-resumed run with an uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[2]


class StallAfterStep(Callback):
    """Test hook: after optimiser step ``step``, announce it in ``marker`` and hang until killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text("stalled")
            time.sleep(600)


class RecordSteps(Callback):
    """Test hook: append (epoch, global_step) of every training batch this process runs to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {trainer.global_step}\n")


class StopAfterFirstEpoch(Callback):
    """Test hook: end training after epoch 0, as a job whose time ran out at the epoch boundary would."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


class RecordSamples(Callback):
    """Test hook: append ``[epoch, global_step, dataset indices]`` of every training batch this process runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.current_epoch, trainer.global_step, batch["index"].tolist()]) + "\n")


def run_env() -> dict[str, str]:
    # One thread each: the same reduction order in every run, and 2 runs side by side on a small machine.
    inherited = {k: v for k, v in os.environ.items() if k != "SSL_ZOO_RUN_STAMP"}
    return {**inherited, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def start_run(command: list[str]) -> subprocess.Popen:
    """``command`` started from the repository root with :func:`run_env`, its output (stdout and stderr) piped."""
    return subprocess.Popen(command, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def stall_callback(step: int, marker: Path) -> str:
    """The ``--trainer.callbacks+=`` value that adds a :class:`StallAfterStep` at ``step`` announcing in ``marker``."""
    return json.dumps({"class_path": "tests.helpers.resume.StallAfterStep",
                       "init_args": {"step": step, "marker": str(marker)}})


def kill_when_stalled(victim: subprocess.Popen, marker: Path, timeout: float) -> None:
    """Wait until ``victim`` has written ``marker`` (its :class:`StallAfterStep` reached), then SIGKILL it; fail if
    it ends first or ``timeout`` seconds pass."""
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert victim.poll() is None, f"the run to be killed ended early:\n{victim.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "the run to be killed never reached its stall step"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()


def step_losses(metrics_csv: Path) -> dict[int, str]:
    """``{step: train/loss_step}`` as written (text, so equality is bitwise for the printed float)."""
    with open(metrics_csv, newline="") as f:
        return {int(row["step"]): row["train/loss_step"] for row in csv.DictReader(f) if row.get("train/loss_step")}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Every tensor bitwise equal, every other value equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs: {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"differs at {where}: {a!r} != {b!r}"


def assert_resumed_run_matches(full_dir: Path, killed_dir: Path, every: int, total: int) -> None:
    """The killed-then-resumed run against the uninterrupted one: it logs exactly steps every..total-1, with the
    uninterrupted run's losses, and ends in the same state (weights with teacher, queues and PTB buffers,
    optimiser, scheduler, loop counters)."""
    reference, after_resume = step_losses(full_dir / "metrics.csv"), step_losses(killed_dir / "metrics.csv")
    assert sorted(reference) == list(range(total))
    assert sorted(after_resume) == list(range(every, total))
    assert {s: reference[s] for s in after_resume} == after_resume
    final_full = load_checkpoint(full_dir / "checkpoints" / "last.ckpt")
    final_resumed = load_checkpoint(killed_dir / "checkpoints" / "last.ckpt")
    assert final_full["global_step"] == final_resumed["global_step"] == total
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert_same_state(final_full[key], final_resumed[key], key)
