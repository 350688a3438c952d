"""A sweep file run on this machine, one trial after another (``python -m ssl_zoo.cli.sweep FILE --local``).

wandb's sweep engine suggests each trial (:func:`~ssl_zoo.cli.sweep_config.suggest_params`); its command, rendered
with the agent's own macro expansion, runs as a subprocess ``python -m ssl_zoo fit ...`` in ``<out>/trial-NNN/``
(its run directory), logged as an offline wandb run; the metric is read from the trial's ``metrics.csv`` (the
CLI's CSV log), last logged value, which is what the wandb run summary holds. A summary table sorted by the
metric ends the sweep (``<out>/summary.json`` and ``summary.csv``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssl_zoo.cli.sweep_config import (
    SweepConfigError,
    check_trial_parses,
    load_sweep,
    plain_value,
    render_command,
    suggest_params,
    sweeps_engine,
    validate_sweep,
    write_params_file,
)

__all__ = ["TrialResult", "format_summary", "read_last_metric", "run_local", "write_summary"]


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
    from ssl_zoo.cli.lightning_cli import wandb_mode  # imports Lightning: on first use

    sweeps = sweeps_engine()
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
            params = {key: plain_value(spec["value"]) for key, spec in suggestion.config.items()}
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
