"""The end-of-run probe: one weighted kNN vote on the pre-trained backbone when ``fit`` ends.

This is the number a hyperparameter sweep optimises (``experiments/sweeps/``): a pre-training run cannot be
compared by its own loss across loss weights (changing lambda changes the loss), but the quality of its
frozen features can. Add it to any pre-training run from the command line, as the sweep files do::

    python -m ssl_zoo fit --config experiments/mvp/demo.yaml --trainer.callbacks+=ssl_zoo.eval.FinalKNNProbe

The vote is :func:`~ssl_zoo.eval.knn.knn_predict` (InstDisc §3.4, DINO §4.1) on the data module's labelled
splits; the metrics are those of :class:`~ssl_zoo.eval.knn.KNNProbe`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ssl_zoo.eval.features import FeaturePoolingName, check_pooling
from ssl_zoo.eval.knn import check_knn_args, knn_vote_on_splits
from ssl_zoo.eval.results import RESULTS_FILE, append_eval_record, make_eval_record

__all__ = ["FinalKNNProbe", "METRIC_PREFIX"]

#: Logged names are ``probe/knn_<metric>``: ``top1``/``top5`` on single-label data, ``mAP``, ``CP`` ...
#: ``OF1`` (:func:`~ssl_zoo.eval.metrics.multilabel_metrics`) on multi-label data.
METRIC_PREFIX = "probe/knn_"


class FinalKNNProbe(Callback):
    """Weighted kNN accuracy of ``pl_module.backbone``, once, when training ends (``on_train_end``).

    The training split (deterministic evaluation transform) is the bank and the validation split votes, both
    through the data module's ``labelled_dataset``. The metrics go to every logger of the trainer under
    ``probe/knn_<metric>`` (the CSV log and the wandb run, whose summary keeps the value a sweep reads), into
    ``trainer.callback_metrics``, and as a record of ``eval.json`` in the run directory. Runs on global rank 0
    only, on detached features under ``torch.no_grad``. Without labelled splits or labels it warns and logs
    nothing. Under ``fast_dev_run`` it uses one batch of each split and writes no ``eval.json``.

    Args:
        k, temperature: vote parameters (DINO's 20 and 0.07).
        pooling: feature pooling (see :func:`~ssl_zoo.eval.features.embed`).
        img_size: evaluation resolution; ``None`` = the method's ``img_size`` hyperparameter (a ViT built for
            one size cannot take another), else the data module's ``eval_size``.
        max_train_samples, max_val_samples: caps on the bank and the queries (evenly spaced subsets), so that
            at ImageNet scale the probe costs minutes, not an epoch; ``None`` = the whole split.
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        pooling: FeaturePoolingName = "backbone",
        img_size: int | None = None,
        max_train_samples: int | None = 50000,
        max_val_samples: int | None = 10000,
    ) -> None:
        check_knn_args(k, temperature)
        for name, cap in (("max_train_samples", max_train_samples), ("max_val_samples", max_val_samples)):
            if cap is not None and cap < 1:
                raise ValueError(f"FinalKNNProbe: {name} must be >= 1 or None, got {cap}")
        check_pooling(pooling, "FinalKNNProbe.pooling")
        self.k = k
        self.temperature = temperature
        self.pooling = pooling
        self.img_size = img_size
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples

    def _eval_size(self, pl_module: LightningModule, datamodule) -> int:
        if self.img_size is not None:
            return self.img_size
        return int(pl_module.hparams.get("img_size") or getattr(datamodule, "eval_size", 224))

    @torch.no_grad()
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        backbone = getattr(pl_module, "backbone", None)
        if datamodule is None or not hasattr(datamodule, "labelled_dataset") or backbone is None:
            warnings.warn("FinalKNNProbe skipped: it needs an ssl_zoo data module (labelled_dataset) and a "
                          "LightningModule with a .backbone", stacklevel=2)
            return
        start = time.perf_counter()
        size = self._eval_size(pl_module, datamodule)
        train_cap, val_cap = self.max_train_samples, self.max_val_samples
        if trainer.fast_dev_run:
            train_cap = val_cap = datamodule.batch_size
        vote = knn_vote_on_splits(backbone, datamodule, size, self.k, self.temperature, self.pooling, train_cap,
                                  val_cap, feature_context=trainer.precision_plugin.forward_context())
        if vote is None:
            warnings.warn("FinalKNNProbe skipped: the training split has no labels", stacklevel=2)
            return
        metrics, bank_size, num_queries = vote

        logged = {f"{METRIC_PREFIX}{name}": float(value) for name, value in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in logged.items()})
        summary = ", ".join(f"{name} {value:.2f}" for name, value in metrics.items())
        rank_zero_info(f"kNN probe at the end of training ({bank_size} bank, {num_queries} queries, "
                       f"{size} px, {time.perf_counter() - start:.1f} s): {summary}")
        if trainer.fast_dev_run or not trainer.default_root_dir:
            return
        run_dir = Path(trainer.default_root_dir)
        settings = {"k": self.k, "temperature": self.temperature, "pooling": self.pooling, "img_size": size,
                    "bank_size": bank_size, "num_queries": num_queries}
        append_eval_record(run_dir / RESULTS_FILE, make_eval_record(
            None, "knn_end_of_pretraining", metrics, settings, epoch=trainer.current_epoch,
            pretraining={"method": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                         "run_dir": str(run_dir.resolve())}))
