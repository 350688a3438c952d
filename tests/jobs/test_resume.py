"""Exact resume, atomic checkpoints, ``--resume`` and the NaN/Inf guard.

The end-to-end tests run the real command line in subprocesses: a run is SIGKILLed part-way through its
second epoch, restarted with ``--resume``, and must then log the same losses step by step and end with the
same weights, optimiser state, teacher, queues and PTB state as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ssl_zoo.cli.lightning_cli import apply_resume
from ssl_zoo.data.sampler import ResumableSampler, SampleKey, sample_seed, seeded_rng
from ssl_zoo.utils.callbacks import NonFiniteGuard, NonFiniteLossError
from ssl_zoo.utils.checkpointing import AtomicCheckpointIO, find_resume_checkpoint, keep_previous_metrics

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent

# The demo's single-label view (about 27 training images at the fixture's size): 6 steps per epoch.
BATCH = 4

METHOD_ARGS = {
    "mpcl": ["--config", "experiments/mpcl/demo.yaml", "--model.init_args.backbone", "test_resnet",
             "--model.init_args.img_size", "32", "--model.init_args.queue_size", "64",
             "--model.init_args.projector_hidden_dims", "64"],
    "mvp": ["--config", "experiments/mvp/demo.yaml", "--model.init_args.backbone_kwargs",
            # drop path draws from the global torch RNG in every step: exercises the RNG state restore
            '{"img_size": 64, "drop_path_rate": 0.2, "model_kwargs": {"depth": 2, "embed_dim": 96, "num_heads": 2}}'],
}


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


def _command(method: str, demo_root: str, every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ssl_zoo", "fit", *METHOD_ARGS[method],
            "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--data.init_args.root", f"{demo_root}/folder", "--data.init_args.batch_size", str(BATCH),
            "--data.init_args.num_workers", "1", "--checkpoint_every_n_steps", str(every), *extra]


def _env() -> dict[str, str]:
    # One thread each: the same reduction order in every run, and 2 runs side by side on a small machine.
    inherited = {k: v for k, v in os.environ.items() if k != "SSL_ZOO_RUN_STAMP"}
    return {**inherited, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _step_losses(metrics_csv: Path) -> dict[int, str]:
    """``{step: train/loss_step}`` as written (text, so equality is bitwise for the printed float)."""
    with open(metrics_csv, newline="") as f:
        return {int(row["step"]): row["train/loss_step"] for row in csv.DictReader(f) if row.get("train/loss_step")}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Every tensor bitwise equal, every other value equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs: {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"differs at {where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mpcl", "mvp"])
def test_killed_run_resumes_exactly(method, demo_root, tmp_path):
    """SIGKILL mid-epoch, --resume: the same per-step losses and the same final state as without the kill."""
    # Two epochs of drop_last batches. last.ckpt every `every` steps: the first mid-epoch one falls one batch
    # into epoch 1; the killed run stalls two steps later, so it dies with that checkpoint as its newest. The
    # resumed run must skip that batch of epoch 1's order, keep epoch 0's PTB weights, redo the lost steps.
    steps_per_epoch = sum(1 for p in (Path(demo_root) / "folder" / "train").rglob("*") if p.is_file()) // BATCH
    every, kill_after, total = steps_per_epoch + 1, steps_per_epoch + 3, 2 * steps_per_epoch
    assert kill_after < total
    full_dir, runs, marker = tmp_path / "full", tmp_path / "runs", tmp_path / "stalled"
    stall = json.dumps({"class_path": "test_resume.StallAfterStep",
                        "init_args": {"step": kill_after, "marker": str(marker)}})
    full = subprocess.Popen(_command(method, demo_root, every, "--trainer.default_root_dir", str(full_dir)),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the interrupted run goes to runs/<name>/<stamp>/, where --resume (make pretrain RESUME=1) looks for it
    victim = subprocess.Popen(_command(method, demo_root, every, "--run_root", str(runs),
                                       f"--trainer.callbacks+={stall}"),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert victim.poll() is None, f"the run to be killed ended early:\n{victim.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "the run to be killed never reached its stall step"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    (killed_dir,) = (runs / method).iterdir()
    ckpt = _load(killed_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == every and ckpt["epoch"] == 1  # part-way through the second epoch

    resumed = subprocess.run(_command(method, demo_root, every, "--run_root", str(runs), "--resume", "true"),
                             cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    assert_resumed_run_matches(full_dir, killed_dir, every, total)


def assert_resumed_run_matches(full_dir: Path, killed_dir: Path, every: int, total: int) -> None:
    """The killed-then-resumed run against the uninterrupted one: it logs exactly steps every..total-1, with the
    uninterrupted run's losses, and ends in the same state (weights with teacher, queues and PTB buffers,
    optimiser, scheduler, loop counters)."""
    reference, after_resume = _step_losses(full_dir / "metrics.csv"), _step_losses(killed_dir / "metrics.csv")
    assert sorted(reference) == list(range(total))
    assert sorted(after_resume) == list(range(every, total))
    assert {s: reference[s] for s in after_resume} == after_resume
    final_full, final_resumed = _load(full_dir / "checkpoints" / "last.ckpt"), _load(killed_dir / "checkpoints" /
                                                                                    "last.ckpt")
    assert final_full["global_step"] == final_resumed["global_step"] == total
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        _assert_same_state(final_full[key], final_resumed[key], key)


# ------------------------------------------------------------------------------------- sampler and seeds
def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_midway():
    data = list(range(20))
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    a.set_epoch(2)
    b.set_epoch(0)
    b.set_epoch(2)  # history does not matter
    full = list(a)
    assert full == list(b) and sorted(key.index for key in full) == data
    assert all(isinstance(key, SampleKey) and (key.seed, key.epoch) == (3, 2) for key in full)
    b.set_epoch(1)
    assert [key.index for key in b] != [key.index for key in full]  # another epoch, another order

    resumed = ResumableSampler(data, seed=3)
    resumed.resume(epoch=2, start=8)
    assert list(resumed) == full[8:] and len(resumed) == 20  # the epoch keeps its nominal length
    resumed.set_epoch(2)  # Lightning's own set_epoch for the resumed epoch keeps the offset
    assert list(resumed) == full[8:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == 20  # the next epoch is complete again


def test_sampler_shards_like_distributed_sampler():
    data = list(range(10))
    shards = []
    for rank in range(3):
        sampler = ResumableSampler(data, seed=1, num_replicas=3, rank=rank)
        sampler.set_epoch(4)
        reference = torch.utils.data.DistributedSampler(data, num_replicas=3, rank=rank, seed=1)
        reference.set_epoch(4)
        shards.append([key.index for key in sampler])
        assert shards[-1] == list(reference)
    assert sorted(set(sum(shards, []))) == data


def test_views_depend_on_the_sample_seed_only_and_leave_the_global_rng_alone():
    def draw():
        return torch.rand(3), torch.randint(0, 100, (2,))

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with seeded_rng(sample_seed(0, 1, 5)):
        first = draw()
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # other RNG history
    with seeded_rng(sample_seed(0, 1, 5)):
        again = draw()
    with seeded_rng(sample_seed(0, 2, 5)):
        other_epoch = draw()
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], other_epoch[0])


# ------------------------------------------------------------------------------------- atomic checkpoints
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
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
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


# ------------------------------------------------------------------------------------- --resume lookup
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


def _fit_config(tmp_path, **overrides) -> dict:
    return {"ckpt_path": None, "trainer": {"default_root_dir": None}, "run_root": str(tmp_path), "name": "mpcl",
            "resume": True, **overrides}


def test_resume_picks_the_newest_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_ZOO_RUN_STAMP", raising=False)
    for stamp in ("20250101-000000", "20250301-000000"):
        (tmp_path / "mpcl" / stamp / "checkpoints").mkdir(parents=True)
        (tmp_path / "mpcl" / stamp / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = _fit_config(tmp_path)
    apply_resume(cfg)
    newest = tmp_path / "mpcl" / "20250301-000000"
    assert cfg["ckpt_path"] == str(newest / "checkpoints" / "last.ckpt")
    assert cfg["trainer"]["default_root_dir"] == str(newest)  # the run continues in its own directory

    monkeypatch.setenv("SSL_ZOO_RUN_STAMP", "20250101-000000")  # a launcher pinned the run
    cfg = _fit_config(tmp_path)
    apply_resume(cfg)
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "mpcl" / "20250101-000000")

    with pytest.raises(ValueError, match="either --resume or --ckpt_path"):
        apply_resume(_fit_config(tmp_path, ckpt_path="x.ckpt"))


def test_resume_without_a_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_ZOO_RUN_STAMP", raising=False)
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint .*mpcl.*last\.ckpt for run name 'mpcl'"):
        apply_resume(_fit_config(tmp_path))
    cfg = _fit_config(tmp_path, resume="auto")  # auto: a fresh run instead
    apply_resume(cfg)
    assert cfg["ckpt_path"] is None and cfg["trainer"]["default_root_dir"] is None


def test_keep_previous_metrics_numbers_the_parts(tmp_path):
    assert keep_previous_metrics(str(tmp_path)) is None
    for k in (1, 2):
        (tmp_path / "metrics.csv").write_text(f"part {k}")
        assert keep_previous_metrics(str(tmp_path)).name == f"metrics.part{k}.csv"
    assert (tmp_path / "metrics.part2.csv").read_text() == "part 2"


# ------------------------------------------------------------------------------------- NaN / Inf guard
class _PoisonStep(Callback):
    """Makes the model's loss non-finite from optimiser step ``step`` on (the fault under test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            batch["views"].fill_(float("nan"))


def test_nonfinite_loss_stops_naming_the_term_and_saves_the_last_good_state(tmp_path, demo_root):
    guard = NonFiniteGuard(action="stop")
    seen = {}

    class Spy(Callback):  # the state after the last good step, as the bad step begins
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match=r"global step 3 .*train/loss.*=nan.*last-good\.ckpt"):
        from ssl_zoo.data import ImageFolderDataModule
        from ssl_zoo.methods import MPCLMoCoV2

        torch.manual_seed(0)
        model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=32,
                           queue_size=32)
        Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), callbacks=[Spy(), _PoisonStep(3), guard],
                enable_checkpointing=False).fit(
            model, datamodule=ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=8, num_workers=0))
    saved = _load(tmp_path / "checkpoints" / "last-good.ckpt")
    assert saved["global_step"] == 3
    # every tensor, parameters and buffers (MoCo queues, BatchNorm statistics, PTB counts), as before the bad
    # batch: the bad forward pass had already written queue keys and BN statistics, and they were put back
    _assert_same_state(seen, dict(saved["state_dict"]), "state_dict")
    assert all(v.isfinite().all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_leaves_weights_untouched_and_counts(tmp_path, demo_root):
    states = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    guard = NonFiniteGuard(action="skip", max_skips=2)  # the steps all lie in the first epoch (6 steps)
    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.methods import MPCLMoCoV2

    torch.manual_seed(0)
    model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=32, queue_size=32,
                       ema_momentum=1.0)  # a frozen teacher: only the skipped optimiser steps could move anything
    trainer = Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), callbacks=[Spy(), _PoisonStep(2), guard],
                      enable_checkpointing=False)
    with pytest.raises(NonFiniteLossError, match=r"after 2 skipped steps \(max_skips=2\)"):
        trainer.fit(model, datamodule=ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=BATCH,
                                                            num_workers=0))
    assert guard.num_skipped == 2
    # steps 2 and 3 were skipped: the module (weights, queues, BN statistics, PTB) is as at step 2's start
    assert any(not torch.equal(states[1][k], states[2][k]) for k in states[2])  # a good step changes the module
    _assert_same_state(states[2], states[3], "after a skipped step")
    _assert_same_state(states[2], states[4], "after two skipped steps")
    assert trainer.callback_metrics["train/nonfinite_skips"] == 2


def test_skip_under_gradient_accumulation_forgets_the_whole_step(tmp_path, demo_root):
    """A bad first micro-batch: the step is skipped and the good second micro-batch's buffer writes undone."""
    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.methods import MPCLMoCoV2

    states = {}

    class PoisonFirstMicroBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states[batch_idx] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            if batch_idx == 2:  # micro-batches 2 and 3 make the second optimiser step
                batch["views"].fill_(float("inf"))

    torch.manual_seed(0)
    model = MPCLMoCoV2(backbone="test_resnet", img_size=32, num_projectors=2, projector_hidden_dims=32, queue_size=32,
                       ema_momentum=1.0)
    guard = NonFiniteGuard(action="skip")
    Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path), enable_checkpointing=False,
            callbacks=[PoisonFirstMicroBatch(), guard]).fit(
        model, datamodule=ImageFolderDataModule(root=f"{demo_root}/folder", batch_size=BATCH, num_workers=0))
    assert guard.num_skipped == 1
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[2])  # the first step did train
    _assert_same_state(states[2], states[4], "after the skipped accumulated step")


@pytest.mark.slow
def test_resume_from_an_epoch_end_checkpoint_is_exact(tmp_path, demo_root):
    """Stopped after epoch 0 (PTB accuracies just updated), continued for epoch 1: as one two-epoch run."""
    from ssl_zoo.cli import main

    def fit(run_dir: Path, *extra: str):
        return main(["fit", *METHOD_ARGS["mpcl"], "--model.init_args.num_projectors", "2",
                     "--trainer.max_epochs", "2", "--trainer.logger", "false",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
                     "--data.init_args.root", f"{demo_root}/folder", "--data.init_args.batch_size", str(BATCH),
                     "--data.init_args.num_workers", "0", *extra])

    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs' relative paths
    try:
        fit(tmp_path / "full")
        stop = json.dumps({"class_path": "test_resume.StopAfterFirstEpoch"})
        fit(tmp_path / "split", f"--trainer.callbacks+={stop}")  # same schedule, stopped at the epoch end
        first_epoch = _load(tmp_path / "split" / "checkpoints" / "last.ckpt")
        ptb = first_epoch["state_dict"]
        # saved after MPCL's on_train_epoch_end: last epoch's accuracies in, the epoch's counters reset
        assert first_epoch["epoch"] == 0 and ptb["mpcl_loss.ptb.last_acc"].gt(0).all()
        assert ptb["mpcl_loss.ptb.count"] == 0
        record = tmp_path / "resumed_steps.txt"
        steps = json.dumps({"class_path": "test_resume.RecordSteps", "init_args": {"path": str(record)}})
        fit(tmp_path / "split", "--resume", "true", f"--trainer.callbacks+={steps}")
    finally:
        os.chdir(cwd)
    full, split = _load(tmp_path / "full" / "checkpoints" / "last.ckpt"), _load(tmp_path / "split" / "checkpoints" /
                                                                              "last.ckpt")
    assert full["global_step"] == split["global_step"] > first_epoch["global_step"]
    # The resumed process ran epoch 1 only, from the step the checkpoint held (not a re-run from scratch).
    ran = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    assert ran == [(1, step) for step in range(first_epoch["global_step"], full["global_step"])]
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        _assert_same_state(full[key], split[key], key)



class RecordSamples(Callback):
    """Test hook: append ``[epoch, global_step, dataset indices]`` of every training batch this process runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.current_epoch, trainer.global_step, batch["index"].tolist()]) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("extra_steps", [0, 2], ids=["at_the_epoch_end", "mid_epoch"])
def test_run_stopped_by_max_steps_continues_with_the_same_samples(extra_steps, tmp_path, demo_root):
    """A run ended by max_steps, resumed with a larger max_steps, trains on the batches an uninterrupted run of the
    larger max_steps trains on, in the same epochs. (Weights differ: the lr schedule follows max_steps.) Ending on
    an epoch's last batch is the case Lightning restores as unfinished when max_steps is set: without the
    checkpoint's next-epoch loop state the resumed run counted one more batch in the finished epoch and then
    skipped the rest of the next one."""
    from ssl_zoo.cli import main

    def fit(run_dir: Path, max_steps: int, *extra: str):
        record = json.dumps({"class_path": "test_resume.RecordSamples",
                             "init_args": {"path": str(run_dir.with_suffix(".jsonl"))}})
        return main(["fit", *METHOD_ARGS["mvp"], "--trainer.max_epochs", "3", "--trainer.max_steps", str(max_steps),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(run_dir), "--data.init_args.root", f"{demo_root}/folder",
                     "--data.init_args.batch_size", str(BATCH), "--data.init_args.num_workers", "0",
                     f"--trainer.callbacks+={record}", *extra])

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        per_epoch = fit(tmp_path / "probe", 1).trainer.num_training_batches
        stop, total = per_epoch + extra_steps, 2 * per_epoch + 1
        fit(tmp_path / "full", total)
        fit(tmp_path / "split", stop)
        fit(tmp_path / "split", total, "--resume", "true")
    finally:
        os.chdir(cwd)
    full, split = ([json.loads(line) for line in (tmp_path / f"{run}.jsonl").read_text().splitlines()]
                   for run in ("full", "split"))
    assert [step for _, step, _ in full] == list(range(total))
    assert split == full  # the first process's steps, then the resumed one's: epochs, steps and samples
