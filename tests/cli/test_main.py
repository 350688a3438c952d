"""``python -m ssl_zoo --help`` and ``make help`` list the methods, their configs and the jobs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


METHODS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/demo.yaml"))


ENV = {**{k: v for k, v in os.environ.items() if k != "SSL_ZOO_DEBUG"}, "WANDB_MODE": "disabled"}


def _make(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: never (re)build the virtualenv or the demo data from a test
    return subprocess.run(["make", "-s", "-o", ".venv/.ssl_zoo-installed", "-o", "data/demo/.complete", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)


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
