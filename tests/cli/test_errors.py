"""Mistakes at the command line end in one message (what is wrong, the key or file at fault, what to do), exit
status 2 and no traceback; ``SSL_ZOO_DEBUG=1`` shows the traceback (``ssl_zoo.cli.errors``). Bad keys, types and
values in configs and overrides are named before training starts; a dataset root or images that are missing, and a
batch too small for BatchNorm, at setup.

Each error case runs the command line in a child process, since the exit status and what reaches the terminal
are the point: ``python -m ssl_zoo`` itself for the first case, and for the others the same entry point
(``ssl_zoo.__main__.main``, with ``sys.argv`` set) in a process forked from the test's, which has done the
seconds of imports already. Parse errors, which end the same way in-process, are also checked in-process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from ssl_zoo.cli import main
from ssl_zoo.cli.errors import explain_error

ROOT = Path(__file__).resolve().parents[2]
METHODS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/demo.yaml"))
ENV = {**{k: v for k, v in os.environ.items() if k != "SSL_ZOO_DEBUG"}, "WANDB_MODE": "disabled"}
PAPER_CONFIG = "experiments/simsiam/r50_coco.yaml"  # asks for 4 GPUs
NOT_A_CHECKPOINT = "experiments/mvp/demo.yaml"


def _child(args: list[str], debug: bool, out: str, err: str) -> None:
    """``python -m ssl_zoo ARGS`` in a forked process, its stdout / stderr going to the files ``out`` / ``err``."""
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # the process ends with the command
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)  # a forked OpenMP pool is not safe to use (DataLoader workers do the same)
    os.chdir(ROOT)
    os.environ.pop("SSL_ZOO_DEBUG", None)
    os.environ.update({"WANDB_MODE": "disabled", **({"SSL_ZOO_DEBUG": "1"} if debug else {})})
    sys.argv = [str(ROOT / "ssl_zoo" / "__main__.py"), *args]
    from ssl_zoo.__main__ import main as entry_point

    sys.exit(entry_point())  # as `python -m ssl_zoo`; an uncaught exception prints its traceback, exit status 1


def ssl_zoo(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """Exit status, stdout and stderr of ``python -m ssl_zoo ARGS``, run in a child process forked from this one."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    process = multiprocessing.get_context("fork").Process(target=_child, args=(list(args), debug, str(out), str(err)))
    process.start()
    process.join(timeout=600)
    if process.exitcode is None:
        process.kill()
        pytest.fail(f"python -m ssl_zoo {' '.join(args)} did not finish")
    return subprocess.CompletedProcess(args, process.exitcode, out.read_text(), err.read_text())


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed command; exit status 2 and no traceback anywhere."""
    everything = result.stdout + result.stderr
    assert result.returncode == 2, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------------ unknown options
@pytest.mark.slow
def test_unknown_option_names_the_closest_valid_one():
    # The real `python -m ssl_zoo`, interpreter start-up included.
    result = subprocess.run([sys.executable, "-m", "ssl_zoo", "fit", "--config", "experiments/mpcl/demo.yaml",
                             "--model.init_args.lamda", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    line = one_error_line(result)
    assert "model.init_args.lamda: 'lamda' is not accepted by ssl_zoo.methods.MPCLMoCoV2" in line
    assert "on the command line" in line and "did you mean 'lam' (--model.init_args.lam)" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trainer.max_epohcs", "2"], "unknown option --trainer.max_epohcs; did you mean '--trainer.max_epochs'"),
        (["--data.init_args.batchsize", "2"],
         "'batchsize' is not accepted by ssl_zoo.data.ImageFolderDataModule, on the command line "
         "(--data.init_args.batchsize); did you mean 'batch_size' (--data.init_args.batch_size)?"),
        (["--model", "ssl_zoo.methods.MPCLBarlowTwin"],
         "model: ssl_zoo.methods has no class 'MPCLBarlowTwin'; did you mean 'MPCLBarlowTwins'?"),
        (["--model.init_args.head_norm", "group"],
         "model.init_args.head_norm: Expected a typing.Literal['batch', 'layer', 'none']. Got value: group"),
    ],
    ids=["trainer_key", "data_key", "class_name", "value"],
)
def test_parse_errors_are_one_line_naming_the_key(capsys, args, expected):
    # Lightning warns that args= and sys.argv (pytest's) are both given; where warnings reach stderr they are
    # not the CLI's output.
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", "--config", str(ROOT / "experiments/mpcl/demo.yaml"), *args, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # no usage block, one line
    assert expected in err


def test_unknown_key_in_a_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text((ROOT / "experiments/mpcl/demo.yaml").read_text().replace("queue_size:", "queue_sise:"))
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", "--config", str(config), "--print_config"])
    err = capsys.readouterr().err
    assert f"'queue_sise' is not accepted by ssl_zoo.methods.MPCLMoCoV2, in {config}; did you mean 'queue_size'" in err


# ------------------------------------------------------------------------------------------ dataset root
def test_missing_dataset_root(tmp_path):
    root = tmp_path / "coco"
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", "experiments/simsiam/demo.yaml",
                                  "--data.init_args.root", str(root)))
    assert f"data.root: dataset root '{root}' does not exist (set --data.init_args.root" in line
    assert "CocoDataModule reads COCO 2017" in line


def test_empty_dataset_root(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", "experiments/mocov2/demo.yaml",
                                  "--data.init_args.root", str(tmp_path / "empty")))
    assert f"data.root: dataset root '{tmp_path / 'empty'}' is an empty directory" in line
    assert "ImageFolderDataModule reads" in line and "train/ and val/ folders" in line


def test_missing_file_under_the_data_root_names_the_root():
    # What a data module raises for a root laid out for another format (the COCO annotations of a folder tree).
    from ssl_zoo.cli import errors

    error = FileNotFoundError(2, "No such file or directory", "data/demo/folder/annotations/instances_train2017.json")
    errors._data_root = ("data/demo/folder", "CocoDataModule reads COCO 2017 multi-label")
    try:
        assert explain_error(error) == ("no such file or directory: 'data/demo/folder/annotations/"
                                        "instances_train2017.json' (is data.init_args.root 'data/demo/folder' the "
                                        "right folder? CocoDataModule reads COCO 2017 multi-label)")
    finally:
        errors._data_root = None


def test_error_from_a_dataloader_worker_drops_the_worker_traceback():
    # torch re-raises a worker's exception with the worker's traceback in the message.
    message = ("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
               "last):\n  File \"x.py\", line 1, in f\n    open(p)\nFileNotFoundError: image 'a.jpg' is gone\n")
    assert explain_error(FileNotFoundError(message)) == "image 'a.jpg' is gone"
    assert explain_error(KeyError("a bug")) is None  # not a user error: the traceback stays


# ------------------------------------------------------------------------------------------ GPUs
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_paper_config_on_a_machine_without_gpus_says_how_to_run_it(demo_root, tmp_path):
    config = PAPER_CONFIG
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", config))
    assert f"{config} asks for GPUs (trainer.accelerator: gpu, trainer.devices: 4) but this machine has none" in line
    assert "CPU-sized configs: experiments/simsiam/cpu.yaml, experiments/simsiam/demo.yaml" in line
    assert "make pretrain METHOD=simsiam" in line
    fixes = re.search(r"add (--trainer\.accelerator cpu --trainer\.devices 1 --trainer\.precision 32[^(]*) \(make",
                      line)
    assert fixes, line
    # The flags it gives do run the paper config here (one step on the demo data; a smaller network and images,
    # which the flags do not depend on).
    cli = main(["fit", "--config", str(ROOT / config), *fixes.group(1).split(), "--trainer.fast_dev_run", "1",
                "--data.init_args.root", demo_root, "--data.init_args.num_workers", "0",
                "--data.init_args.batch_size", "4", "--model.init_args.img_size", "32",
                "--model.init_args.backbone", "resnet18", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.callback_metrics["train/loss"].isfinite()


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_that_does_not_exist(tmp_path, demo_root):
    ckpt = tmp_path / "runs" / "last.ckpt"
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", "experiments/eval/linear_demo.yaml",
                                  "--model.init_args.ckpt", str(ckpt), "--data.init_args.root", f"{demo_root}/folder"))
    assert f"checkpoint '{ckpt}' does not exist (" in line


def test_file_that_is_not_a_checkpoint(tmp_path, demo_root):
    line = one_error_line(ssl_zoo(tmp_path, "validate", "--config", "experiments/eval/knn_demo.yaml",
                                  "--model.init_args.ckpt", NOT_A_CHECKPOINT,
                                  "--data.init_args.root", f"{demo_root}/folder"))
    assert f"'{NOT_A_CHECKPOINT}' is not a checkpoint (it is a text file starting '# MVP on the built-in demo data" in line
    assert "runs/<name>/<stamp>/checkpoints/last.ckpt" in line


@pytest.mark.parametrize("job", ["detect", "segment"])
def test_dense_transfer_jobs_refuse_a_wrong_or_unknown_file_in_one_line(job, tmp_path, demo_root):
    """``make detect`` / ``make segment`` end like every other job: one line, exit status 2."""
    config = f"experiments/transfer/{job}_demo.yaml"
    root = demo_root if job == "detect" else f"{demo_root}/ADEChallengeData2016"
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", config, "--model.init_args.ckpt", NOT_A_CHECKPOINT,
                                  "--data.init_args.root", root))
    assert f"'{NOT_A_CHECKPOINT}' is not a checkpoint" in line
    unknown = tmp_path / "mystery.pth"
    torch.save({"net": {"stem.conv.weight": torch.zeros(4, 3, 3, 3)}}, unknown)
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", config, "--model.init_args.ckpt", str(unknown),
                                  "--data.init_args.root", root))
    assert "unknown weight layout" in line and "net (tensors)" in line
    vit = tmp_path / "bare_vit.pth"  # a bare ViT state dict: its heads are not in its shapes, so it must be named
    torch.save({"cls_token": torch.zeros(1, 1, 192), "pos_embed": torch.zeros(1, 5, 192),
                "patch_embed.proj.weight": torch.zeros(192, 3, 16, 16),
                "blocks.0.norm1.weight": torch.zeros(192)}, vit)
    line = one_error_line(ssl_zoo(tmp_path, "fit", "--config", config, "--model.init_args.ckpt", str(vit),
                                  "--data.init_args.root", root))
    assert "pass backbone=<timm name> (--model.init_args.backbone)" in line


def test_debug_mode_shows_the_traceback(tmp_path):
    result = ssl_zoo(tmp_path, "fit", "--config", "experiments/eval/linear_demo.yaml", "--model.init_args.ckpt",
                     str(tmp_path / "nope.ckpt"), debug=True)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr and "does not exist" in result.stderr


# ------------------------------------------------------------------------------------------ make
def _make(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: never (re)build the virtualenv or the demo data from a test
    return subprocess.run(["make", "-s", "-o", ".venv/.ssl_zoo-installed", "-o", "data/demo/.complete", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)


def test_make_with_an_unknown_method_lists_the_methods():
    result = _make("pretrain", "METHOD=simsam")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert line.startswith(f"error: unknown METHOD=simsam; the methods are: {' '.join(METHODS)} ")




SIMSIAM = str(ROOT / "experiments/simsiam/demo.yaml")


def _parse_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_unknown_key_in_a_config_file_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(Path(SIMSIAM).read_text())
    cfg["model"]["init_args"]["no_such_option"] = 1
    bad.write_text(yaml.safe_dump(cfg))
    err = _parse_error(capsys, "fit", "--config", str(bad))
    assert "no_such_option" in err and "not accepted" in err


def test_misspelt_override_is_rejected(capsys):
    err = _parse_error(capsys, "fit", "--config", SIMSIAM, "--model.init_args.overlapp", "0.3")
    assert "'overlapp' is not accepted" in err


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("--data.init_args.batch_size", "1.5", r"data\.init_args\.batch_size: Expected a <class 'int'>\. Got value: 1\.5"),
        ("--model.init_args.overlap", "wide", r"model\.init_args\.overlap: Expected a <class 'float'>\. Got value: wide"),
        ("--data.init_args.on_bad_sample", "ignore", r"data\.init_args\.on_bad_sample: .*ignore"),
        ("--model.init_args.head_norm", "group", r"model\.init_args\.head_norm: .*group"),
    ],
    ids=["batch_size", "overlap", "on_bad_sample", "head_norm"],
)
def test_wrong_types_name_the_key(capsys, key, value, expected):
    err = _parse_error(capsys, "fit", "--config", SIMSIAM, key, value)
    assert re.search(expected, err, flags=re.S), err


def _instantiate(*overrides: str, config: str = SIMSIAM):
    return main(["--config", config, "--trainer.logger", "false", *overrides], run=False)


@pytest.mark.parametrize("overlap", ["-0.1", "0.7"])
def test_overlap_out_of_range_is_rejected_before_training(overlap):
    with pytest.raises(ValueError, match=re.escape(f"model.overlap (gamma) must lie in [0, 0.5], got {overlap}")):
        _instantiate("--model.init_args.bam", "true", "--model.init_args.overlap", overlap)


def test_patch_grid_mismatch_says_what_to_change():
    # The demo's student is a ViT/16 at 64 px (4x4 patches); a /32 teacher sees 2x2 patches.
    config = str(ROOT / "experiments/mvp/demo.yaml")
    teacher = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["teacher_kwargs"]
    teacher["vision_cfg"]["patch_size"] = 32
    with pytest.raises(ValueError, match=r"patch grids differ.*4x4.*2x2.*give the student and the teacher the "
                                         r"same patch size") as info:
        _instantiate("--model.init_args.teacher_kwargs", json.dumps(teacher), config=config)
    assert "vit_tiny_patch16_224" in str(info.value)


def _fit(tmp_path: Path, *overrides: str, config: str = SIMSIAM):
    return main(["fit", "--config", config, "--trainer.logger", "false", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_workers", "0",
                 "--model.init_args.img_size", "32", *overrides])


def test_missing_dataset_root_fails_at_setup(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"data\.root: dataset root '.*nowhere' does not exist"):
        _fit(tmp_path, "--data.init_args.root", str(tmp_path / "nowhere"))
    assert time.perf_counter() - start < 30  # seconds, not hours
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_image_files_fail_at_setup_with_validate_files(tmp_path, demo_root):
    root = tmp_path / "coco"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns("folder", "tencent"))
    victim = sorted((root / "train2017").iterdir())[5]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{victim}'")) as info:
        _fit(tmp_path, "--data.init_args.root", str(root), "--data.init_args.validate_files", "true")
    assert "instances_train2017.json" in str(info.value) and "1 of 48 images" in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # SimSiam's heads hold BatchNorm over the batch: one image per process cannot be normalised.
        (["--data.init_args.batch_size", "1"],
         r"data\.batch_size=1 is too small for BAMIA: it needs at least 2 images per process \(the projector "
         r"and predictor normalise with BatchNorm.*head_norm: layer\); set data\.init_args\.batch_size >= 2"),
        (["--data.init_args.batch_size", "100"],
         r"data\.batch_size=100 is larger than the 48 training images.*set data\.init_args\.batch_size <= 48"),
    ],
    ids=["below_the_method_minimum", "above_the_dataset"],
)
def test_unusable_batch_size_is_rejected_at_setup(tmp_path, demo_root, overrides, message):
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, "--data.init_args.root", demo_root, *overrides)
