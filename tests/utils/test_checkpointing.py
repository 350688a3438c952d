"""Checkpoint files (``ssl_zoo.utils.checkpointing``): atomic saves that a failure or a SIGKILLed writer never
truncate, the newest run's checkpoint for ``--resume`` and the numbering of earlier metrics files."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_zoo.utils.checkpointing import AtomicCheckpointIO, find_resume_checkpoint, keep_previous_metrics
from tests.helpers.resume import run_env

ROOT = Path(__file__).resolve().parents[2]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4)}, path)

    class Crash(RuntimeError):
        pass

    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes reach the temp file...
        f.truncate(10)  # ...but only partly, as when the process dies while writing
        raise Crash("killed while writing")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(Crash):
        io.save_checkpoint({"step": 2, "w": torch.arange(8)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3


@pytest.mark.slow
def test_killed_writer_never_truncates_last_ckpt(tmp_path):
    """A process SIGKILLed half-way through writing a checkpoint leaves the previous last.ckpt loadable."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(4)}, path)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import io, time, torch\n"
        "from ssl_zoo.utils.checkpointing import AtomicCheckpointIO\n"
        "real_save = torch.save\n"
        "def slow_disk(obj, f, *args, **kwargs):  # half of the bytes, then the disk stalls\n"
        "    data = io.BytesIO()\n"
        "    real_save(obj, data)\n"
        "    f.write(data.getvalue()[: len(data.getvalue()) // 2])\n"
        "    f.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(600)\n"
        "torch.save = slow_disk\n"
        f"AtomicCheckpointIO().save_checkpoint({{'step': 2, 'w': torch.arange(1000)}}, {str(path)!r})\n")],
        cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
    partial = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill hit during the write...
    loaded = AtomicCheckpointIO().load_checkpoint(path)  # ...and last.ckpt is still the previous checkpoint
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4))


def test_resume_finds_newest_run_with_a_checkpoint(tmp_path):
    for stamp, has_ckpt in [("20250101-000000", True), ("20250301-000000", True), ("20250401-000000", False)]:
        folder = tmp_path / "mpcl" / stamp / "checkpoints"
        folder.mkdir(parents=True)
        if has_ckpt:
            (folder / "last.ckpt").write_bytes(b"x")
    newest = find_resume_checkpoint(str(tmp_path), "mpcl")
    assert newest == tmp_path / "mpcl" / "20250301-000000" / "checkpoints" / "last.ckpt"
    assert find_resume_checkpoint(str(tmp_path), "mpcl", stamp="20250101-000000").parent.parent.name == \
        "20250101-000000"
    assert find_resume_checkpoint(str(tmp_path), "mpcl", stamp="20250401-000000") is None
    assert find_resume_checkpoint(str(tmp_path), "simsiam") is None


def test_keep_previous_metrics_numbers_the_parts(tmp_path):
    assert keep_previous_metrics(str(tmp_path)) is None
    for k in (1, 2):
        (tmp_path / "metrics.csv").write_text(f"part {k}")
        assert keep_previous_metrics(str(tmp_path)).name == f"metrics.part{k}.csv"
    assert (tmp_path / "metrics.part2.csv").read_text() == "part 2"
