"""What a user got wrong, in one line: ``error: <what is wrong, the key or file at fault, what to do>``.

* :func:`explain_parse_error` -- jsonargparse's parse errors (a misspelt option or key, a bad value, an unknown
  class) as one message naming the key and where it was given, with the closest valid names;
  :class:`SSLZooArgumentParser` prints it instead of the usage;
* :func:`explain_error` -- an exception a user can fix (a bad value or file, a checkpoint that is not one, a
  Lightning misconfiguration, a non-finite loss, GPU memory) as one message, ``None`` for a bug;
* the checks before a run that fail that way: :func:`check_accelerator` (a GPU config on a machine without
  GPUs: how to run it anyway) and :func:`check_data_root` (a missing or empty dataset root).

:func:`ssl_zoo.cli.lightning_cli.run` prints the message with exit status :data:`USER_ERROR_EXIT`;
``SSL_ZOO_DEBUG=1`` (:func:`debug_mode`) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import inspect
import os
import pickle
import pydoc
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser

from ssl_zoo.utils.callbacks import NonFiniteLossError
from ssl_zoo.utils.signatures import init_parameters

#: Environment variable: ``1`` shows the traceback of a failed command instead of the one-line message.
DEBUG_ENV = "SSL_ZOO_DEBUG"
#: Exit status of a command stopped by a user error (argparse's, for bad command lines).
USER_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A configuration that cannot run as given; the message says what to change."""


def debug_mode() -> bool:
    """Whether ``SSL_ZOO_DEBUG`` asks for the traceback of a failed command."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# ---------------------------------------------------------------------------------------- errors, one line
def accepted_options(class_path: str) -> list[str]:
    """The init arguments the CLI accepts for ``class_path`` (through ``**kwargs`` up the class tree)."""
    try:
        cls = pydoc.locate(class_path)  # the standard library's importer of a dotted path (jsonargparse's is private)
    except Exception:  # the module fails to import: reported elsewhere
        return []
    return list(init_parameters(cls)) if isinstance(cls, type) else []  # None: the name itself is wrong


def _did_you_mean(name: str, candidates: Sequence[str], render=repr) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(render(c) for c in close)}?" if close else ""


def _config_files(command_line: Sequence[str]) -> list[str]:
    files = [command_line[i + 1] for i, arg in enumerate(command_line[:-1]) if arg in ("--config", "-c")]
    return files + [arg.split("=", 1)[1] for arg in command_line if arg.startswith("--config=")]


def _where(key: str, command_line: Sequence[str]) -> str:
    if any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in command_line):
        return f"on the command line (--{key})"
    files = _config_files(command_line)
    return f"in {', '.join(files)}" if files else "in the configuration"


def _unknown_init_arg(group: str, class_path: str, name: str, command_line: Sequence[str]) -> str:
    key = f"{group}.init_args.{name}"
    options = accepted_options(class_path)
    hint = _did_you_mean(name, options, render=lambda c: f"'{c}' (--{group}.init_args.{c})")
    if not hint and options:
        hint = f"; it takes: {', '.join(options)}"
    return (f"{key}: '{name}' is not accepted by {class_path}, {_where(key, command_line)}{hint} "
            f"(python -m ssl_zoo fit --{group}.help {class_path} describes them)")


def _unknown_class(group: str, module: str, name: str) -> str:
    import importlib

    try:
        candidates = [n for n, v in vars(importlib.import_module(module)).items() if isinstance(v, type)]
    except ImportError:
        candidates = []
    return f"{group}: {module} has no class '{name}'{_did_you_mean(name, candidates)}"


_UNION_NOISE = re.compile(r"^\s*(- )?(Does not validate against any of the Union subtypes|Subtypes: |Errors:\s*$|"
                          r"Expected a <class 'NoneType'>|Given value type: |Given value: )")


def explain_parse_error(message: str, command_line: Sequence[str] = (), options: Sequence[str] = ()) -> str:
    """jsonargparse's error ``message`` as one message naming the key, with the closest valid names.

    ``options``: the option strings of the parser (for a misspelt ``--trainer.*`` or top-level option).
    """
    group_match = re.search(r'Parser key "([\w.]+)"', message)
    group = group_match.group(1) if group_match else "model"
    problem = re.search(r"Problem with given class_path '([\w.]+)':\n(.*?)(?=\n\s*- |\Z)", message, re.S)
    if problem:
        class_path, inner = problem.group(1), textwrap.dedent(problem.group(2)).strip()
        unknown = re.search(r"Option '(\w+)' is not accepted", inner)
        if unknown:
            return _unknown_init_arg(group, class_path, unknown.group(1), command_line)
        missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", inner)
        if missing:
            return _unknown_class(group, missing.group(1), missing.group(2))
        text = " ".join(line.strip() for line in inner.splitlines())
        bad_value = re.match(r'Parser key "(\w+)":\s*(.*)', text)
        if bad_value:
            key = f"{group}.init_args.{bad_value.group(1)}"
            return f"{key}: {bad_value.group(2)} ({class_path}, {_where(key, command_line)})"
        return f"{group} ({class_path}): {text}"
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        parts = []
        for arg in unrecognized.group(1).split():
            if arg.startswith("--"):
                name = arg.split("=", 1)[0]
                parts.append(f"unknown option {name}{_did_you_mean(name, options)}")
        if parts:
            return "; ".join(parts) + " (python -m ssl_zoo fit --help lists the options)"
    if re.search(r'Parser key "config":.*(does not exist|not exist)', message):
        return f"{message.strip()} (python -m ssl_zoo --help lists the configs)"
    lines = [line for line in message.splitlines() if line.strip() and not _UNION_NOISE.match(line)]
    return textwrap.dedent("\n".join(lines)).strip() or message


def argparse_private_subparsers(parser: Any) -> list[Any]:
    """The parsers of ``parser``'s subcommands (``fit``, ``validate``...), and ``argparse_private_option_strings``
    the option strings of one parser: argparse and jsonargparse keep both in private attributes and have no public
    accessor. ``tests/cli/test_errors.py`` (a misspelt ``--trainer`` option and a bad key named with its config file)
    fails when they move."""
    subcommands = getattr(parser, "_subcommands_action", None)
    return list((getattr(subcommands, "_name_parser_map", None) or {}).values())


def argparse_private_option_strings(parser: Any) -> list[str]:
    return list(parser._option_string_actions)  # see argparse_private_subparsers


class SSLZooArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one message (:func:`explain_parse_error`) without the usage."""

    command_line: Sequence[str] = ()

    def _all_option_strings(self) -> list[str]:
        options = [o for p in (self, *argparse_private_subparsers(self)) for o in argparse_private_option_strings(p)]
        return [o for o in options if o.startswith("--")]

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_mode():
            super().error(message, ex)
        explained = explain_parse_error(message, self.command_line, self._all_option_strings())
        sys.stderr.write(f"error: {explained}\n")
        self.exit(USER_ERROR_EXIT)


#: The data module's root and what it reads, while a command runs (to explain a missing file under it).
_data_root: tuple[str, str] | None = None


def _original_message(message: str) -> str:
    """The message of an exception re-raised from a DataLoader worker, without the worker's traceback."""
    head, _, traceback = message.partition("Original Traceback (most recent call last):")
    lines = traceback.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] and not lines[i].startswith(" ") and ": " in lines[i]:
            return "\n".join([lines[i].split(": ", 1)[1], *lines[i + 1:]]).strip()
    return head.strip()


def _unwrap(err: BaseException) -> BaseException:
    """The exception a jsonargparse wrapper (a class that failed to instantiate) was raised from."""
    while err.__cause__ is not None and str(err).startswith("Does not validate against any of the Union"):
        err = err.__cause__
    return err


def explain_error(err: BaseException) -> str | None:
    """One message for an exception a user can fix, or None for anything else (a bug: keep the traceback).

    User errors: bad values and files (``ValueError``, ``OSError``: configs, data, checkpoints, images),
    checkpoints that would run code, Lightning misconfigurations, a non-finite loss, GPU out of memory.
    """
    import torch

    err = _unwrap(err)
    known = (ValueError, OSError, pickle.UnpicklingError, MisconfigurationException, NonFiniteLossError,
             torch.OutOfMemoryError)
    if not isinstance(err, known):
        return None
    message = str(err).strip()
    if "Original Traceback (most recent call last):" in message:
        message = _original_message(message)
    if isinstance(err, OSError) and err.filename and message.startswith("[Errno"):
        message = f"{err.strerror.lower()}: '{err.filename}'"
        if _data_root and os.path.abspath(err.filename).startswith(os.path.abspath(_data_root[0])):
            message += (f" (is data.init_args.root '{_data_root[0]}' the right folder? {_data_root[1]})")
    if isinstance(err, torch.OutOfMemoryError):
        message = f"{message.splitlines()[0]} (lower data.init_args.batch_size, or use more GPUs)"
    if isinstance(err, MisconfigurationException) and "gpu" in message.lower():
        message += (" (to run on the CPU: --trainer.accelerator cpu --trainer.devices 1 --trainer.precision 32; "
                    "experiments/<method>/demo.yaml are CPU-sized)")
    return message or type(err).__name__


# ---------------------------------------------------------------------------------------- checks before a run
def device_count(devices: Any) -> int | None:
    """Devices per node that ``trainer.devices`` asks for; None for 'auto' / -1 (all there are)."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)
    except (TypeError, ValueError):
        return None
    return None if count < 0 else count


def cpu_sized_configs(config: str) -> list[str]:
    """The demo / CPU configs next to ``config``; for an overlay in a subfolder of a method
    (``experiments/<method>/ablations/x.yaml``, ``variants/``, ``baselines/``) the method's."""
    folder = Path(config).parent
    if not (folder / "demo.yaml").is_file() and (folder.parent / "demo.yaml").is_file():
        folder = folder.parent
    return [str(p) for p in sorted(folder.glob("*.yaml")) if "demo" in p.stem or "cpu" in p.stem]


def check_accelerator(trainer_cfg: Mapping[str, Any], configs: Sequence[str]) -> None:
    """A config that asks for GPUs this machine does not have fails here, saying how to run it anyway."""
    accelerator = trainer_cfg.get("accelerator")
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = trainer_cfg.get("devices")
    requested = device_count(devices)
    if available and (requested is None or requested <= available):
        return
    source = ", ".join(configs) or "the configuration"
    asked = f"trainer.accelerator: {accelerator}, trainer.devices: {devices}"
    if available:
        raise ConfigError(
            f"{source} asks for {requested} GPUs per node ({asked}) but this machine has {available}: add "
            f"--trainer.devices {available} (make: GPUS={available}); the learning rate follows the global batch "
            f"unless the config fixes lr_batch_size"
        )
    fixes = ["--trainer.accelerator cpu", "--trainer.devices 1"]
    if str(trainer_cfg.get("precision")) not in ("32", "32-true", "None"):
        fixes.append("--trainer.precision 32")
    strategy = trainer_cfg.get("strategy")
    if not (strategy is None or strategy == "auto"):
        fixes.append("--trainer.strategy auto")
    if trainer_cfg.get("sync_batchnorm"):
        fixes.append("--trainer.sync_batchnorm false")
    if (trainer_cfg.get("num_nodes") or 1) > 1:
        fixes.append("--trainer.num_nodes 1")
    small = cpu_sized_configs(configs[0]) if configs else []
    method = next((Path(c).parent.name for c in small if Path(c).name == "demo.yaml"), None)
    hint = (f"; CPU-sized configs: {', '.join(small)}" + (f" (make pretrain METHOD={method})" if method else "")
            if small else "; the demo and CPU recipes experiments/<method>/demo.yaml, cpu.yaml are CPU-sized")
    raise ConfigError(
        f"{source} asks for GPUs ({asked}) but this machine has none (torch.cuda.is_available() is False). "
        f"To run it here anyway, on the CPU (slowly, at paper scale): add {' '.join(fixes)} "
        f"(make: ARGS='{' '.join(fixes)}'){hint}"
    )


def check_data_root(data_cfg: Any) -> None:
    """A dataset root that is missing or empty fails before anything is built, naming the key and the layout
    the data module reads. Roots that are not local paths (URLs, shard patterns) are the data module's to check."""
    global _data_root
    from ssl_zoo.data.datamodule import PretrainDataModule

    _data_root = None
    if not hasattr(data_cfg, "get") or not isinstance(data_cfg.get("class_path"), str):  # a jsonargparse Namespace
        return
    init_args = data_cfg.get("init_args")
    root = init_args.get("root") if hasattr(init_args, "get") else None
    if not isinstance(root, str) or re.match(r"^\w+://", root) or any(c in root for c in "*?{["):
        return
    try:
        cls = pydoc.locate(data_cfg["class_path"])
    except Exception:
        return
    if not (isinstance(cls, type) and issubclass(cls, PretrainDataModule)):
        return
    summary = (inspect.getdoc(cls) or "").splitlines()[0].rstrip(".").replace("``", "")
    reads = f"{cls.__name__} reads {summary}"
    _data_root = (root, reads)
    todo = ("run `make demo-data` to generate the built-in demo dataset" if "demo" in root
            else "set --data.init_args.root to the dataset's directory")
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"data.root: dataset root '{root}' does not exist ({todo}; {reads})")
    if not path.is_dir():
        raise NotADirectoryError(f"data.root: dataset root '{root}' is a file, not a directory ({reads})")
    if not any(path.iterdir()):
        raise FileNotFoundError(f"data.root: dataset root '{root}' is an empty directory ({todo}; {reads})")


