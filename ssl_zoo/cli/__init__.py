"""The command-line tools, on top of everything else in the package.

* :mod:`~ssl_zoo.cli.lightning_cli` -- every job: ``python -m ssl_zoo {fit,validate,test} --config ...``
  (:func:`main`, :func:`run`), with its run directories, loggers, checkpoints and the run summary
  (:mod:`~ssl_zoo.cli.run_summary`); :mod:`~ssl_zoo.cli.errors` turns a user's mistake into one line;
* :mod:`~ssl_zoo.cli.sweep` -- ``python -m ssl_zoo.cli.sweep FILE [--local]``: a wandb sweep file, online or
  here (:mod:`~ssl_zoo.cli.sweep_config` reads and checks the file, :mod:`~ssl_zoo.cli.sweep_local` runs it);
* :mod:`~ssl_zoo.cli.export` -- ``python -m ssl_zoo.cli.export``: a backbone for timm, torchvision or detectron2;
* :mod:`~ssl_zoo.cli.viz` -- ``python -m ssl_zoo.cli.viz attention``: a ViT's CLS attention maps;
* :mod:`~ssl_zoo.cli.plot` -- ``python -m ssl_zoo.cli.plot RUN_DIR ...``: logged curves of one run or several.

The paper tables (``python -m ssl_zoo.tables``) and checkpoint conversion (``python -m ssl_zoo.checkpoints.convert``)
live with what they read.
"""

__all__ = ["main", "run"]


def __getattr__(name: str):
    # The entry point is imported on first use: `python -m ssl_zoo.cli.plot` (a module the entry point imports)
    # then runs once, as __main__, rather than once on import of this package and again as __main__.
    if name in __all__:
        from ssl_zoo.cli import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'ssl_zoo.cli' has no attribute {name!r}")
