"""Exact resume of whole runs, and a run logged to wandb offline that resumes from its weights-only checkpoint.

The end-to-end tests run the real command line in subprocesses: a run is SIGKILLed part-way through its
second epoch, restarted with ``--resume``, and must then log the same losses step by step and end with the
same weights, optimiser state, teacher, queues and PTB state as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_zoo.cli import main
from tests.helpers.resume import (
    assert_resumed_run_matches,
    assert_same_state,
    kill_when_stalled,
    load_checkpoint,
    run_env,
    stall_callback,
    start_run,
)

ROOT = Path(__file__).resolve().parents[2]

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


def _command(method: str, demo_root: str, every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ssl_zoo", "fit", *METHOD_ARGS[method],
            "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--data.init_args.root", f"{demo_root}/folder", "--data.init_args.batch_size", str(BATCH),
            "--data.init_args.num_workers", "1", "--checkpoint_every_n_steps", str(every), *extra]


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
    stall = stall_callback(kill_after, marker)
    full = start_run(_command(method, demo_root, every, "--trainer.default_root_dir", str(full_dir)))
    # the interrupted run goes to runs/<name>/<stamp>/, where --resume (make pretrain RESUME=1) looks for it
    victim = start_run(_command(method, demo_root, every, "--run_root", str(runs), f"--trainer.callbacks+={stall}"))
    kill_when_stalled(victim, marker, timeout=300)
    (killed_dir,) = (runs / method).iterdir()
    ckpt = load_checkpoint(killed_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == every and ckpt["epoch"] == 1  # part-way through the second epoch

    resumed = subprocess.run(_command(method, demo_root, every, "--run_root", str(runs), "--resume", "true"),
                             cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    assert_resumed_run_matches(full_dir, killed_dir, every, total)


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
        stop = json.dumps({"class_path": "tests.helpers.resume.StopAfterFirstEpoch"})
        fit(tmp_path / "split", f"--trainer.callbacks+={stop}")  # same schedule, stopped at the epoch end
        first_epoch = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
        ptb = first_epoch["state_dict"]
        # saved after MPCL's on_train_epoch_end: last epoch's accuracies in, the epoch's counters reset
        assert first_epoch["epoch"] == 0 and ptb["mpcl_loss.ptb.last_acc"].gt(0).all()
        assert ptb["mpcl_loss.ptb.count"] == 0
        record = tmp_path / "resumed_steps.txt"
        steps = json.dumps({"class_path": "tests.helpers.resume.RecordSteps", "init_args": {"path": str(record)}})
        fit(tmp_path / "split", "--resume", "true", f"--trainer.callbacks+={steps}")
    finally:
        os.chdir(cwd)
    full, split = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt"), load_checkpoint(tmp_path / "split" / "checkpoints" /
                                                                              "last.ckpt")
    assert full["global_step"] == split["global_step"] > first_epoch["global_step"]
    # The resumed process ran epoch 1 only, from the step the checkpoint held (not a re-run from scratch).
    ran = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    assert ran == [(1, step) for step in range(first_epoch["global_step"], full["global_step"])]
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert_same_state(full[key], split[key], key)


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
        record = json.dumps({"class_path": "tests.helpers.resume.RecordSamples",
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




SIMSIAM = str(ROOT / "experiments/simsiam/demo.yaml")


@pytest.mark.slow
def test_offline_wandb_run_completes_and_resumes_from_its_weights_only_checkpoint(tmp_path, demo_root,
                                                                                 monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no stored key, no ~/.netrc
    run_dir = tmp_path / "run"
    common = ["fit", "--config", SIMSIAM, "--trainer.default_root_dir", str(run_dir),
              "--trainer.log_every_n_steps", "1", "--trainer.limit_train_batches", "2",
              "--data.init_args.root", demo_root, "--data.init_args.num_workers", "0",
              "--data.init_args.batch_size", "4", "--model.init_args.img_size", "32"]
    # Without network the run must not wait on wandb: a hang would stall here (no wall-clock assertion, which
    # fails on a loaded machine; the offline run files below show the run went offline).
    main([*common, "--trainer.max_epochs", "1"])
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].glob("*.wandb"))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "train/loss_step" in (run_dir / "metrics.csv").read_text()
    # The run's own checkpoint is plain data: it resumes under weights_only loading.
    torch.load(last, map_location="cpu", weights_only=True)
    cli = main([*common, "--trainer.max_epochs", "2", "--ckpt_path", str(last), "--weights_only", "true"])
    assert cli.trainer.global_step == 4
