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
  (:mod:`ssl_zoo.cli.run_summary`).

Mistakes end in one message, not a traceback. :func:`run` (``python -m ssl_zoo``) reports any user error
(a bad option or value, a missing file or dataset, a checkpoint that is not one, a GPU config on a machine
without GPUs, ...) as ``error: <what is wrong, the key or file at fault, what to do>`` and exit status 2
(the explanations: :mod:`ssl_zoo.cli.errors`); ``SSL_ZOO_DEBUG=1`` shows the traceback instead. :func:`main`
raises, for use from Python and tests.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ssl_zoo.cli.errors import (
    DEBUG_ENV,
    USER_ERROR_EXIT,
    ConfigError,
    SSLZooArgumentParser,
    argparse_private_subparsers,
    check_accelerator,
    check_data_root,
    debug_mode,
    device_count,
    explain_error,
)
from ssl_zoo.cli.plot import CurvesPlot
from ssl_zoo.cli.run_summary import format_run_summary
from ssl_zoo.utils.bad_samples import BadSampleMonitor
from ssl_zoo.utils.callbacks import NonFiniteGuard, ThroughputMonitor
from ssl_zoo.utils.checkpointing import (
    AtomicCheckpointIO,
    LastCheckpoint,
    RNGStateCheckpoint,
    find_resume_checkpoint,
    keep_previous_metrics,
)

#: Environment variable fixing the run directory's stamp (set by the launchers, inherited by DDP workers).
RUN_STAMP_ENV = "SSL_ZOO_RUN_STAMP"


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
    if (device_count(trainer_cfg.get("devices")) or 1) > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return True


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
    # are (ssl_zoo.data.sampler.ResumableSampler restores the position, tests/jobs/test_resume.py proves it exact).
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
