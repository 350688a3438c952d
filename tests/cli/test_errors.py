"""Mistakes at the command line end in one message (what is wrong, the key or file at fault, what to do), exit
status 2 and no traceback; ``SSL_ZOO_DEBUG=1`` shows the traceback. The listings of ``--help`` / ``make help``.

Each error case runs the command line in a child process, since the exit status and what reaches the terminal
are the point: ``python -m ssl_zoo`` itself for the first case, and for the others the same entry point
(``ssl_zoo.__main__.main``, with ``sys.argv`` set) in a process forked from the test's, which has done the
seconds of imports already. Parse errors, which end the same way in-process, are also checked in-process.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

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


def _run_configs(method: str) -> list[str]:
    """A method's run configs (its tables.yaml is a manifest of paper tables, listed apart)."""
    return [p.name for p in sorted((ROOT / "experiments" / method).glob("*.yaml")) if p.name != "tables.yaml"]


#: The evaluation and transfer jobs: (make target, subcommand, folder of its configs).
JOBS = [("linear", "fit", "eval"), ("gamp", "fit", "eval"), ("finetune", "fit", "eval"), ("knn", "validate", "eval"),
        ("detect", "fit", "transfer"), ("segment", "fit", "transfer")]


def _job_configs() -> set[str]:
    return {p.name for folder in ("eval", "transfer") for p in (ROOT / "experiments" / folder).glob("*.yaml")}


def test_make_help_lists_methods_configs_and_jobs():
    result = _make("help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for method in METHODS:
        line = next(line for line in out.splitlines() if line.startswith(f"  {method}: "))
        assert line.startswith(f"  {method}: {' '.join(_run_configs(method))}"), line
        for folder in sorted(p for p in (ROOT / "experiments" / method).iterdir() if p.is_dir()):
            assert f"{folder.name}/*.yaml" in line, line
    assert "make linear|gamp|finetune|knn CKPT=" in out and "make detect|segment CKPT=" in out
    assert "make sweep SWEEP=" in out and "bench-quality" in out and "demo-shards" in out
    assert all(name in out for name in _job_configs())


def test_python_m_ssl_zoo_help_lists_methods_configs_and_jobs():
    result = subprocess.run([sys.executable, "-m", "ssl_zoo", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for method in METHODS:
        line = next(line for line in out.splitlines() if line.startswith(f"  {method} "))
        assert f": {' '.join(_run_configs(method))}" in line, line
        for folder in sorted(p for p in (ROOT / "experiments" / method).iterdir() if p.is_dir()):
            assert f" + {folder.name}/ ({len(list(folder.glob('*.yaml')))} overlay" in line, line
        assert ("paper tables: tables.yaml" in line) == (ROOT / "experiments" / method / "tables.yaml").is_file()
    for job, subcommand, folder in JOBS:
        assert re.search(rf"^  {job} +python -m ssl_zoo {subcommand} --config experiments/{folder}/{job}_demo.yaml "
                         rf"--model.init_args.ckpt CKPT +\(make {job} CKPT=\.\.\.\)$", out, re.M), out
    listed = {name for line in out.splitlines() if line.strip().startswith("configs: ")
              for name in line.split("configs: ", 1)[1].split()}
    assert listed == _job_configs()  # every evaluation and transfer config, under the job that runs it
    assert re.search(r"^  pretrain +python -m ssl_zoo fit", out, re.M) and "SSL_ZOO_DEBUG=1" in out
