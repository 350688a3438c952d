"""Evaluation: metrics, pooling, kNN, linear probes and fine-tuning (checkpoints load through
:mod:`ssl_zoo.checkpoints`).

Protocols are LightningModules run with the pre-training data modules and CLI::

    python -m ssl_zoo fit --config experiments/eval/gamp_demo.yaml --model.init_args.ckpt <run>/checkpoints/last.ckpt

and append their final metrics to ``eval.json`` in the pre-training run directory.
"""

from ssl_zoo.eval.features import embed, extract_features
from ssl_zoo.eval.final_probe import FinalKNNProbe
from ssl_zoo.eval.finetune import FineTune
from ssl_zoo.eval.knn import KNNMonitor, KNNProbe, knn_evaluate, knn_predict
from ssl_zoo.eval.linear import LinearProbe, MultiLabelLinearProbe
from ssl_zoo.eval.metrics import average_precision, multilabel_metrics
from ssl_zoo.eval.pooling import FeaturePooling, gamp, gap, gmp, pool_map
from ssl_zoo.eval.results import append_eval_record, read_eval_records, results_file_for
from ssl_zoo.utils.optim import LARS

__all__ = [
    "LARS",
    "FeaturePooling",
    "FinalKNNProbe",
    "FineTune",
    "KNNMonitor",
    "KNNProbe",
    "LinearProbe",
    "MultiLabelLinearProbe",
    "append_eval_record",
    "average_precision",
    "embed",
    "extract_features",
    "gamp",
    "gap",
    "gmp",
    "knn_evaluate",
    "knn_predict",
    "multilabel_metrics",
    "pool_map",
    "read_eval_records",
    "results_file_for",
]
