"""Hyperparameter sweeps: ``python -m ssl_zoo.sweep experiments/sweeps/<file>.yaml [--local] [-- overrides]``.

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
schedule: ``python -m ssl_zoo.sweep experiments/sweeps/mvp_loss_on_demo.yaml --local -- --trainer.max_epochs=1``.
The metric is read from the trial's ``metrics.csv`` (the CLI's CSV log), last logged value, which is what the
wandb run summary holds.

Where the local run differs from the agent, and why: ``${interpreter}`` is this Python rather than ``python``
from PATH (the agent's), so a virtualenv need not be activated; ``run_cap``, which the wandb server accepts but
the schema of ``sweeps`` 0.2.0 predates, is checked here; ``early_terminate`` (hyperband) needs the server's
run histories and is not applied.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SweepConfigError",
    "TrialResult",
    "check_trial_parses",
    "cli_args",
    "load_sweep",
    "main",
    "read_last_metric",
    "render_command",
    "run_local",
    "suggest_params",
    "validate_sweep",
    "wandb_private_sweep_macros",
    "write_params_file",
]

#: The macros the wandb agent expands in ``command`` (``wandb_agent.Agent._command_run``); ``${envvar:NAME}``
#: is expanded first (``create_sweep_command``).
ARGS_MACROS = ("args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json",
               "args_json_file", "args_append_hydra", "args_override_hydra")
AGENT_MACROS = ("env", "interpreter", "program", *ARGS_MACROS)
_MACRO = re.compile(r"^\$\{([A-Za-z_]+)\}$")
_ENVVAR_MACRO = re.compile(r"\$\{envvar:[A-Z0-9_]*\}")
#: Top-level keys the wandb server accepts that the schema of the ``sweeps`` package (0.2.0) predates.
SERVER_ONLY_KEYS = ("run_cap",)


class SweepConfigError(ValueError):
    """A sweep file that cannot run; the message names the file and every problem found."""


def _sweeps_engine():
    """wandb's sweep engine (the ``sweeps`` package of the ``wandb[sweeps]`` extra)."""
    try:
        with warnings.catch_warnings():  # sweeps 0.2.0 uses pydantic-v1 idioms that pydantic v2 warns about
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError as err:  # pragma: no cover - a broken install
        raise SystemExit("error: local sweeps need wandb's sweep engine: pip install 'wandb[sweeps]' "
                         f"(part of this project's dependencies; {err})") from err
    return sweeps


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep YAML file (a mapping), with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep file '{path}' not found (see experiments/sweeps/)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepConfigError(f"sweep file '{path}' is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise SweepConfigError(f"sweep file '{path}' must hold a mapping (method, metric, parameters, command), "
                               f"found {type(config).__name__}")
    return config


def _schema_view(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the ``sweeps`` schema knows it: the server-only keys (``run_cap``) are checked here."""
    return {k: v for k, v in config.items() if k not in SERVER_ONLY_KEYS}


def _command_config_paths(command: Sequence[Any]) -> list[str]:
    """The files given to ``--config`` in a command (``--config X`` and ``--config=X``)."""
    paths, items = [], [str(c) for c in command]
    for i, item in enumerate(items):
        if item == "--config" and i + 1 < len(items):
            paths.append(items[i + 1])
        elif item.startswith("--config="):
            paths.append(item.split("=", 1)[1])
    return paths


def validate_sweep(config: dict[str, Any], source: str | os.PathLike = "<sweep>",
                   workdir: str | os.PathLike | None = None) -> None:
    """Raise :class:`SweepConfigError` listing every problem of a sweep configuration.

    Checks wandb's JSON schema (``sweeps.schema_violations_from_proposed_config``), ``run_cap``, that a
    ``metric`` is named (the local summary sorts by it), that the ``command`` passes the parameters with one
    of the agent's ``${args...}`` macros and uses no macro the agent does not know (it would silently drop
    it), and that ``program`` and every ``--config`` file exist relative to ``workdir`` (default: the current
    directory, where the agent runs the command).
    """
    workdir = Path(workdir or Path.cwd())
    problems = list(_sweeps_engine().schema_violations_from_proposed_config(_schema_view(config)))
    run_cap = config.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        problems.append(f"run_cap must be a positive integer, got {run_cap!r}")
    if not (config.get("metric") or {}).get("name"):
        problems.append("no metric.name: name the logged value to optimise (e.g. probe/knn_top1)")
    command = config.get("command")
    if command is None or not isinstance(command, list):
        problems.append("command must be a list that runs the CLI, e.g. [${env}, ${interpreter}, -m, ssl_zoo, "
                        "fit, --config, <config.yaml>, ${args}]")
    else:
        macros = [m.group(1) for c in command if (m := _MACRO.match(str(c)))]
        unknown = [m for m in macros if m not in AGENT_MACROS]
        if unknown:
            problems.append(f"command uses macros the wandb agent does not expand (they would vanish): "
                            f"{', '.join('${' + m + '}' for m in unknown)}; known: "
                            f"{', '.join('${' + m + '}' for m in AGENT_MACROS)}")
        if not any(m in ARGS_MACROS for m in macros):
            problems.append("command has no ${args} (or another args macro): the parameters would never reach "
                            "the CLI")
        for cfg in _command_config_paths(command):
            if not _ENVVAR_MACRO.search(cfg) and not (workdir / cfg).is_file():
                problems.append(f"command's --config '{cfg}' does not exist under '{workdir}' (run sweeps from "
                                "the repository root)")
    program = config.get("program")
    if program is not None and not (workdir / str(program)).is_file():
        problems.append(f"program '{program}' does not exist under '{workdir}'")
    if problems:
        raise SweepConfigError(f"sweep file '{source}':\n  - " + "\n  - ".join(problems))


def _plain(value: Any) -> Any:
    """numpy scalars (random/bayes suggestions) -> Python numbers, so they print and serialise plainly."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, list | dict | str):
        with contextlib.suppress(Exception):
            return value.item()
    return value


def wandb_private_sweep_macros(command: list | None, params: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    """``command`` with its ``${envvar:X}`` macros filled in and the ``${args...}`` macros' values for ``params``,
    by wandb's agent's own helpers: the one reach into wandb's private ``wandb.sdk`` (no public API does this);
    ``test_render_command_matches_the_wandb_agent`` fails when wandb changes them."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    return sweep_utils.create_sweep_command(copy.deepcopy(command)), sweep_utils.create_sweep_command_args(
        {"args": {name: {"value": _plain(value)} for name, value in params.items()}})


def write_params_file(path: Path, params: dict[str, Any]) -> None:
    """``params`` in wandb's documented ``config-defaults.yaml`` format, read by ``wandb.init`` from
    ``WANDB_SWEEP_PARAM_PATH``."""
    content = {"wandb_version": 1, **{name: {"value": value} for name, value in params.items()}}
    path.write_text(yaml.safe_dump(content, allow_unicode=True, sort_keys=False))


def render_command(config: dict[str, Any], params: dict[str, Any], interpreter: str = "python",
                   args_json_file: str | None = None) -> list[str]:
    """The trial command the wandb agent would run for ``params`` (``{"model.init_args.lam": 4, ...}``).

    Mirrors ``wandb_agent.Agent._command_run``: ``${envvar:X}`` via ``create_sweep_command``, the args formats
    via ``create_sweep_command_args``, then ``${env}`` -> ``/usr/bin/env`` (not on Windows),
    ``${interpreter}`` -> ``python`` (here: ``interpreter``), ``${program}`` -> the file's ``program``, and any
    other ``${macro}`` -> nothing. Items that are not a whole macro are kept verbatim.
    """
    command, sweep_vars = wandb_private_sweep_macros(config.get("command"), params)
    sweep_vars["interpreter"] = [interpreter]
    sweep_vars["program"] = [config["program"]] if config.get("program") else []
    sweep_vars["args_json_file"] = [args_json_file] if args_json_file else []
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    rendered: list[str] = []
    for item in command:
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            rendered += [str(v) for v in sweep_vars.get(item[2:-1]) or []]
        else:
            rendered.append(item)
    return rendered


def cli_args(command: Sequence[str]) -> list[str]:
    """The LightningCLI arguments of a rendered command (everything after ``-m ssl_zoo``)."""
    items = list(command)
    for i in range(len(items) - 1):
        if items[i] == "-m" and items[i + 1] == "ssl_zoo":
            return items[i + 2:]
    raise SweepConfigError(f"the command does not run the CLI with '-m ssl_zoo': {shlex.join(items)}")


def check_trial_parses(command: Sequence[str]) -> dict[str, Any]:
    """Parse a rendered trial command with the CLI (``--print_config``, nothing is built or run).

    Returns the resolved configuration; raises :class:`SweepConfigError` with the CLI's message when a key is
    unknown or a value has the wrong type, so a misspelt parameter fails before any trial trains.
    """
    from ssl_zoo.cli import main as cli_main

    args = cli_args(command)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        # The sweep's own command line is in sys.argv; LightningCLI warns when given args as well.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            cli_main([*args, "--print_config"])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code or 0
    if code != 0:
        message = err.getvalue().strip().splitlines()
        raise SweepConfigError(f"the CLI rejects the trial command {shlex.join(args)}:\n  "
                               + "\n  ".join(message[-5:]))
    return yaml.safe_load(out.getvalue())


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The ``sweeps`` engine samples with ``random`` and ``numpy.random``: seed both, restore afterwards."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def suggest_params(config: dict[str, Any], previous: list, seed: int = 0):
    """wandb's next suggestion (``sweeps.next_run``) given the previous ``SweepRun``s; ``None`` = grid done."""
    with _seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic-v1 idioms of sweeps 0.2.0 (see _sweeps_engine)
        return _sweeps_engine().next_run(_schema_view(config), previous)


def read_last_metric(metrics_csv: str | os.PathLike, name: str) -> float | None:
    """The last logged value of ``name`` in a CSV log (what a wandb run summary holds); ``None`` if absent."""
    path = Path(metrics_csv)
    if not path.is_file():
        return None
    value = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            cell = row.get(name)
            if cell not in (None, ""):
                value = float(cell)
    return value


@dataclass
class TrialResult:
    """One local trial: its parameters, outcome and where it left its files."""

    trial: int
    params: dict[str, Any]
    status: str  # "finished" | "failed" | "no metric"
    metric: float | None
    seconds: float
    run_dir: str
    log_file: str
    wandb_runs: list[str] = field(default_factory=list)
    returncode: int | None = None


def _tee_process(command: list[str], env: dict[str, str], log_file: Path, quiet: bool) -> int:
    """Run ``command``, copying its output to ``log_file`` (and the terminal unless ``quiet``)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT) as proc:
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            return proc.wait()
        except KeyboardInterrupt:  # stop this trial's process, then let the sweep report what it has
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _trial_count(config: dict[str, Any], count: int | None, source: str) -> int | None:
    """How many trials to run: ``count``, else ``run_cap``, else (grid only) until the grid is exhausted."""
    limit = count if count is not None else config.get("run_cap")
    if limit is None and config.get("method") != "grid":
        raise SweepConfigError(f"sweep file '{source}': a {config.get('method')} search never ends by itself; "
                               "give --count N (make sweep ... COUNT=N) or run_cap in the file")
    return limit


def _sort_key(goal: str):
    def key(result: TrialResult) -> tuple:
        if result.metric is None or not math.isfinite(result.metric):
            return (1, 0.0, result.trial)
        return (0, -result.metric if goal == "maximize" else result.metric, result.trial)

    return key


def format_summary(results: list[TrialResult], metric: str, goal: str) -> str:
    """A plain-text table of the trials sorted by the metric (best first; failed trials last)."""
    names = sorted({name for r in results for name in r.params})
    header = ["trial", *names, metric, "status", "run_dir"]
    rows = [[f"{r.trial:03d}", *(_format_value(r.params.get(n)) for n in names),
             "-" if r.metric is None else f"{r.metric:.4g}", r.status, r.run_dir]
            for r in sorted(results, key=_sort_key(goal))]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in (header, *rows)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_summary(results: list[TrialResult], out_dir: Path, metric: str, goal: str, sweep: dict) -> None:
    """``summary.json`` (the sweep and every trial, best first) and ``summary.csv`` (one row per trial)."""
    ordered = sorted(results, key=_sort_key(goal))
    (out_dir / "summary.json").write_text(json.dumps(
        {"sweep": sweep, "metric": {"name": metric, "goal": goal}, "trials": [asdict(r) for r in ordered]},
        indent=2, default=str) + "\n")
    names = sorted({name for r in results for name in r.params})
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *names, metric, "status", "seconds", "run_dir", "wandb_runs"])
        for r in ordered:
            writer.writerow([r.trial, *(r.params.get(n) for n in names), r.metric, r.status, round(r.seconds, 1),
                             r.run_dir, " ".join(r.wandb_runs)])


def run_local(
    sweep_file: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    count: int | None = None,
    extra_args: Sequence[str] = (),
    seed: int = 0,
    quiet: bool = False,
    dry_run: bool = False,
) -> list[TrialResult]:
    """Run a sweep file on this machine, one trial after another (see the module docstring).

    Args:
        sweep_file: the wandb sweep YAML.
        out_dir: where the trials' run directories and the summary go (default
            ``runs/sweeps/<sweep name>/<YYYYmmdd-HHMMSS>``).
        count: number of trials (default: ``run_cap``, or the whole grid).
        extra_args: CLI arguments appended to every trial's command.
        seed: seed of the random/bayes suggestions (trial ``i`` samples with ``seed + i``).
        quiet: do not copy the trials' output to the terminal (it is always in ``<out>/trial-NNN.log``).
        dry_run: print the trial commands of a grid (or the first ``count`` suggestions) without running.
    """
    from ssl_zoo.cli import wandb_mode

    sweeps = _sweeps_engine()
    config = load_sweep(sweep_file)
    validate_sweep(config, sweep_file)
    metric = config["metric"]["name"]
    goal = config["metric"].get("goal", "minimize")
    target = config["metric"].get("target")
    limit = _trial_count(config, count, str(sweep_file))
    if config.get("early_terminate"):
        print(f"note: early_terminate is applied by the wandb server only; locally every trial runs to the end "
              f"({sweep_file})")
    name = config.get("name") or Path(sweep_file).stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir is not None else Path("runs") / "sweeps" / name / stamp
    mode = "disabled" if wandb_mode() == "disabled" else "offline"

    previous: list = []
    results: list[TrialResult] = []
    checked = False
    index = 0
    try:
        while limit is None or index < limit:
            suggestion = suggest_params(config, previous, seed + index)
            if suggestion is None:
                break  # the grid is exhausted
            params = {key: _plain(spec["value"]) for key, spec in suggestion.config.items()}
            run_dir = (out / f"trial-{index:03d}").resolve()
            command = [*render_command(config, params, interpreter=sys.executable,
                                       args_json_file=str(run_dir.with_name(f"{run_dir.name}.args.json"))),
                       *extra_args, f"--trainer.default_root_dir={run_dir}"]
            if not checked:  # a misspelt key fails here in seconds, not after a trial's training
                check_trial_parses(command)
                checked = True
            if dry_run:
                print(shlex.join(command))
                suggestion.state = sweeps.RunState.finished
                previous.append(suggestion)
                index += 1
                continue
            results.append(_run_trial(index, params, command, run_dir, metric, mode, f"{name}-{stamp}", quiet))
            suggestion.state = (sweeps.RunState.finished if results[-1].returncode == 0
                                else sweeps.RunState.failed)
            if results[-1].metric is not None:  # what the bayes search fits; the grid only needs the config
                suggestion.summary_metrics = {metric: results[-1].metric}
                suggestion.history = [{metric: results[-1].metric}]
            previous.append(suggestion)
            index += 1
            if target is not None and results[-1].metric is not None and (
                    results[-1].metric >= target if goal == "maximize" else results[-1].metric <= target):
                print(f"metric {metric} reached the target {target}: the sweep stops, as wandb's does")
                break
    except KeyboardInterrupt:
        print("\ninterrupted: summary of the trials run so far")
    if dry_run:
        return results
    if results:
        out.mkdir(parents=True, exist_ok=True)
        write_summary(results, out, metric, goal, {"file": str(sweep_file), "name": name, **config})
        print(f"\nsweep '{name}': {len(results)} trials, {metric} ({goal}), best first")
        print(format_summary(results, metric, goal))
        print(f"\nsummary: {out / 'summary.json'}, {out / 'summary.csv'}")
        offline = [run for r in results for run in r.wandb_runs]
        if offline:
            print(f"offline wandb runs; upload them with: wandb sync {shlex.join(offline)}")
    return results


def _run_trial(index: int, params: dict[str, Any], command: list[str], run_dir: Path, metric: str, mode: str,
               group: str, quiet: bool) -> TrialResult:
    """One trial as the agent would start it: the params file in ``WANDB_SWEEP_PARAM_PATH`` (wandb.init
    copies it into the run's config), ``${args_json_file}`` written, then the command. These files and the
    trial's output log lie next to the run directory (``trial-NNN.*``), which stays the CLI's own."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    param_file = run_dir.with_name(f"{run_dir.name}.params.yaml")
    write_params_file(param_file, params)
    run_dir.with_name(f"{run_dir.name}.args.json").write_text(json.dumps(params) + "\n")
    env = dict(os.environ, WANDB_MODE=mode, WANDB_SWEEP_PARAM_PATH=str(param_file),
               WANDB_RUN_GROUP=group)
    summary = ", ".join(f"{k}={_format_value(v)}" for k, v in params.items())
    print(f"\n=== trial {index:03d}: {summary}\n    {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    log_file = run_dir.with_name(f"{run_dir.name}.log")
    returncode = _tee_process(command, env, log_file, quiet)
    seconds = time.perf_counter() - start
    value = read_last_metric(run_dir / "metrics.csv", metric)
    status = "failed" if returncode != 0 else ("finished" if value is not None else "no metric")
    if returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
        print(f"=== trial {index:03d} failed (exit {returncode}); end of {log_file}:\n    " + "\n    ".join(tail))
    elif value is None:
        print(f"=== trial {index:03d}: '{metric}' was never logged (is the metric's callback in the command?)")
    else:
        print(f"=== trial {index:03d}: {metric} = {value:.4g} ({seconds:.0f} s)")
    wandb_runs = sorted(str(p) for p in (run_dir / "wandb").glob("offline-run-*"))
    return TrialResult(index, params, status, value, seconds, str(run_dir), str(log_file), wandb_runs, returncode)


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
        prog="python -m ssl_zoo.sweep",
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
    from ssl_zoo.cli import wandb_mode

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
