"""Hyperparameter sweeps: ``python -m ssl_zoo.cli.sweep experiments/sweeps/<file>.yaml [--local] [-- overrides]``.

A sweep file is a plain wandb sweep configuration (docs.wandb.ai, "Define a sweep configuration"): ``method``,
``metric``, ``parameters`` named by their LightningCLI keys (``model.init_args.lam``), and a ``command`` that
runs the CLI with the ``${args}`` macro, which the wandb agent expands to ``--model.init_args.lam=4``.

* **Online** (a wandb API key or ``wandb login``, and no ``--local``): ``wandb sweep`` creates the sweep on the
  server and ``wandb agent`` runs its trials, exactly as with any wandb sweep.
* **Local** (offline, or ``--local``): the same file runs on this machine. The ``sweeps`` package (the
  ``wandb[sweeps]`` extra, wandb's own sweep engine) validates the file and suggests each trial (grid, random,
  bayes); the command is rendered with the agent's own macro expansion
  (``wandb.sdk.launch.sweeps.utils``); each trial is a subprocess ``python -m ssl_zoo fit ...`` in
  ``<out>/trial-NNN/`` (its run directory) logged as an offline wandb run, and a summary table sorted by the
  metric ends the sweep (``<out>/summary.json`` and ``summary.csv``).

Arguments after ``--`` are appended to every trial's command (later flags win in the CLI), e.g. a short
schedule: ``python -m ssl_zoo.cli.sweep experiments/sweeps/mvp_loss_on_demo.yaml --local -- --trainer.max_epochs=1``.
The metric is read from the trial's ``metrics.csv`` (the CLI's CSV log), last logged value, which is what the
wandb run summary holds.

Where the local run differs from the agent, and why: ``${interpreter}`` is this Python rather than ``python``
from PATH (the agent's), so a virtualenv need not be activated; ``run_cap``, which the wandb server accepts but
the schema of ``sweeps`` 0.2.0 predates, is checked here; ``early_terminate`` (hyperband) needs the server's
run histories and is not applied.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ssl_zoo.cli.sweep_config import (
    SweepConfigError,
    check_trial_parses,
    load_sweep,
    render_command,
    suggest_params,
    validate_sweep,
)
from ssl_zoo.cli.sweep_local import run_local

__all__ = ["main", "run_online"]


def run_online(sweep_file: str | os.PathLike, count: int | None = None, extra_args: Sequence[str] = (),
               project: str | None = None, entity: str | None = None) -> int:
    """``wandb sweep`` (create the sweep on the server) then ``wandb agent`` (run its trials here)."""
    import wandb

    config = load_sweep(sweep_file)
    validate_sweep(config, sweep_file)
    project = project or config.get("project") or os.environ.get("WANDB_PROJECT") or "ssl_zoo"
    # The CLI's wandb logger names its project explicitly: it must be the sweep's, or the runs land elsewhere.
    config["command"] = [*config["command"], f"--wandb_project={project}", *extra_args]
    first = suggest_params(config, [])
    if first is not None:
        check_trial_parses(render_command(config, {k: v["value"] for k, v in first.config.items()}))
    sweep_id = wandb.sweep(config, project=project, entity=entity or config.get("entity"))
    # The agent runs `python` from PATH (wandb_agent.Agent._command_run): make it this interpreter.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    path = "/".join(p for p in (entity or config.get("entity"), project, sweep_id) if p)
    agent = [sys.executable, "-m", "wandb", "agent", *(["--count", str(count)] if count else []), path]
    print(f"sweep {path}: {shlex.join(agent)}", flush=True)
    return subprocess.call(agent, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m ssl_zoo.cli.sweep",
        description="Run a wandb sweep file: online with `wandb sweep` + `wandb agent`, or locally (offline or "
                    "--local) with wandb's sweep engine, one subprocess per trial. Arguments after `--` are "
                    "appended to every trial's command.")
    parser.add_argument("sweep_file", help="wandb sweep YAML, e.g. experiments/sweeps/mvp_loss_on_demo.yaml")
    parser.add_argument("--local", action="store_true", help="run here even when wandb is online")
    parser.add_argument("--count", type=int, default=None,
                        help="number of trials (default: run_cap, or the whole grid)")
    parser.add_argument("--out", default=None,
                        help="local output directory (default runs/sweeps/<name>/<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of local random/bayes suggestions")
    parser.add_argument("--quiet", action="store_true", help="local: keep trial output in <out>/trial-NNN.log only")
    parser.add_argument("--dry-run", action="store_true",
                        help="local: check the file, print the trial commands, run nothing")
    parser.add_argument("--project", default=None, help="online: wandb project (default: the file's, or ssl_zoo)")
    parser.add_argument("--entity", default=None, help="online: wandb entity")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    from ssl_zoo.cli.lightning_cli import wandb_mode  # imports Lightning: after --help and argument errors

    try:
        if args.local or args.dry_run or wandb_mode() != "online":
            results = run_local(args.sweep_file, args.out, args.count, extra, args.seed, args.quiet, args.dry_run)
            return 1 if results and all(r.status == "failed" for r in results) else 0
        return run_online(args.sweep_file, args.count, extra, args.project, args.entity)
    except SweepConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
