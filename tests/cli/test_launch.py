"""Launchers: the SLURM and torchrun scripts parse, render the right command, and ``make pretrain`` builds it."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ssl_zoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "experiments" / "launch" / "slurm.sbatch"
TORCHRUN = ROOT / "experiments" / "launch" / "torchrun.sh"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SSL_ZOO_", "MASTER_", "NCCL_"))}


def _bash(script: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(["bash", str(script), *args], cwd=ROOT, env={**CLEAN_ENV, **env}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _command(output: str) -> list[str]:
    """The rendered command (the last printed line) split as the shell would."""
    return shlex.split(output.strip().splitlines()[-1])


def _option(tokens: list[str], name: str) -> str:
    return tokens[tokens.index(name) + 1]


def _ssl_zoo_args(tokens: list[str]) -> list[str]:
    """What follows ``-m ssl_zoo`` (``fit --config ... --trainer.num_nodes 2 ...``)."""
    at = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["-m", "ssl_zoo"])
    return tokens[at + 2 :]


@pytest.mark.parametrize("script", [SLURM, TORCHRUN], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK)


def test_slurm_dry_run_renders_srun_command():
    args = "--trainer.max_epochs 3 --data.init_args.root '/data/my images'"
    out = _bash(SLURM, {"DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "8", "CONFIG": "experiments/mpcl/demo.yaml",
                        "ARGS": args})
    tokens = _command(out)
    assert tokens[0] == "srun"
    assert _option(tokens, "--config") == "experiments/mpcl/demo.yaml"
    assert _option(tokens, "--trainer.num_nodes") == "2" and _option(tokens, "--trainer.devices") == "8"
    assert _option(tokens, "--trainer.strategy") == "ddp" and _option(tokens, "--resume") == "auto"
    assert _option(tokens, "--data.init_args.root") == "/data/my images"  # shell quoting in ARGS survives
    assert "NCCL_DEBUG=WARN" in out and "SSL_ZOO_RUN_STAMP=slurm-local" in out


def test_slurm_reads_the_allocation(tmp_path):
    """Inside a job: nodes and tasks from SLURM, MASTER_ADDR from scontrol, the run pinned to the job id."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/bash\nprintf 'gpu-node-17\\ngpu-node-18\\n'\n")
    scontrol.chmod(0o755)
    out = _bash(SLURM, {"DRY_RUN": "1", "CONFIG": "experiments/mvp/demo.yaml", "SLURM_NNODES": "4",
                        "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "98765", "SLURM_JOB_NODELIST": "gpu-node-[17-18]",
                        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    tokens = _command(out)
    assert _option(tokens, "--trainer.num_nodes") == "4" and _option(tokens, "--trainer.devices") == "4"
    assert "MASTER_ADDR=gpu-node-17" in out and "SSL_ZOO_RUN_STAMP=slurm-98765" in out
    assert f"MASTER_PORT={15000 + 98765 % 20000}" in out


def test_slurm_resume_continues_the_newest_run():
    out = _bash(SLURM, {"DRY_RUN": "1", "CONFIG": "experiments/mpcl/demo.yaml", "RESUME": "1"})
    assert _option(_command(out), "--resume") == "true" and "SSL_ZOO_RUN_STAMP= " in out


def test_slurm_requires_a_config():
    result = subprocess.run(["bash", str(SLURM)], cwd=ROOT, env={**CLEAN_ENV, "DRY_RUN": "1"}, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "CONFIG" in result.stderr


def test_torchrun_dry_run():
    out = _bash(TORCHRUN, {"DRY_RUN": "1", "NODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "4",
                           "MASTER_ADDR": "node0", "SSL_ZOO_RUN_STAMP": "run1", "CONFIG": "experiments/mpcl/demo.yaml"})
    tokens = _command(out)
    assert tokens[1:3] == ["-m", "torch.distributed.run"]
    assert (_option(tokens, "--nnodes"), _option(tokens, "--node_rank"), _option(tokens, "--nproc_per_node"),
            _option(tokens, "--master_addr")) == ("2", "1", "4", "node0")
    assert _option(tokens, "--trainer.num_nodes") == "2" and _option(tokens, "--trainer.devices") == "4"
    assert "SSL_ZOO_RUN_STAMP=run1" in out


@pytest.mark.parametrize("script", [SLURM, TORCHRUN], ids=lambda p: p.name)
def test_rendered_command_is_accepted_by_the_cli(script):
    """Every flag the launchers add is a valid key: the command parses (without starting anything)."""
    out = _bash(script, {"DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "8", "CONFIG": "experiments/mpcl/demo.yaml",
                         "ARGS": "--trainer.max_epochs 3"})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        main([*_ssl_zoo_args(_command(out)), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(printed.getvalue())
    assert resolved["trainer"]["num_nodes"] == 2 and str(resolved["trainer"]["devices"]) == "8"
    assert resolved["trainer"]["max_epochs"] == 3


# ------------------------------------------------------------------------------------- make pretrain
def _make(*args: str, env: dict[str, str] | None = None) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: never (re)build the virtualenv or the demo data from a test
    result = subprocess.run(["make", "-s", "-o", ".venv/.ssl_zoo-installed", "-o", "data/demo/.complete", *args],
                            cwd=ROOT, env={**CLEAN_ENV, **(env or {})}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_make_pretrain_multi_node_prints_and_submits_the_sbatch_command(tmp_path):
    out = _make("pretrain", "METHOD=mpcl", "NODES=2", "GPUS=8", "ARGS=--trainer.max_epochs 3")
    line = out.splitlines()[0]
    tokens = shlex.split(line)
    assert "sbatch" in tokens and tokens[-1] == "experiments/launch/slurm.sbatch"
    assert {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--output=runs/slurm/%x-%j.out"} <= set(tokens)
    assert {"NODES=2", "GPUS_PER_NODE=8", "CONFIG=experiments/mpcl/demo.yaml", "ARGS=--trainer.max_epochs 3"} <= set(
        tokens)
    assert "not submitted" in out

    # SUBMIT=1 runs it: a stand-in sbatch plays the allocation and dry-runs the job script
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(
        "#!/bin/bash\n"
        "for a in \"$@\"; do case $a in --nodes=*) export SLURM_NNODES=${a#*=};;"
        " --ntasks-per-node=*) export SLURM_NTASKS_PER_NODE=${a#*=};; esac; done\n"
        "SLURM_JOB_ID=7 DRY_RUN=1 bash \"${@: -1}\"\n")
    sbatch.chmod(0o755)
    out = _make("pretrain", "METHOD=mpcl", "NODES=2", "GPUS=8", "SUBMIT=1", f"SLURM_LOG_DIR={tmp_path / 'logs'}",
                "ARGS=--data.init_args.root '/data/my images'", env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    tokens = _command(out)
    assert tokens[0] == "srun" and _option(tokens, "--config") == "experiments/mpcl/demo.yaml"
    assert _option(tokens, "--trainer.num_nodes") == "2" and _option(tokens, "--trainer.devices") == "8"
    assert _option(tokens, "--data.init_args.root") == "/data/my images"
    assert "SSL_ZOO_RUN_STAMP=slurm-7" in out
    assert (tmp_path / "logs").is_dir()  # the job log folder exists before submission


def test_make_pretrain_one_node(tmp_path):
    single = _command(_make("-n", "pretrain", "METHOD=mvp", "GPUS=8"))
    assert _ssl_zoo_args(single)[:3] == ["fit", "--config", "experiments/mvp/demo.yaml"]
    assert _option(single, "--trainer.devices") == "8" and "--resume" not in single
    resume = _command(_make("-n", "pretrain", "METHOD=mpcl", "RESUME=1", "ARGS=--trainer.max_epochs 3"))
    assert _option(resume, "--resume") == "true" and "--trainer.devices" not in resume
    assert resume[-2:] == ["--trainer.max_epochs", "3"]
