"""The command line: ``python -m ssl_zoo {fit,validate,test} --config experiments/<m>/<cfg>.yaml [overrides]``.

LightningCLI: the typed ``__init__`` arguments of the method and the data module are the config schema,
methods and data modules are chosen by ``class_path``, and every key can be overridden on the command line
(``--model.init_args.lam 2``) or by a wandb sweep. On top of Lightning's defaults this CLI

* fixes the seed (``seed_everything: 0``) unless the config says otherwise;
* puts each run in ``runs/<name>/<YYYYmmdd-HHMMSS>/`` (``name`` is a top-level config key) holding the
  resolved ``config.yaml``, ``checkpoints/last.ckpt`` + the best checkpoint, ``metrics.csv`` and wandb files;
* logs to CSV and to wandb, offline when no API key is configured (``WANDB_MODE=disabled`` turns wandb off);
* shows throughput (images/s) in the progress bar.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ssl_zoo.utils.callbacks import ThroughputMonitor


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


class SSLZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str, default="run",
                            help="method/run name: runs go to <run_root>/<name>/<date-time>/")
        parser.add_argument("--run_root", type=str, default="runs", help="parent of all run directories")
        parser.add_argument("--wandb_project", type=str, default="ssl_zoo")

    def _run_dir(self) -> str:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("default_root_dir"):
            return str(trainer_cfg["default_root_dir"])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return os.path.join(cfg["run_root"], cfg["name"], stamp)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        cfg["trainer"]["default_root_dir"] = self._run_dir()
        self.run_dir = cfg["trainer"]["default_root_dir"]

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("logger") in (None, True) and not trainer_cfg.get("fast_dev_run"):
            kwargs["logger"] = default_loggers(self.run_dir, cfg["name"], cfg["wandb_project"])
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(
                ModelCheckpoint(dirpath=os.path.join(self.run_dir, "checkpoints"), save_last=True,
                                monitor="train/loss_epoch", mode="min", save_top_k=1,
                                filename="best-epoch{epoch:03d}", auto_insert_metric_name=False)
            )
        if not any(isinstance(c, ThroughputMonitor) for c in callbacks):
            callbacks.append(ThroughputMonitor())
        trainer_cfg["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None, run: bool = True) -> SSLZooCLI:
    return SSLZooCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
