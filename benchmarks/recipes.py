"""The CPU recipes the quality benchmark runs and the data views of its ``--root``: which format each recipe reads,
the overrides that point it at a root, and the architecture its random-init and supervised baselines copy."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("bam_ia", "simsiam", "mpcl", "mocov2", "mocov3", "mvp", "hvp_mtl")
#: The ``backbone`` value of a peer's rows in ``quality.json``, and the prefix of its runs (``peer_lightly/<method>``).
PEER = "peer_lightly"
#: lightly's peer of each method it implements (:mod:`benchmarks.peers`), and the recipe settings that make our
#: module that method (the peer is that method and takes no such argument): they must hold in the recipe.
PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "mocov2": ("benchmarks.peers.LightlyMoCoV2", {"class_path": "ssl_zoo.methods.MPCLMoCoV2", "num_projectors": 1}),
    "simsiam": ("benchmarks.peers.LightlySimSiam", {"class_path": "ssl_zoo.methods.BAMIA", "bam": False,
                                                    "ia_loss": "none"}),
}
_DATA_CLASSES = {"folder": "ssl_zoo.data.ImageFolderDataModule", "coco": "ssl_zoo.data.CocoDataModule",
                 "tencent": "ssl_zoo.data.TencentMLDataModule"}


@dataclass(frozen=True)
class DataViews:
    """Where each label format of ``--root`` lives (``None``: that view is missing)."""

    folder: str | None  # class-per-folder tree with train/ and val/ (single-label)
    coco: str | None  # COCO root: annotations/instances_{train,val}2017.json (multi-label)
    tencent: str | None  # root of tencent/{train,val}.txt (multi-label lists)
    tencent_classes: int | None = None


def find_views(root: str | os.PathLike) -> DataViews:
    """The label formats under ``root`` (see the module docstring); raises when it holds none."""
    root = Path(root)
    folder = None
    if (root / "folder" / "train").is_dir() and (root / "folder" / "val").is_dir():
        folder = root / "folder"
    elif (root / "train").is_dir() and (root / "val").is_dir() and not (root / "annotations").is_dir():
        folder = root
    coco = root if (root / "annotations" / "instances_train2017.json").is_file() else None
    tencent, classes = None, None
    dictionary = root / "tencent" / "dictionary_and_semantic_hierarchy.txt"
    if (root / "tencent" / "train.txt").is_file() and dictionary.is_file():
        tencent = root
        classes = sum(1 for line in dictionary.read_text().splitlines() if line.strip())
    if not (folder or coco or tencent):
        raise FileNotFoundError(
            f"--root {root}: no class-per-folder tree (train/ and val/, or folder/train and folder/val), no COCO "
            "annotations/instances_train2017.json and no tencent/train.txt; generate the demo with "
            "`python -m ssl_zoo.data.demo --out data/demo`")
    return DataViews(*(str(p) if p else None for p in (folder, coco, tencent)), tencent_classes=classes)


def recipe(method: str, config: str | None = None) -> dict:
    """``method``'s CPU recipe (``experiments/<method>/cpu.yaml``, or ``config``), parsed."""
    return yaml.safe_load((ROOT / (config or f"experiments/{method}/cpu.yaml")).read_text())


def data_overrides(method: str, views: DataViews, config: str | None = None) -> list[str] | None:
    """CLI overrides pointing ``method``'s recipe (or ``config``, another recipe of it) at the views of ``--root``
    (None: it cannot run on them).

    A recipe reads its own format when present; self-supervised recipes switch to another format otherwise
    (they ignore the labels); HVP-MTL needs multi-label targets (Tencent lists, else COCO).
    """
    cfg = recipe(method, config)
    wanted = next(kind for kind, path in _DATA_CLASSES.items() if cfg["data"]["class_path"] == path)
    if method == "hvp_mtl":
        order = ("tencent", "coco")
    else:
        order = (wanted, *(k for k in ("folder", "coco", "tencent") if k != wanted))
    for kind in order:
        root = getattr(views, kind)
        if root is None:
            continue
        args = ["--data.init_args.root", root]
        if kind != wanted:
            args = ["--data", _DATA_CLASSES[kind], *args]
        if method == "hvp_mtl":
            classes = views.tencent_classes if kind == "tencent" else _coco_classes(root)
            args += ["--model.init_args.num_classes", str(classes)]
            if kind == "tencent":
                args += ["--data.init_args.num_classes", str(classes)]
        return args
    return None


def _coco_classes(root: str) -> int:
    data = json.loads((Path(root) / "annotations" / "instances_train2017.json").read_text())
    return len(data["categories"])


def architecture(method: str, config: str | None = None) -> dict:
    """Backbone name, Backbone kwargs and input size of a recipe (``method``'s CPU recipe, or ``config``): what
    random init and the ceiling copy."""
    init = recipe(method, config)["model"]["init_args"]
    return {"backbone": init["backbone"], "backbone_kwargs": init.get("backbone_kwargs") or {},
            "img_size": int(init.get("img_size", 224))}


def architecture_key(arch: dict) -> str:
    """Name of an architecture's baselines: the backbone, the ``model_kwargs`` that change it, the input size.

    Two recipes share random-init and supervised baselines exactly when their keys are equal, so every
    architecture keyword is in the key (``p8_depth6_embed_dim96_num_heads3``, ``channels16x32x64x128``).
    """
    kwargs = dict(arch["backbone_kwargs"].get("model_kwargs") or {})
    parts = [arch["backbone"]]
    if "patch_size" in kwargs:
        parts.append(f"p{kwargs.pop('patch_size')}")

    def text(value) -> str:
        return "x".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    parts += [f"{name}{text(value)}" for name, value in sorted(kwargs.items())]
    return "_".join(parts) + f"_{arch['img_size']}px"


def peer_config(method: str) -> dict:
    """``experiments/<method>/cpu.yaml`` with its model replaced by lightly's peer (:data:`PEERS`): the same trainer,
    data and settings; raises when the recipe sets something the peer cannot follow."""
    import importlib

    if method not in PEERS:
        raise ValueError(f"{method}: lightly implements no peer of it; peers: {', '.join(PEERS)}")
    class_path, own = PEERS[method]
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    cfg = recipe(method)
    init = dict(cfg["model"]["init_args"])
    own = dict(own)
    if cfg["model"]["class_path"] != own.pop("class_path"):
        raise ValueError(f"experiments/{method}/cpu.yaml: model.class_path is {cfg['model']['class_path']}, so the "
                         f"recipe is not the method {name} implements")
    for key, value in own.items():
        if init.pop(key, value) != value:
            raise ValueError(f"experiments/{method}/cpu.yaml: model.init_args.{key} is not {value!r}, so the recipe "
                             f"is not the method {name} implements")
    unknown = sorted(set(init) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ValueError(f"experiments/{method}/cpu.yaml: {name} has no setting {', '.join(unknown)} "
                         "(model.init_args); give the peer that setting or leave it at the method's default")
    return {**cfg, "name": f"{cfg['name']}_{PEER}", "model": {"class_path": class_path, "init_args": init}}
