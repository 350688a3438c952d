"""The command line: ``python -m ssl_zoo {fit,validate,test} --config experiments/<m>/<cfg>.yaml [overrides]``.

LightningCLI: the typed ``__init__`` arguments of the method and the data module are the config schema,
methods and data modules are chosen by ``class_path``, and every key can be overridden on the command line
(``--model.init_args.lam 2``) or by a wandb sweep. On top of Lightning's defaults this CLI

* fixes the seed (``seed_everything: 0``) unless the config says otherwise;
* puts each run in ``runs/<name>/<YYYYmmdd-HHMMSS>/`` (``name`` is a top-level config key) holding the
  resolved ``config.yaml``, ``checkpoints/last.ckpt`` + the best checkpoint, ``metrics.csv`` and wandb files;
* logs to CSV and to wandb, offline when no API key is configured (``WANDB_MODE=disabled`` turns wandb off);
* shows throughput (images/s) in the progress bar;
* on a CPU, sets the intra-op threads of each training process to the config's ``cpu_threads``
  (:func:`apply_cpu_threads`; the ResNet and HVP-MTL CPU recipes set 1; a user's ``OMP_NUM_THREADS`` wins);
* writes ``checkpoints/last.ckpt`` atomically every ``checkpoint_every_n_steps`` steps and at epoch ends, with
  everything an exact resume needs (RNG states, the sampler position); ``--resume`` continues the newest run
  of the config's ``name`` in its own directory;
* stops on a NaN/Inf loss term, saving ``checkpoints/last-good.ckpt`` (``--nonfinite_loss skip`` skips the step);
* under ``data.on_bad_sample: skip``, logs ``data/skipped_epoch`` and lists the unreadable images in
  ``<run_dir>/bad_samples.txt``;
* ends with a run summary: run directory, last and best checkpoints, final metrics and the next commands
  (:mod:`ssl_zoo.utils.run_summary`).

Mistakes end in one message, not a traceback. :func:`run` (``python -m ssl_zoo``) reports any user error
(a bad option or value, a missing file or dataset, a checkpoint that is not one, a GPU config on a machine
without GPUs, ...) as ``error: <what is wrong, the key or file at fault, what to do>`` and exit status 2;
``SSL_ZOO_DEBUG=1`` shows the traceback instead. :func:`main` raises, for use from Python and tests.
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
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ssl_zoo.plot import CurvesPlot
from ssl_zoo.utils.bad_samples import BadSampleMonitor
from ssl_zoo.utils.callbacks import NonFiniteGuard, NonFiniteLossError, ThroughputMonitor
from ssl_zoo.utils.checkpointing import (
    AtomicCheckpointIO,
    LastCheckpoint,
    RNGStateCheckpoint,
    find_resume_checkpoint,
    keep_previous_metrics,
)
from ssl_zoo.utils.run_summary import format_run_summary
from ssl_zoo.utils.signatures import init_parameters

#: Environment variable fixing the run directory's stamp (set by the launchers, inherited by DDP workers).
RUN_STAMP_ENV = "SSL_ZOO_RUN_STAMP"
#: Environment variable: ``1`` shows the traceback of a failed command instead of the one-line message.
DEBUG_ENV = "SSL_ZOO_DEBUG"
#: Exit status of a command stopped by a user error (argparse's, for bad command lines).
USER_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A configuration that cannot run as given; the message says what to change."""


def debug_mode() -> bool:
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
    accessor. ``test_cli_errors.py`` (a misspelt ``--trainer`` option and a bad key named with its config file)
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
def _device_count(devices: Any) -> int | None:
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
    requested = _device_count(devices)
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


def apply_cpu_threads(threads: int, trainer_cfg: Mapping[str, Any]) -> bool:
    """``cpu_threads``: on a CPU run, set torch's intra-op threads per training process (0: leave torch's
    default, one per core). Returns whether it changed anything.

    One thread per core in the training process, beside DataLoader workers on the same cores, is more threads
    than cores; for the small, overhead-bound steps of the ResNet CPU recipes (32 px, quarter-width ResNet-18)
    a step whose OpenMP barrier waits for a descheduled thread then runs up to 1.9x slower, while the
    compute-bound demo steps (full ResNet-18 at 48-64 px) and the ViT/4 recipes gain from the second thread
    (benchmarks/RESULTS.md, "Threads of a CPU run"). GPU runs and a user's ``OMP_NUM_THREADS`` are left alone;
    the processes a multi-process CPU run spawns inherit the count through ``OMP_NUM_THREADS``.
    """
    if threads < 0:
        raise ConfigError(f"cpu_threads: must be >= 0 (0: torch's default, one per core), got {threads}")
    if threads == 0 or os.environ.get("OMP_NUM_THREADS"):
        return False
    import torch

    accelerator = str(trainer_cfg.get("accelerator") or "auto").lower()
    if accelerator != "cpu" and not (accelerator == "auto" and not torch.cuda.is_available()):
        return False
    torch.set_num_threads(threads)
    if (_device_count(trainer_cfg.get("devices")) or 1) > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return True


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


def wandb_mode() -> str:
    """``online`` with an API key, ``offline`` without one, ``disabled`` when asked (``WANDB_MODE``)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("disabled", "offline", "online", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:  # a key stored by `wandb login`
        netrc = Path.home() / ".netrc"
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
            return "online"
    except OSError:
        pass
    return "offline"


def default_loggers(run_dir: str, name: str, project: str = "ssl_zoo") -> list:
    """CSV logger in the run directory, plus wandb (offline without a key; never a crash without network)."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=run_dir, name="", version="")]
    mode = wandb_mode()
    if mode == "disabled":
        return loggers
    try:
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(project=project, name=f"{name}-{Path(run_dir).name}", save_dir=run_dir,
                        offline=mode == "offline", settings={"init_timeout": 60})
        )
    except Exception as err:  # wandb missing or broken: the run goes on with the CSV log
        warnings.warn(f"wandb logging disabled ({type(err).__name__}: {err}); metrics go to CSV only", stacklevel=2)
    return loggers


def apply_resume(cfg) -> None:
    """``--resume``: set ``ckpt_path`` and ``trainer.default_root_dir`` of the fit config to the run to continue.

    With ``trainer.default_root_dir`` given, that run; else the run pinned by ``SSL_ZOO_RUN_STAMP`` (the
    launchers set it), else the newest ``<run_root>/<name>/*/checkpoints/last.ckpt``. ``resume: auto`` starts
    a new run when there is none; ``resume: true`` stops with an error naming where it looked.
    """
    if cfg.get("ckpt_path"):
        raise ValueError(f"give either --resume or --ckpt_path, not both (ckpt_path={cfg['ckpt_path']})")
    root_dir = cfg["trainer"].get("default_root_dir")
    if root_dir:  # an explicit run directory: continue that one
        ckpt = Path(root_dir) / "checkpoints" / "last.ckpt"
        ckpt = ckpt if ckpt.is_file() else None
        where = str(Path(root_dir) / "checkpoints" / "last.ckpt")
    else:
        pinned = os.environ.get(RUN_STAMP_ENV)
        ckpt = find_resume_checkpoint(cfg["run_root"], cfg["name"], stamp=pinned)
        where = os.path.join(cfg["run_root"], cfg["name"], pinned or "*", "checkpoints", "last.ckpt")
    if ckpt is None:
        if cfg["resume"] == "auto":
            return
        raise FileNotFoundError(
            f"--resume: no checkpoint {where} for run name '{cfg['name']}'; start the run without "
            "RESUME=1 / --resume first (or give --ckpt_path)"
        )
    cfg["ckpt_path"] = str(ckpt)
    cfg["trainer"]["default_root_dir"] = str(ckpt.parent.parent)


class SSLZooCLI(LightningCLI):
    def __init__(self, *args, apply_threads: bool = True, **kwargs) -> None:
        self.apply_threads = apply_threads  # cpu_threads; off when the caller runs the trainer itself
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # The parsers name the config files and where a bad key was given in their error messages.
        command_line = [] if isinstance(args, Mapping) else [str(a) for a in (sys.argv[1:] if args is None else args)]
        for each in (parser, *argparse_private_subparsers(parser)):
            each.command_line = command_line
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str, default="run",
                            help="method/run name: runs go to <run_root>/<name>/<date-time>/")
        parser.add_argument("--run_root", type=str, default="runs", help="parent of all run directories")
        parser.add_argument("--wandb_project", type=str, default="ssl_zoo")
        parser.add_argument("--resume", type=bool | Literal["auto"], default=False,
                            help="continue the newest run of this name (<run_root>/<name>/*/checkpoints/last.ckpt) "
                                 "in its own directory; 'auto': resume if there is one, else start a new run")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=1000,
                            help="write checkpoints/last.ckpt every N optimiser steps (and at every epoch end); "
                                 "0: at epoch ends only")
        parser.add_argument("--cpu_threads", type=int, default=0,
                            help="intra-op threads of each training process on a CPU (0: torch's default, one per "
                                 "core; the ResNet and HVP-MTL CPU recipes set 1); OMP_NUM_THREADS "
                                 "in the environment wins")
        parser.add_argument("--nonfinite_loss", type=Literal["stop", "skip", "off"], default="stop",
                            help="on a NaN/Inf loss term: stop and save checkpoints/last-good.ckpt, skip the "
                                 "optimiser step (counted in train/nonfinite_skips), or do not check")

    def _run_dir(self) -> str:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("default_root_dir"):
            return str(trainer_cfg["default_root_dir"])
        # Launchers pin the stamp so that every process of a multi-process run picks the same directory.
        stamp = os.environ.get(RUN_STAMP_ENV) or time.strftime("%Y%m%d-%H%M%S")
        several = trainer_cfg.get("devices") not in (1, "1") or (trainer_cfg.get("num_nodes") or 1) > 1
        if self.subcommand and several:
            os.environ[RUN_STAMP_ENV] = stamp  # the processes Lightning starts for the other devices inherit it
        return os.path.join(cfg["run_root"], cfg["name"], stamp)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        check_accelerator(cfg["trainer"], [str(c) for c in (cfg.get("config") or [])])
        if self.subcommand:  # a run, not a parse: the data must be there
            check_data_root(cfg.get("data"))
        if self.subcommand == "fit" and cfg.get("resume"):
            apply_resume(cfg)
        cfg["trainer"]["default_root_dir"] = self._run_dir()
        self.run_dir = cfg["trainer"]["default_root_dir"]

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("logger") in (None, True) and not trainer_cfg.get("fast_dev_run"):
            keep_previous_metrics(self.run_dir)  # a resumed run: Lightning's CSVLogger would delete them
            kwargs["logger"] = default_loggers(self.run_dir, cfg["name"], cfg["wandb_project"])
        callbacks = list(trainer_cfg.get("callbacks") or [])
        checkpoint_dir = os.path.join(self.run_dir, "checkpoints")
        checkpointing = trainer_cfg.get("enable_checkpointing") is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(  # last.ckpt comes from LastCheckpoint, written between steps
                ModelCheckpoint(dirpath=checkpoint_dir, save_last=False,
                                monitor="train/loss_epoch", mode="min", save_top_k=1,
                                filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)
            )
        # Exact resume: last.ckpt every N steps and at epoch ends, RNG states, written atomically.
        if checkpointing and not any(isinstance(c, LastCheckpoint) for c in callbacks):
            callbacks.append(LastCheckpoint(checkpoint_dir, every_n_train_steps=cfg.get("checkpoint_every_n_steps",
                                                                                         1000)))
        if not any(isinstance(c, RNGStateCheckpoint) for c in callbacks):
            callbacks.append(RNGStateCheckpoint())
        if cfg.get("nonfinite_loss", "stop") != "off" and not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard(action=cfg.get("nonfinite_loss", "stop")))
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            trainer_cfg["plugins"] = [*plugins, AtomicCheckpointIO()]
        if not any(isinstance(c, ThroughputMonitor) for c in callbacks):
            callbacks.append(ThroughputMonitor())
        if not any(isinstance(c, BadSampleMonitor) for c in callbacks):
            callbacks.append(BadSampleMonitor())  # data/skipped_epoch and <run_dir>/bad_samples.txt
        if not any(isinstance(c, CurvesPlot) for c in callbacks):
            callbacks.append(CurvesPlot())  # <run_dir>/curves.png: every logged loss and monitor metric vs step
        trainer_cfg["callbacks"] = callbacks
        if self.apply_threads:
            apply_cpu_threads(cfg.get("cpu_threads", 0), trainer_cfg)
        return super().instantiate_trainer(**kwargs)

    # The run summary after each subcommand (LightningCLI calls after_<subcommand> once it returns).
    def _print_summary(self, subcommand: str) -> None:
        if self.trainer.is_global_zero:
            print(format_run_summary(self.trainer, self.model, subcommand), flush=True)

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def after_test(self) -> None:
        self._print_summary("test")


def main(args: list[str] | None = None, run: bool = True) -> SSLZooCLI:
    # Lightning warns on every mid-epoch resume that the dataloader is not resumable; ssl_zoo's data modules
    # are (ssl_zoo.data.sampler.ResumableSampler restores the position, tests/test_resume.py proves it exact).
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    import torch

    # cpu_threads changes process-wide state: a caller running several jobs in one process gets it back.
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        return _cli(args, run)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _cli(args: list[str] | None, run: bool) -> SSLZooCLI:
    return SSLZooCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        parser_class=SSLZooArgumentParser,
        args=args,
        run=run,
        apply_threads=run,
    )


def run(args: list[str] | None = None) -> int:
    """``python -m ssl_zoo``: :func:`main`, a user error reported as one message with exit status 2.

    Every subcommand and config goes through here, so any job's ``ValueError`` / ``OSError`` with a clear
    message reads the same; anything else (a bug) keeps its traceback. ``SSL_ZOO_DEBUG=1``: the traceback
    of user errors too.
    """
    if debug_mode():
        main(args)
        return 0
    try:
        main(args)
    except Exception as err:
        message = explain_error(err)
        if message is None:
            raise
        sys.stdout.flush()
        sys.stderr.write(f"error: {message} [{DEBUG_ENV}=1 shows the traceback]\n")
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
