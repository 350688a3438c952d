"""A wandb sweep file (docs.wandb.ai, "Define a sweep configuration"): read, checked, rendered into trial commands.

:func:`validate_sweep` checks it against wandb's schema (the ``sweeps`` package, ``wandb[sweeps]``) and the
agent's macros; :func:`render_command` renders a trial's command as the wandb agent would;
:func:`check_trial_parses` parses that command with the CLI, so a misspelt parameter fails before any trial
trains; :func:`suggest_params` is wandb's next suggestion (grid, random, bayes) given the trials so far. Both the
online sweep and the local runner (:mod:`ssl_zoo.cli.sweep_local`) go through these.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import platform
import random
import re
import shlex
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AGENT_MACROS",
    "ARGS_MACROS",
    "SERVER_ONLY_KEYS",
    "SweepConfigError",
    "check_trial_parses",
    "cli_args",
    "load_sweep",
    "plain_value",
    "render_command",
    "schema_view",
    "suggest_params",
    "sweeps_engine",
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


def sweeps_engine():
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


def schema_view(config: dict[str, Any]) -> dict[str, Any]:
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
    problems = list(sweeps_engine().schema_violations_from_proposed_config(schema_view(config)))
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


def plain_value(value: Any) -> Any:
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
        {"args": {name: {"value": plain_value(value)} for name, value in params.items()}})


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
    from ssl_zoo.cli.lightning_cli import main as cli_main

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
        warnings.simplefilter("ignore")  # pydantic-v1 idioms of sweeps 0.2.0 (see sweeps_engine)
        return sweeps_engine().next_run(schema_view(config), previous)
