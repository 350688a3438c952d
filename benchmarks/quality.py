"""Does every method learn on a CPU? Each CPU recipe against random init and a supervised ceiling, over seeds.

``make bench-quality`` = ``python -m benchmarks.quality``::

    python -m benchmarks.quality [--root data/demo] [--methods bam_ia simsiam ...] [--seeds 0 1 2]
                                 [--out benchmarks/results/quality.json] [--work benchmarks/runs/quality]

For every seed and method: pre-train with ``experiments/<method>/cpu.yaml`` (``python -m ssl_zoo fit``, the wall
time of the whole command is ``pretrain_s``), then score the frozen student backbone with three probes:

* ``knn_top1``: weighted kNN (k 20, T 0.07; :func:`~ssl_zoo.eval.knn.knn_predict`) on the single-label view,
  training split as the bank;
* ``linear_top1``: :class:`~ssl_zoo.eval.LinearProbe` (non-affine BN + linear, 10 epochs on the cached frozen
  features, ``experiments/eval/linear_demo.yaml``'s settings) on the single-label view;
* ``gamp_mAP``: :class:`~ssl_zoo.eval.MultiLabelLinearProbe` on GAMP-pooled features
  (``experiments/eval/gamp_demo.yaml``'s settings) on the multi-label (COCO) view.

The same probes score, per architecture and seed, a randomly initialised backbone (``backbone: random``) and a
network of the same architecture trained on the labels for about the same compute
(``experiments/eval/supervised_cpu.yaml``, ``backbone: supervised``, the ceiling). MVP needs a teacher with
signal, exported as a timm state dict and loaded through ``teacher: timm`` (``--mvp-teacher``): by default the
same seed's supervised ViT (the ViT ceiling, trained first when needed), a teacher that knows the classes as
CLIP knows them from captions; ``--mvp-teacher mocov3`` takes the same seed's MoCo v3 run on MVP's ViT instead
(``experiments/mocov3/cpu_vit.yaml``, trained as the teacher and not reported: the uni-modal guidance of MVP's
Table 5; the ``mocov3`` rows are the MoCo v3 CPU recipe's, a ResNet).

Peers (``--peers``, on by default): for each method lightly implements (MoCo v2, SimSiam; :mod:`benchmarks.peers`),
lightly's own training step on the same recipe -- backbone, views, batch, schedule, optimizer, time guard, data --
trained and probed exactly as ours into ``<work>/peer_lightly/<method>/seedN``: rows ``backbone: peer_lightly``,
a ``<method> (lightly)`` line under the method's in the table, a second table of ours against lightly's, and its
curve on the method's figure. They tell a method that does not learn from an implementation that does not.
``--peers-only`` trains the peers (and the baselines) alone; ``--report --merge`` with an earlier ``quality.json``
then sets our rows from that file beside them.

``--baselines-only`` trains and probes only random init and the supervised ceiling of each recipe's architecture:
on a new dataset (e.g. ``benchmarks/photo_digits.py``'s), whether the labels can be learnt at the recipes'
resolution at all, before hours of pre-training; :mod:`benchmarks.quality_misses` then tells, for any backbone the
benchmark trained, whether its nearest neighbours share the object or the background.

``--root`` takes the demo layout (``folder/``, COCO ``annotations/``, ``tencent/`` lists), a plain image folder
(``train/<class>/``, ``val/<class>/``: single-label probes only, BAM/SimSiam pre-train on it through
``ImageFolderDataModule``, HVP-MTL is skipped as it needs multi-label targets) or a COCO-format root
(``annotations/instances_{train,val}2017.json``: GAMP only, HVP-MTL reads it through ``CocoDataModule``).

``quality.json`` holds ``{"rows": [{"method", "probe", "backbone", "mean", "std", "values", "pretrain_s"}],
"machine": {...}, "curves": {...}}``, rewritten after every stage (an interrupted run keeps what it measured and
a new one skips the pre-training runs that finished). ``--table`` prints the Markdown table, ``--figures DIR``
draws one PNG per method: the kNN monitor of its pre-training runs and of its peer's (``val/knn_top1`` or
``val/knn_mAP``, mean and range over seeds) against the step, with random init and the supervised network as
horizontal lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.quality_report import (  # noqa: F401 (PROBES, MIN_SEEDS: the benchmark's public names)
    MIN_SEEDS,
    PROBES,
    build_rows,
    draw_figures,
    markdown_table,
    merge_report,
    peer_comparison,
    verdicts,
)
from benchmarks.recipes import (
    METHODS,
    PEER,
    PEERS,
    ROOT,
    DataViews,
    architecture,
    architecture_key,
    data_overrides,
    find_views,
    peer_config,
    recipe,
)

#: MVP's guidance on a machine without CLIP weights (``--mvp-teacher``), a run of the same seed exported to timm:
#: ``supervised``: the supervised ViT ceiling of MVP's architecture. CLIP's tower carries what captions taught it
#: about the objects; on the demo the labels are the only such knowledge, so a label-trained teacher plays its part.
#: ``mocov3``: a MoCo v3 run on MVP's ViT (:data:`MOCOV3_VIT_CONFIG`), a self-supervised teacher (the uni-modal
#: guidance of MVP's Table 5).
MVP_TEACHERS = ("supervised", "mocov3")
#: MoCo v3 on the ViT of the MVP and HVP-MTL recipes (MoCo v3's own CPU recipe is a ResNet): MVP's teacher under
#: ``--mvp-teacher mocov3``, trained into ``<work>/mocov3_vit/seedN``.
MOCOV3_VIT_CONFIG = "experiments/mocov3/cpu_vit.yaml"
SUPERVISED_CONFIG = "experiments/eval/supervised_cpu.yaml"
#: Default ``--work``: run directories and resumable state.
WORK = "benchmarks/runs/quality"
# Probe settings of experiments/eval/{linear,gamp,knn}_demo.yaml.
KNN_K, KNN_T = 20, 0.07
PROBE_EPOCHS, PROBE_BATCH = 10, 64


# ---------------------------------------------------------------------------------------------- runs
def child_env() -> dict[str, str]:
    """The environment of every run: one OpenMP thread per process unless the caller chose otherwise.

    On a small shared machine torch's default (one thread per core) in several processes at once -- the
    run, its loader workers, other jobs -- oversubscribes the cores, and a contended OpenMP barrier makes a step
    5-30x slower than one thread per process (measured in RESULTS.md).
    """
    return {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}


def run_command(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd`` from the repository root with its output in ``log``, in ``env`` (default :func:`child_env`).

    Returns its wall time and the CPU time (user + system) of the command and its loader workers, in seconds:
    on a machine shared with other jobs the wall time grows with their load, the CPU time much less.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env or child_env())
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"command failed ({done.returncode}), log {log}:\n{tail}")
    return seconds, cpu


#: Label files hashed byte for byte by :func:`data_fingerprint` (images are fingerprinted by name and size).
_LABEL_SUFFIXES = (".json", ".txt", ".csv")


def data_fingerprint(root: str | os.PathLike) -> str:
    """SHA-256 of a data root as a run reads it: every file's relative path and size, and the bytes of its label
    files (COCO JSON, Tencent lists). Regenerating or editing the data changes it; reading every image's bytes
    would not scale to a real dataset, and a redrawn image of the same name and size is the one change missed."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(f"\0{rel}\0{path.stat().st_size}".encode())
        if path.suffix.lower() in _LABEL_SUFFIXES:
            digest.update(path.read_bytes())
    return digest.hexdigest()


#: What Lightning's Timer callback logs when ``trainer.max_time`` stops a run before its schedule ends.
TIME_LIMIT_MESSAGE = "Time limit reached."


def stopped_at_time_limit(run_dir: str | os.PathLike) -> bool | None:
    """Whether the pre-training run in ``run_dir`` was stopped by its ``trainer.max_time`` guard, read from the
    log the benchmark kept of it (``<run_dir>.log``); None when that log is gone. Such a run trained fewer steps
    than its recipe, its lr schedule cut short: on a slow hour of a shared machine the guard, not the recipe,
    decides what it learnt."""
    log = Path(run_dir).with_name(f"{Path(run_dir).name}.log")
    if not log.is_file():
        return None
    return TIME_LIMIT_MESSAGE in log.read_text(errors="replace")


def recipe_digest(config: str, extra: list[str]) -> str:
    """SHA-256 of what a run was trained from: its config's settings (the parsed YAML: comments, layout and
    ``cpu_threads`` are not the recipe), its overrides, the bytes of every file an override names (MVP's teacher
    checkpoint) and the fingerprint of every data root an override names (:func:`data_fingerprint`). A finished
    run is reused only when this is unchanged."""
    settings = yaml.safe_load((ROOT / config).read_text())
    # How many threads a step uses is speed, not recipe (and child_env's OMP_NUM_THREADS=1 overrides it anyway).
    settings.pop("cpu_threads", None)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for arg, previous in zip(extra, ["", *extra[:-1]], strict=True):
        digest.update(b"\0" + arg.encode())
        path = ROOT / arg
        if arg and os.path.isfile(path):  # False for any override that is not a file, however long (JSON)
            digest.update(path.read_bytes())
        elif previous == "--data.init_args.root" and os.path.isdir(path):
            digest.update(data_fingerprint(path).encode())
    return digest.hexdigest()


def fit(config: str, run_dir: Path, seed: int, extra: list[str]) -> dict:
    """``python -m ssl_zoo fit`` into ``run_dir`` unless a previous benchmark finished it with the same recipe.

    Returns the run's record; ``record["trained"]`` is True when this call trained it. A finished run of an
    edited recipe (:func:`recipe_digest`) is moved aside to ``<run_dir>.stale-<date>`` and trained again, so
    that an edited recipe is never scored with the weights of the former one.
    """
    done = run_dir / "benchmark_run.json"
    digest = recipe_digest(config, extra)
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("recipe_sha256") == digest:
            return {**record, "trained": False}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        stale = next(path for n in range(1000) if not (path := run_dir.with_name(
            f"{run_dir.name}.stale-{stamp}" + (f"-{n}" if n else ""))).exists())
        print(f"{run_dir}: its recipe changed since it was trained ({config}); moved to {stale}", flush=True)
        run_dir.rename(stale)
    cmd = [sys.executable, "-m", "ssl_zoo", "fit", "--config", config, "--seed_everything", str(seed),
           "--trainer.default_root_dir", str(run_dir), *extra]
    seconds, cpu = run_command(cmd, run_dir.parent / f"{run_dir.name}.log")
    load = os.getloadavg()[0]
    record = {"config": config, "seed": seed, "overrides": extra, "seconds": round(seconds, 1),
              "cpu_seconds": round(cpu, 1), "load_average_at_end": round(load, 2),
              "ckpt": str(run_dir / "checkpoints" / "last.ckpt"), "date": time.strftime("%Y-%m-%d %H:%M"),
              "recipe_sha256": digest}
    done.write_text(json.dumps(record, indent=1))
    return {**record, "trained": True}


# ---------------------------------------------------------------------------------------------- probes
def _frozen(backbone):
    backbone.requires_grad_(False)
    return backbone.eval()


def load_student(ckpt: str, arch: dict):
    from ssl_zoo.checkpoints import load_backbone

    return _frozen(load_backbone(ckpt, backbone_kwargs={"img_size": arch["img_size"]}))


def random_backbone(arch: dict, seed: int):
    import torch

    from ssl_zoo.models import Backbone

    torch.manual_seed(seed)
    return _frozen(Backbone(arch["backbone"], **{**arch["backbone_kwargs"], "img_size": arch["img_size"]}))


def _fit_probe(probe, datamodule, work: Path, cache: dict) -> dict[str, float]:
    """Train a linear probe on already extracted frozen features (its own cache, filled here)."""
    from lightning.pytorch import Trainer

    probe._cache = dict(cache)  # LinearProbe computes the cache only for the splits missing from it
    trainer = Trainer(max_epochs=PROBE_EPOCHS, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(work), log_every_n_steps=10)
    trainer.fit(probe, datamodule=datamodule)
    return dict(probe.last_val_metrics)


def probe_backbone(backbone, arch: dict, views: DataViews, seed: int, work: Path) -> dict[str, float]:
    """kNN and linear top-1 on the single-label view, GAMP mAP on the multi-label view (missing views: skipped)."""
    import torch

    from ssl_zoo.data.datamodule import ImageFolderDataModule
    from ssl_zoo.eval import LinearProbe, extract_features, knn_predict
    from ssl_zoo.eval.module import single_label_metrics
    from ssl_zoo.eval.transforms import center_crop_transform

    size = arch["img_size"]
    scores: dict[str, float] = {}
    backbone_args = {"backbone": arch["backbone"], "backbone_kwargs": arch["backbone_kwargs"], "img_size": size}
    if views.folder:
        datamodule = ImageFolderDataModule(root=views.folder, batch_size=PROBE_BATCH, num_workers=0, eval_size=size)
        cache = {}
        for split in ("train", "val"):
            loader = datamodule.labelled_dataloader(split, batch_size=256, transform=center_crop_transform(size))
            cache[split], targets = extract_features(backbone, loader, "backbone")
            cache[f"{split}_targets"] = targets
        val_classes = loader.dataset.classes  # the names of the val targets' indices
        knn = knn_predict(cache["val"], cache["train"], cache["train_targets"], datamodule.num_classes, KNN_K, KNN_T)
        scores["knn_top1"] = single_label_metrics(knn, cache["val_targets"])["top1"]
        datamodule.batch_size = min(PROBE_BATCH, len(cache["train"]))  # a full batch even on tiny data
        torch.manual_seed(seed)
        probe = LinearProbe(**backbone_args, batch_norm=True, cache_features=True)
        probe.backbone = backbone
        scores["linear_top1"] = _fit_probe(probe, datamodule, work / "linear",
                                           {"train": cache["train"], "val": cache["val"]})["top1"]
        write_confusion(probe, cache["val"], cache["val_targets"], val_classes, work / "linear")
    if views.coco:
        scores["gamp_mAP"] = multilabel_probe_map(backbone, arch, views.coco, "gamp", seed, work / "gamp")
    return {k: round(float(v), 2) for k, v in scores.items()}


def write_confusion(probe, features, targets, classes: list[str], work: Path) -> dict:
    """The linear probe's validation confusion matrix (rows: true class, columns: predicted), written to
    ``work/confusion.json`` beside its ``eval.json``: equal top-1 on two seeds is then told apart from the
    same predictions (a probe that ignores its features) by looking at which images each got right."""
    import torch

    probe.eval()
    with torch.no_grad():
        predicted = probe.head(features).argmax(1)
    matrix = torch.zeros(len(classes), len(classes), dtype=torch.long)
    matrix.index_put_((targets.long(), predicted), torch.ones_like(predicted), accumulate=True)
    record = {"classes": list(classes), "matrix": matrix.tolist(), "correct": int(matrix.diagonal().sum()),
              "total": int(matrix.sum()), "predicted_per_class": matrix.sum(0).tolist()}
    work.mkdir(parents=True, exist_ok=True)
    (work / "confusion.json").write_text(json.dumps(record))
    return record


def multilabel_probe_map(backbone, arch: dict, coco_root: str, pooling: str, seed: int, work: Path) -> float:
    """mAP of the multi-label probe (non-affine BN + linear on cached frozen features, the GAMP probe's settings)
    on the COCO-format view, with the features pooled by ``pooling`` (``gamp`` for the benchmark's probe)."""
    import torch

    from ssl_zoo.data.datamodule import CocoDataModule
    from ssl_zoo.eval import MultiLabelLinearProbe, extract_features
    from ssl_zoo.eval.transforms import resize_transform

    size = arch["img_size"]
    datamodule = CocoDataModule(root=coco_root, batch_size=PROBE_BATCH, num_workers=0, eval_size=size)
    cache = {}
    for split in ("train", "val"):
        loader = datamodule.labelled_dataloader(split, batch_size=256, transform=resize_transform(size))
        cache[split], _ = extract_features(backbone, loader, pooling)
    datamodule.batch_size = min(PROBE_BATCH, len(cache["train"]))
    torch.manual_seed(seed)
    probe = MultiLabelLinearProbe(backbone=arch["backbone"], backbone_kwargs=arch["backbone_kwargs"], img_size=size,
                                  batch_norm=True, cache_features=True)
    probe.backbone = backbone
    return _fit_probe(probe, datamodule, work, cache)["mAP"]


def monitor_metric(backbone, method: str, views: DataViews) -> tuple[str, float] | None:
    """The value the recipe's kNN monitor would log for ``backbone`` (the lines of the method's figure)."""
    from jsonargparse import ArgumentParser

    from ssl_zoo.eval.knn import MONITOR_PREFIX, knn_vote_on_splits

    cfg = recipe(method)
    args = data_overrides(method, views)
    if args is None:
        return None
    # The recipe's data module with the benchmark's root (and format switch), built like the CLI builds it.
    data = {"class_path": cfg["data"]["class_path"], "init_args": dict(cfg["data"]["init_args"])}
    for i in range(0, len(args), 2):
        key, value = args[i], args[i + 1]
        if key == "--data":
            data = {"class_path": value, "init_args": {k: v for k, v in data["init_args"].items()
                                                         if k in ("batch_size", "eval_size")}}
        elif key.startswith("--data.init_args."):
            data["init_args"][key.removeprefix("--data.init_args.")] = int(value) if value.isdigit() else value
    parser = ArgumentParser()
    parser.add_subclass_arguments(__import__("lightning.pytorch", fromlist=["LightningDataModule"]).LightningDataModule,
                                  "data")
    datamodule = parser.instantiate_classes(parser.parse_object({"data": data}))["data"]
    datamodule.num_workers = 0
    monitor = next((c["init_args"] for c in cfg["trainer"].get("callbacks", [])
                    if c["class_path"].endswith("KNNMonitor")), {})
    size = architecture(method)["img_size"]
    vote = knn_vote_on_splits(backbone, datamodule, size, KNN_K, KNN_T, "backbone",
                              monitor.get("max_train_samples"), monitor.get("max_val_samples"),
                              num_classes=getattr(datamodule, "num_classes", None))
    if vote is None:
        return None
    metrics = vote[0]
    name = "top1" if "top1" in metrics else "mAP"
    return f"{MONITOR_PREFIX}{name}", round(float(metrics[name]), 2)


# ---------------------------------------------------------------------------------------------- results
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------------- main
STATE_KEYS = ("scores", "seconds", "cpu_seconds", "runs", "monitor_keys", "monitor_lines", "skipped", "trained_from",
              "teachers")


def supervised_run_dir(arch: dict, work: Path, seed: int) -> Path:
    """Where :func:`fit_supervised` trains the ceiling of ``arch`` for ``seed``."""
    return work / "supervised" / architecture_key(arch) / f"seed{seed}"


def fit_supervised(arch: dict, views: DataViews, work: Path, seed: int) -> tuple[Path, dict]:
    """The supervised ceiling of ``arch`` for ``seed`` (the recipe of :data:`SUPERVISED_CONFIG` on the
    single-label view), trained unless a finished run of the same recipe exists: its run directory and record."""
    run_dir = supervised_run_dir(arch, work, seed)
    record = fit(SUPERVISED_CONFIG, run_dir, seed, [
        "--model.init_args.backbone", arch["backbone"],
        "--model.init_args.backbone_kwargs", json.dumps(arch["backbone_kwargs"]),
        "--model.init_args.img_size", str(arch["img_size"]), "--data.init_args.root", views.folder,
        "--data.init_args.eval_size", str(arch["img_size"])])
    return run_dir, record


def export_teacher(run_dir: Path) -> Path:
    """``run_dir``'s last backbone as a timm state dict (``python -m ssl_zoo.cli.export --to timm``), written once
    into the run directory (which moves aside with it when its recipe changes)."""
    teacher = run_dir / "teacher_timm.pth"
    if not teacher.is_file():
        from ssl_zoo.cli.export import export_checkpoint

        export_checkpoint(run_dir / "checkpoints" / "last.ckpt", "timm", teacher)
    return teacher


def forget_seed(state: dict, name: str, seed: str) -> None:
    """Drop what ``state`` measured on run ``name``'s seed: its scores, times and (for a ceiling) monitor lines."""
    for key in ("scores", "seconds", "cpu_seconds"):
        state.get(key, {}).get(name, {}).pop(seed, None)
    for line, values in state.get("monitor_lines", {}).items():
        if line.startswith(f"{name}/"):
            values.pop(seed, None)


def record_run(state: dict, name: str, seed: str, run_dir: Path, record: dict) -> None:
    """Keep a pre-training run's times and what it was trained from; a run trained just now voids whatever
    ``state`` had measured on that seed's former weights."""
    if record["trained"]:
        forget_seed(state, name, seed)
    state["seconds"].setdefault(name, {})[seed] = record["seconds"]
    state["cpu_seconds"].setdefault(name, {})[seed] = [record.get("cpu_seconds"), record.get("load_average_at_end")]
    state["trained_from"].setdefault(name, {})[seed] = [str(run_dir), record["recipe_sha256"]]


def merged_state(work: Path) -> dict:
    """Every ``state-*.json`` under ``work`` merged (one per benchmark process, e.g. one per seed in parallel)."""
    state: dict = {key: {} for key in STATE_KEYS}
    for path in sorted(work.glob("state-*.json")):
        part = json.loads(path.read_text())
        # A run another process trained again since this one measured it: its scores and times here are stale.
        for name, seeds in part.get("trained_from", {}).items():
            for s, (run_dir, digest) in seeds.items():
                record = Path(run_dir) / "benchmark_run.json"
                current = json.loads(record.read_text()).get("recipe_sha256") if record.is_file() else None
                if current != digest:
                    forget_seed(part, name, s)
        for key in STATE_KEYS:
            for name, value in part.get(key, {}).items():
                if isinstance(value, dict):
                    state[key].setdefault(name, {}).update(value)
                else:
                    state[key][name] = value
    return state


def shown_path(path: Path) -> str:
    """``path`` as the report names it: relative to the repository when inside it (RESULTS.md embeds it), else
    absolute (``--figures /tmp/figs``)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def write_report(args: argparse.Namespace, views: DataViews, machine: dict, figures: bool) -> dict:
    """``quality.json`` (and the figures) from every state under ``--work``: the seeds of parallel processes."""
    work, out = ROOT / args.work, ROOT / args.out
    state = merged_state(work)
    rows = build_rows(state, args.methods, args.seeds)
    report = {"rows": rows, "machine": machine, "root": str(args.root), "views": views.__dict__,
              "methods": args.methods, "seeds": args.seeds, "verdicts": verdicts(rows),
              # lightly's step on the recipe of each method it implements, against random init and against ours.
              "peer_verdicts": verdicts(rows, PEER), "peer_comparison": peer_comparison(rows),
              "curves": {name: {"key": state["monitor_keys"].get(name), "runs": state["runs"].get(name, {})}
                         for m in args.methods for name in (m, f"{PEER}/{m}") if name == m or name in state["runs"]},
              "skipped": state["skipped"],
              # MVP's teacher per seed: [--mvp-teacher, the exported timm state dict it loaded]
              "teachers": state["teachers"],
              # Per run: [CPU seconds of the command and its loader workers, 1-min load average at its end].
              "pretrain_cpu_s_and_load": state["cpu_seconds"],
              # Per run: stopped by its 10-minute guard (trainer.max_time) before its schedule ended.
              "stopped_at_time_limit": {name: {s: stopped_at_time_limit(run_dir) for s, (run_dir, _) in seeds.items()}
                                        for name, seeds in state["trained_from"].items()},
              "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:])}
    for earlier in getattr(args, "merge", None) or []:
        merge_report(report, earlier)
    if figures and args.figures:
        report["figures"] = [shown_path(p) for p in draw_figures(report, state, args.methods, ROOT / args.figures)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)  # parallel processes never leave a half-written file
    return report


def pretrain_and_probe(state: dict, name: str, method: str, config: str, seed: int, extra: list[str],
                       views: DataViews, work: Path) -> None:
    """Pre-train run ``name`` (``method``'s recipe, or lightly's peer of it) for ``seed`` into ``<work>/<name>/seedN``
    unless a finished run of the same recipe exists, and probe its student unless ``state`` holds its scores."""
    s, arch = str(seed), architecture(method)
    run_dir = work / name / f"seed{seed}"
    record = fit(config, run_dir, seed, extra)
    state["runs"].setdefault(name, {})[s] = str(run_dir)
    record_run(state, name, s, run_dir, record)
    if s not in state["scores"].get(name, {}):
        student = load_student(record["ckpt"], arch)
        state["scores"].setdefault(name, {})[s] = probe_backbone(student, arch, views, seed, run_dir / "probes")
        monitor = monitor_metric(student, method, views)
        if monitor:
            state["monitor_keys"][name] = monitor[0]
        print(f"seed {seed} {name}: {state['scores'][name][s]} ({record['seconds']:.0f} s)", flush=True)


def write_peer_config(method: str, work: Path) -> str:
    """lightly's peer of ``method`` on its CPU recipe (:func:`benchmarks.peers.peer_config`), written to
    ``<work>/peer_lightly/<method>/cpu.yaml``: the config its runs are trained from (and their digest read)."""
    path = work / PEER / method / "cpu.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(peer_config(method), sort_keys=False))
    return str(path)


def run_benchmark(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(int(child_env()["OMP_NUM_THREADS"]))  # the probes run in this process (see child_env)
    views = find_views(args.root)
    work = ROOT / args.work
    machine = machine_info()
    if args.report:
        return write_report(args, views, machine, figures=True)
    # One state file per process: several processes (e.g. one per seed) can share --work and --out.
    state_path = work / f"state-seeds{'_'.join(map(str, args.seeds))}.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    for key in STATE_KEYS:
        state.setdefault(key, {})

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1))
        write_report(args, views, machine, figures=False)

    baselines_done: set[str] = set()
    for method in args.methods:  # method by method, all seeds: an interrupted run has complete rows for the first ones
        extra_base = data_overrides(method, views)
        if extra_base is None:
            state["skipped"][method] = "no data view it can read under --root"
            save()
            continue
        arch = architecture(method)
        key = architecture_key(arch)
        for seed in [] if args.baselines_only or args.peers_only else args.seeds:
            s = str(seed)
            extra = list(extra_base)
            if method == "mvp":
                if args.mvp_teacher == "supervised":
                    if not views.folder:  # the ceiling trains on single-label targets
                        state["skipped"][method] = ("--mvp-teacher supervised needs a single-label view under "
                                                    "--root; use --mvp-teacher mocov3")
                        save()
                        break
                    teacher_dir, record = fit_supervised(arch, views, work, seed)
                    record_run(state, f"supervised/{key}", s, teacher_dir, record)
                else:  # MoCo v3 on MVP's ViT, trained for the teacher and not reported
                    teacher_dir = work / "mocov3_vit" / f"seed{seed}"
                    record = fit(MOCOV3_VIT_CONFIG, teacher_dir, seed,
                                 data_overrides("mocov3", views, MOCOV3_VIT_CONFIG) + args.pretrain_args)
                    record_run(state, "mocov3_vit", s, teacher_dir, record)
                teacher = export_teacher(teacher_dir)
                state["teachers"].setdefault(method, {})[s] = [args.mvp_teacher, str(teacher)]
                extra += ["--model.init_args.teacher_pretrained", str(teacher)]
            pretrain_and_probe(state, method, method, f"experiments/{method}/cpu.yaml", seed,
                               extra + args.pretrain_args, views, work)
            save()
        kinds = ("random", "supervised") if key not in baselines_done else ()
        baselines_done.add(key)
        for kind in kinds:
            name = f"{kind}/{key}"
            for seed in args.seeds:
                s = str(seed)
                if kind == "random":
                    backbone = random_backbone(arch, seed)
                else:
                    if not views.folder:
                        continue  # the ceiling trains on single-label targets
                    run_dir, record = fit_supervised(arch, views, work, seed)
                    record_run(state, name, s, run_dir, record)
                    backbone = load_student(record["ckpt"], arch)
                if s not in state["scores"].get(name, {}):
                    state["scores"].setdefault(name, {})[s] = probe_backbone(
                        backbone, arch, views, seed, work / kind / key / f"seed{seed}")
                # The horizontal lines of each figure: what the method's kNN monitor reads on this backbone
                # (one vote per data view: recipes reading the same view share it).
                votes: dict[tuple, float | None] = {}
                for other in args.methods:
                    if architecture_key(architecture(other)) != key:
                        continue
                    lines = state["monitor_lines"].setdefault(f"{name}/{other}", {})
                    view = tuple(data_overrides(other, views) or ())
                    if s not in lines:
                        if view not in votes:
                            monitor = monitor_metric(backbone, other, views)
                            votes[view] = monitor[1] if monitor else None
                        lines[s] = votes[view]
                save()
                print(f"seed {seed} {name}: {state['scores'][name][s]}", flush=True)
        if args.peers and method in PEERS and not args.baselines_only:  # lightly's step on the same recipe, data and budget
            config = write_peer_config(method, work)
            for seed in args.seeds:
                pretrain_and_probe(state, f"{PEER}/{method}", method, config, seed, extra_base + args.pretrain_args,
                                   views, work)
                save()
    return write_report(args, views, machine, figures=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="data root (demo layout, image folder or COCO)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--work", default=WORK, help="run directories and resumable state")
    parser.add_argument("--figures", default="benchmarks/results", help="folder of the per-method PNGs ('' = none)")
    parser.add_argument("--mvp-teacher", choices=MVP_TEACHERS, default=MVP_TEACHERS[0],
                        help="MVP's timm teacher: the same seed's supervised ViT (default) or MoCo v3 run on MVP's ViT (experiments/mocov3/cpu_vit.yaml)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also train lightly's own step on the recipe of each method lightly implements "
                             f"({', '.join(PEERS)}; rows 'backbone: {PEER}')")
    parser.add_argument("--peers-only", action="store_true",
                        help="lightly's peers (and the baselines) only, not our recipes: e.g. after a lightly upgrade; "
                             "--report --merge an earlier quality.json then puts our rows beside them")
    parser.add_argument("--baselines-only", action="store_true",
                        help="random init and the supervised ceiling of each method's architecture only: whether a "
                             "new dataset can be learnt at all at the recipes' resolution, before pre-training on it")
    parser.add_argument("--pretrain-args", nargs=argparse.REMAINDER, default=[],
                        help="CLI overrides for every pre-training run (last option: takes the rest of the line)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    parser.add_argument("--report", action="store_true",
                        help="rebuild --out and the figures from the states under --work (e.g. after parallel runs)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="QUALITY_JSON",
                        help="earlier quality.json files: the methods they measured and --work did not keep their "
                             "rows (each marked with its origin); may name --out itself")
    args = parser.parse_args(argv)
    if args.peers_only and (not args.peers or args.baselines_only):
        parser.error("--peers-only trains lightly's peers: it cannot go with --no-peers or --baselines-only")
    if args.table:
        print(markdown_table(json.loads((ROOT / args.out).read_text())))
        return 0
    report = run_benchmark(args)
    print(markdown_table(report))
    failed = [v for v in report["verdicts"] if not v["passes"]]
    print(f"{len(report['verdicts']) - len(failed)} of {len(report['verdicts'])} (method, probe) pairs beat random "
          f"init by >= 10 points and > 3 std; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
