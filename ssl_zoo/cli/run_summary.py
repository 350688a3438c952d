"""The summary printed when a command-line run ends: where everything went and what to run next.

``python -m ssl_zoo fit|validate|test`` (so ``make pretrain`` and every evaluation job) ends with::

    ── run summary ─────────────────────────────────────────
    run directory  runs/mvp/20260101-120000
    last           runs/mvp/20260101-120000/checkpoints/last.ckpt
    best           runs/mvp/20260101-120000/checkpoints/best-epoch001.ckpt (train/loss_epoch -0.4132)
    metrics        train/loss_epoch -0.4132, val/knn_top1 31.2
    files          config.yaml, metrics.csv, curves.png
    next           make linear CKPT=runs/mvp/20260101-120000/checkpoints/last.ckpt
                   make gamp CKPT=runs/mvp/20260101-120000/checkpoints/last.ckpt
                   ... (knn, finetune, detect, segment)

A ``fit`` that ``trainer.max_time`` (the CPU recipes' 10-minute guard) stopped before its last epoch adds a
``stopped`` line saying so: on a slow or shared machine such a run trained fewer steps than its config.

A pre-training run suggests evaluating its ``last.ckpt``; an evaluation job (any module with a ``ckpt``
hyper-parameter) names the checkpoint it evaluated, the ``eval.json`` its result went to, and the other
evaluations of that checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["EVAL_TARGETS", "format_run_summary", "next_commands", "stopped_by_time_limit"]

#: ``make`` evaluation and transfer targets and the ``protocol`` of the module each runs (``ssl_zoo.eval``,
#: ``ssl_zoo.transfer``).
EVAL_TARGETS: dict[str, str] = {"linear": "linear", "gamp": "multilabel_linear", "knn": "knn",
                                "finetune": "finetune", "detect": "detection", "segment": "segmentation"}
#: Run files worth pointing at, when they exist.
RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "eval.json", "bad_samples.txt")
MAX_METRICS = 12


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (what ``make`` is run from)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _number(value: Any) -> float | None:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def _format_metrics(metrics: Mapping[str, Any]) -> str:
    """``name value`` pairs, epoch aggregates rather than their last step, at most ``MAX_METRICS``."""
    shown = []
    for name in sorted(metrics):
        if name.endswith("_step") and f"{name[:-5]}_epoch" in metrics:
            continue
        value = _number(metrics[name])
        if value is not None:
            shown.append(f"{name} {value:.4g}")
    more = f", ... ({len(shown) - MAX_METRICS} more in metrics.csv)" if len(shown) > MAX_METRICS else ""
    return ", ".join(shown[:MAX_METRICS]) + more


def next_commands(ckpt: str, done: str | None = None) -> list[str]:
    """The ``make`` evaluation and transfer jobs of ``ckpt``, leaving out the protocol ``done`` just ran."""
    return [f"make {target} CKPT={ckpt}" for target, protocol in EVAL_TARGETS.items() if protocol != done]


def stopped_by_time_limit(trainer: Any) -> str | None:
    """Why a ``fit`` ended early, when ``trainer.max_time`` stopped it before ``max_epochs``: the run trained fewer
    steps than its config and its lr schedule was cut short, which a loss curve alone does not show."""
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.trainer.states import RunningStage

    from ssl_zoo.utils.loop_progress import lightning_private_batches_done, lightning_private_epochs_started

    timer = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer)), None)
    remaining = timer.time_remaining(RunningStage.TRAINING) if timer is not None else None
    if remaining is None or remaining > 0:
        return None
    # Lightning counts the epoch that the time limit cut short as completed (``current_epoch`` is one past
    # it), so the epoch reached and its share of batches come from the fit loop's progress counters.
    epoch = lightning_private_epochs_started(trainer)  # 1-based: the epoch being trained when the time ran out
    batches_done = lightning_private_batches_done(trainer)
    batches = trainer.num_training_batches
    whole = math.isfinite(batches)  # inf for an iterable dataset without a length
    max_epochs = trainer.max_epochs
    if max_epochs is not None and 0 < max_epochs <= epoch and (not whole or batches_done >= batches):
        return None  # the schedule had ended when the time ran out
    elapsed = timedelta(seconds=int(timer.time_elapsed(RunningStage.TRAINING)))
    of = f" of {max_epochs}" if max_epochs and max_epochs > 0 else ""
    share = f", after {batches_done} of its {int(batches)} batches" if whole else ""
    return (f"by trainer.max_time after {elapsed}, in epoch {epoch}{of}{share} (step {trainer.global_step}): "
            "the schedule did not finish")


def format_run_summary(trainer: Any, model: Any, subcommand: str) -> str:
    """The summary of a finished ``trainer.<subcommand>`` run of ``model`` (see the module docstring)."""
    run_dir = Path(trainer.default_root_dir)
    rows: list[tuple[str, str]] = [("run directory", _shown(run_dir))]
    if trainer.fast_dev_run:
        rows.append(("note", "fast_dev_run: a debug run, nothing was saved"))

    stopped = stopped_by_time_limit(trainer) if subcommand == "fit" else None
    if stopped:
        rows.append(("stopped", stopped))

    last = run_dir / "checkpoints" / "last.ckpt"
    if subcommand == "fit" and last.is_file():
        rows.append(("last", _shown(last)))
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        best = getattr(callback, "best_model_path", "")
        if best and Path(best).is_file() and Path(best) != last:
            score = _number(getattr(callback, "best_model_score", None))
            monitor = getattr(callback, "monitor", None)
            rows.append(("best", _shown(best) + (f" ({monitor} {score:.4g})" if monitor and score is not None
                                                 else "")))
    metrics = _format_metrics(trainer.callback_metrics)
    if metrics:
        rows.append(("metrics", metrics))

    hparams = getattr(model, "hparams", {}) or {}
    evaluated = hparams.get("ckpt") if isinstance(hparams, Mapping) else None
    if evaluated:  # an evaluation job: its result belongs to the pre-training run of the checkpoint
        from ssl_zoo.eval.results import results_file_for

        rows.append(("evaluated", _shown(evaluated)))
        results = results_file_for(evaluated, run_dir)
        if results.is_file() and not trainer.fast_dev_run:
            rows.append(("results", _shown(results)))
    files = [name for name in RUN_FILES if (run_dir / name).is_file()]
    if files:
        rows.append(("files", ", ".join(files)))

    if evaluated:
        commands = next_commands(_shown(evaluated), getattr(model, "protocol", None))
    elif subcommand == "fit" and last.is_file():
        commands = next_commands(_shown(last))
    else:
        commands = []
    for i, command in enumerate(commands):
        rows.append(("next" if i == 0 else "", command))

    width = max(len(label) for label, _ in rows)
    lines = ["── run summary " + "─" * 48]
    lines += [f"{label:<{width}}  {text}" for label, text in rows]
    return "\n".join(lines)
