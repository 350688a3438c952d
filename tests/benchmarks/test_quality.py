"""Learning you can see (``benchmarks/quality.py``): the CPU recipes, the kNN monitor in every demo/CPU recipe, and
the quality benchmark's bookkeeping (never the benchmark itself: it takes hours).

Expected values come from hand-written CSVs and independent computations, not from the code under test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import quality
from ssl_zoo.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
CPU_RECIPES = sorted((ROOT / "experiments").glob("*/cpu*.yaml"))  # cpu.yaml per method, cpu_vit.yaml (MoCo v3)
RECIPES_WITH_MONITOR = sorted([*CPU_RECIPES, *(ROOT / "experiments").glob("*/demo.yaml")])


# ============================================================================ recipes
def test_every_method_has_a_cpu_recipe():
    assert {p.parent.name for p in CPU_RECIPES if p.name == "cpu.yaml"} == set(quality.METHODS)


@pytest.mark.parametrize("config", RECIPES_WITH_MONITOR, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_knn_monitor_is_on_in_demo_and_cpu_recipes(config):
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    assert any(c["class_path"] == "ssl_zoo.eval.KNNMonitor" for c in callbacks)


@pytest.mark.parametrize("config", CPU_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cpu_recipe_fits_the_budget_by_construction(config):
    """A wall-clock guard of at most 10 minutes, a CPU, one device, a small input."""
    cfg = yaml.safe_load(config.read_text())
    days, hours, minutes, seconds = (int(x) for x in cfg["trainer"]["max_time"].split(":"))
    assert days == hours == 0 and minutes * 60 + seconds <= 600
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["devices"] == 1
    assert cfg["model"]["init_args"]["img_size"] <= 64


def _mvp_teacher(tmp_path: Path) -> str:
    """A timm state dict of a ViT of MVP's student architecture (its teacher's, whichever run it is exported from),
    as `python -m ssl_zoo.cli.export --to timm` writes it."""
    from ssl_zoo.models import Backbone

    arch = quality.architecture("mvp")
    backbone = Backbone(arch["backbone"], **{**arch["backbone_kwargs"], "img_size": arch["img_size"]})
    path = tmp_path / "teacher.pth"
    torch.save(backbone.model.state_dict(), path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("config", CPU_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cpu_recipe_fast_dev_run(config, demo_root, tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    recipe = yaml.safe_load(config.read_text())
    data = recipe["data"]
    root = f"{demo_root}/folder" if data["class_path"].endswith("ImageFolderDataModule") else demo_root
    extra = []
    if config.parent.name == "mvp":  # the teacher the benchmark exports from the same seed's supervised ViT
        extra = ["--model.init_args.teacher_pretrained", _mvp_teacher(tmp_path)]
    # The recipe's cpu_threads (if any) holds while it trains, and the caller's thread count comes back after.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads_in_fit, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (threads_in_fit.append(torch.get_num_threads()),
                                                                 fit(self, *a, **k))[1])
    threads_before = torch.get_num_threads()
    cli = cli_main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--data.init_args.root", root,
                    "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
                    "--trainer.default_root_dir", str(tmp_path / "run"), *extra])
    assert threads_in_fit == [recipe.get("cpu_threads") or threads_before]
    assert torch.get_num_threads() == threads_before
    metrics = cli.trainer.callback_metrics
    assert metrics["train/loss"].isfinite()
    # The kNN monitor ran on the labelled splits: top-1 on the folder view, mAP on the multi-label views.
    knn = metrics.get("val/knn_top1", metrics.get("val/knn_mAP"))
    assert knn is not None and 0.0 <= float(knn) <= 100.0


@pytest.mark.slow
def test_mvp_cpu_recipe_loads_the_exported_teacher(tmp_path):
    """The teacher MVP regresses is the exported timm ViT, weight for weight, and frozen."""
    from ssl_zoo.methods import MVP

    path = _mvp_teacher(tmp_path)
    init = yaml.safe_load((ROOT / "experiments/mvp/cpu.yaml").read_text())["model"]["init_args"]
    model = MVP(**{**init, "teacher_pretrained": path})
    saved = torch.load(path, weights_only=True)
    loaded = model.teacher_backbone.backbone.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())


@pytest.mark.slow
def test_mvp_default_teacher_is_the_supervised_vit_exported_from_its_run(tmp_path):
    """--mvp-teacher supervised: the supervised ceiling's FineTune checkpoint, exported by the benchmark, is the
    timm teacher MVP's CPU recipe regresses, weight for weight (the classifier head left out)."""
    from ssl_zoo.eval import FineTune
    from ssl_zoo.methods import MVP

    assert quality.MVP_TEACHERS[0] == "supervised"
    arch = quality.architecture("mvp")
    torch.manual_seed(0)
    ceiling = FineTune(backbone=arch["backbone"], backbone_kwargs=arch["backbone_kwargs"], img_size=arch["img_size"],
                       num_classes=10)
    run_dir = tmp_path / "supervised" / quality.architecture_key(arch) / "seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": ceiling.state_dict(), "hyper_parameters": dict(ceiling.hparams)},
               run_dir / "checkpoints" / "last.ckpt")
    path = quality.export_teacher(run_dir)
    assert path == run_dir / "teacher_timm.pth" and quality.export_teacher(run_dir) == path  # written once
    init = yaml.safe_load((ROOT / "experiments/mvp/cpu.yaml").read_text())["model"]["init_args"]
    model = MVP(**{**init, "teacher_pretrained": str(path)})
    trained = ceiling.backbone.model.state_dict()
    loaded = model.teacher_backbone.backbone.model.state_dict()
    assert loaded.keys() <= trained.keys() and all(torch.equal(trained[k], loaded[k]) for k in loaded)


def test_the_moco_v3_teacher_recipe_is_moco_v3_on_mvps_vit(demo_root):
    """--mvp-teacher mocov3 trains MoCo v3 on exactly MVP's ViT (the teacher's timm weights load into the
    student's architecture), from its own recipe beside MoCo v3's ResNet CPU recipe, on the same data view."""
    teacher = quality.recipe("mocov3", quality.MOCOV3_VIT_CONFIG)
    init = teacher["model"]["init_args"]
    assert teacher["model"]["class_path"] == "ssl_zoo.methods.MPCLMoCoV3"
    assert init["num_projectors"] == 1
    arch = quality.architecture("mocov3", quality.MOCOV3_VIT_CONFIG)
    assert quality.architecture_key(arch) == quality.architecture_key(quality.architecture("mvp"))
    assert quality.architecture("mocov3")["backbone"] != arch["backbone"]  # the reported recipe is the ResNet
    views = quality.find_views(demo_root)
    assert quality.data_overrides("mocov3", views, quality.MOCOV3_VIT_CONFIG) == \
        quality.data_overrides("mocov3", views) == ["--data.init_args.root", views.folder]


# ============================================================================ the benchmark's bookkeeping
def test_find_views_on_the_three_layouts(demo_root, tmp_path):
    demo = quality.find_views(demo_root)
    assert demo.folder == os.path.join(demo_root, "folder") and demo.coco == demo_root and demo.tencent == demo_root
    assert demo.tencent_classes == 12
    folder = quality.find_views(Path(demo_root) / "folder")
    assert folder.folder == str(Path(demo_root) / "folder") and folder.coco is None and folder.tencent is None
    with pytest.raises(FileNotFoundError, match="no class-per-folder tree"):
        quality.find_views(tmp_path)


def test_data_overrides_follow_each_recipe_and_switch_formats(demo_root):
    views = quality.find_views(demo_root)
    assert quality.data_overrides("mocov2", views) == ["--data.init_args.root", views.folder]
    assert quality.data_overrides("bam_ia", views) == ["--data.init_args.root", views.coco]
    assert quality.data_overrides("hvp_mtl", views) == ["--data.init_args.root", views.tencent,
                                                        "--model.init_args.num_classes", "12",
                                                        "--data.init_args.num_classes", "12"]
    folder_only = quality.DataViews(folder="/x/folder", coco=None, tencent=None)
    assert quality.data_overrides("bam_ia", folder_only) == [
        "--data", "ssl_zoo.data.ImageFolderDataModule", "--data.init_args.root", "/x/folder"]
    assert quality.data_overrides("hvp_mtl", folder_only) is None  # needs multi-label targets
    coco_only = quality.DataViews(folder=None, coco=demo_root, tencent=None)
    assert quality.data_overrides("hvp_mtl", coco_only) == [
        "--data", "ssl_zoo.data.CocoDataModule", "--data.init_args.root", demo_root,
        "--model.init_args.num_classes", "10"]


def test_a_finished_run_is_reused_only_for_the_same_recipe(tmp_path, monkeypatch):
    """Editing the config, an override or a file an override names (MVP's teacher) trains the run again;
    the former run is moved aside, never scored as the new recipe's."""
    config, teacher = tmp_path / "cpu.yaml", tmp_path / "teacher.pth"
    config.write_text("trainer: {max_epochs: 2}\n")
    teacher.write_bytes(b"weights-1")
    run_dir = tmp_path / "runs" / "seed0"
    trained = []

    def fake_run(cmd, log):  # what `ssl_zoo fit` leaves behind, without training
        run_dir.mkdir(parents=True)
        trained.append(cmd)
        return 1.0, 1.0

    monkeypatch.setattr(quality, "run_command", fake_run)
    extra = ["--model.init_args.teacher_pretrained", str(teacher)]
    assert quality.fit(str(config), run_dir, 0, extra)["trained"] and len(trained) == 1
    assert not quality.fit(str(config), run_dir, 0, extra)["trained"] and len(trained) == 1
    config.write_text("# why two epochs\ntrainer:\n  max_epochs: 2   # the same setting\n")
    assert not quality.fit(str(config), run_dir, 0, extra)["trained"] and len(trained) == 1  # comments only
    for change in (lambda: teacher.write_bytes(b"weights-2"), lambda: config.write_text("trainer: {max_epochs: 3}\n")):
        change()
        assert quality.fit(str(config), run_dir, 0, extra)["trained"]
    assert quality.fit(str(config), run_dir, 0, [*extra, "--seed", "1"])["trained"] and len(trained) == 4
    assert len(list(run_dir.parent.glob("seed0.stale-*"))) == 3  # each former run kept aside
    long_json = json.dumps({"model_kwargs": {"name": "x" * 300}})  # longer than a file name may be
    assert quality.fit(str(config), run_dir, 0, [*extra, "--model.init_args.backbone_kwargs", long_json])["trained"]


def test_a_finished_run_is_trained_again_when_its_data_changes(tmp_path, monkeypatch):
    """A run reads the data root an override names: new or resized images and edited label files train it
    again (a benchmark on regenerated data never scores weights trained on the former data)."""
    config, data = tmp_path / "cpu.yaml", tmp_path / "data"
    config.write_text("trainer: {max_epochs: 2}\n")
    (data / "annotations").mkdir(parents=True)
    (data / "train").mkdir()
    labels, image = data / "annotations" / "instances_train2017.json", data / "train" / "0.png"
    labels.write_text('{"images": [1]}')
    image.write_bytes(b"x" * 10)
    run_dir = tmp_path / "runs" / "seed0"
    trained = []

    def fake_run(cmd, log):
        run_dir.mkdir(parents=True)
        trained.append(cmd)
        return 1.0, 1.0

    monkeypatch.setattr(quality, "run_command", fake_run)
    extra = ["--data.init_args.root", str(data)]
    assert quality.fit(str(config), run_dir, 0, extra)["trained"]
    assert not quality.fit(str(config), run_dir, 0, extra)["trained"]
    image.write_bytes(b"x" * 10)  # rewritten, same name and size: the fingerprint reads no image bytes
    assert not quality.fit(str(config), run_dir, 0, extra)["trained"]
    for change in (lambda: labels.write_text('{"images": [2]}'),  # same size, other labels
                   lambda: image.write_bytes(b"x" * 11),
                   lambda: (data / "train" / "1.png").write_bytes(b"y")):
        change()
        assert quality.fit(str(config), run_dir, 0, extra)["trained"]
        assert not quality.fit(str(config), run_dir, 0, extra)["trained"]
    assert len(trained) == 4


def test_merged_states_drop_the_scores_of_a_run_trained_again_by_another_process(tmp_path):
    """Two processes' states name the same run; the one whose recipe digest is no longer the run's is left out."""
    run_dir = tmp_path / "mocov2" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "benchmark_run.json").write_text(json.dumps({"recipe_sha256": "new"}))
    for name, digest, score in (("state-seeds0.json", "new", 30.0), ("state-seeds0_1.json", "old", 20.0)):
        (tmp_path / name).write_text(json.dumps({
            "scores": {"mocov2": {"0": {"knn_top1": score}}}, "seconds": {"mocov2": {"0": score}},
            "trained_from": {"mocov2": {"0": [str(run_dir), digest]}}}))
    merged = quality.merged_state(tmp_path)  # the stale file sorts last: without the check it would win
    assert merged["scores"]["mocov2"]["0"] == {"knn_top1": 30.0} and merged["seconds"]["mocov2"]["0"] == 30.0


def test_architecture_keys_tell_every_model_keyword_apart():
    """Recipes share random-init and supervised baselines only when their architectures are the same."""
    vit = {"backbone": "vit_tiny_patch16_224", "img_size": 32,
           "backbone_kwargs": {"img_size": 32, "model_kwargs": {"patch_size": 8, "embed_dim": 96, "depth": 6}}}
    keys = {quality.architecture_key(vit)}
    for change in ({"patch_size": 4}, {"embed_dim": 64}, {"depth": 4}, {"num_heads": 2}):
        other = {**vit, "backbone_kwargs": {**vit["backbone_kwargs"],
                                            "model_kwargs": {**vit["backbone_kwargs"]["model_kwargs"], **change}}}
        keys.add(quality.architecture_key(other))
    keys.add(quality.architecture_key({**vit, "img_size": 64}))
    assert len(keys) == 6
    resnet = {"backbone": "resnet18", "img_size": 32, "backbone_kwargs": {"model_kwargs": {"channels": [16, 32, 64, 128]}}}
    assert quality.architecture_key(resnet) == "resnet18_channels16x32x64x128_32px"


def test_rows_follow_the_schema_and_verdicts_apply_the_bar():
    seeds = [0, 1, 2]
    arch = quality.architecture_key(quality.architecture("mocov2"))
    state = {
        "scores": {
            "mocov2": {"0": {"knn_top1": 30.0, "linear_top1": 40.0}, "1": {"knn_top1": 32.0, "linear_top1": 41.0},
                       "2": {"knn_top1": 34.0, "linear_top1": 42.0}},
            f"random/{arch}": {s: {"knn_top1": 10.0 + int(s), "linear_top1": 20.0 + 6 * int(s)} for s in "012"},
            f"supervised/{arch}": {s: {"knn_top1": 80.0, "linear_top1": 85.0} for s in "012"},
        },
        "seconds": {"mocov2": {"0": 200.0, "1": 210.0, "2": 220.0}, f"supervised/{arch}": {s: 150.0 for s in "012"}},
    }
    rows = quality.build_rows(state, ["mocov2"], seeds)
    assert {r["backbone"] for r in rows} == {"pretrained", "random", "supervised"}
    for row in rows:
        assert set(row) == {"method", "probe", "backbone", "mean", "std", "values", "pretrain_s"}
        assert row["mean"] == pytest.approx(statistics.fmean(row["values"]), abs=0.01)
        assert row["std"] == pytest.approx(statistics.stdev(row["values"]), abs=0.01)
    knn = next(r for r in rows if r["probe"] == "knn_top1" and r["backbone"] == "pretrained")
    assert knn["values"] == [30.0, 32.0, 34.0] and knn["pretrain_s"] == [200.0, 210.0, 220.0]
    assert next(r for r in rows if r["backbone"] == "random")["pretrain_s"] == []
    verdicts = {v["probe"]: v for v in quality.verdicts(rows)}
    # kNN: 32 - 11 = 21 >= 10 and > 3 x max(2, 1) = 6 -> passes.
    assert verdicts["knn_top1"]["gain"] == pytest.approx(21.0) and verdicts["knn_top1"]["passes"]
    # linear: 41 - 26 = 15 >= 10 but 3 x std(20, 26, 32) = 18 > 15 -> fails on the spread.
    assert verdicts["linear_top1"]["gain"] == pytest.approx(15.0) and not verdicts["linear_top1"]["passes"]
    table = quality.markdown_table({"rows": rows})
    assert "| mocov2 | knn_top1 | 11.0 ± 1.0 | 32.0 ± 2.0 | 80.0 ± 0.0 | +21.0 | yes | 200, 210, 220 |" in table


def test_runs_stopped_by_their_time_limit_are_named_in_the_report_and_table(tmp_path):
    """A run that max_time stopped before its schedule ended is flagged per seed (from its log) and its row
    in the table says so; a run without a log is unknown (None), never reported as complete."""
    work = tmp_path / "work"
    for seed, text in (("0", "Epoch 4 ...\nTime limit reached. Elapsed time is 0:10:03. Signaling Trainer to stop.\n"),
                       ("1", "Epoch 9 ... `Trainer.fit` stopped: `max_epochs=10` reached.\n")):
        (work / "mocov2").mkdir(parents=True, exist_ok=True)
        (work / "mocov2" / f"seed{seed}.log").write_text(text)
    assert quality.stopped_at_time_limit(work / "mocov2" / "seed0") is True
    assert quality.stopped_at_time_limit(work / "mocov2" / "seed1") is False
    assert quality.stopped_at_time_limit(work / "mocov2" / "seed2") is None

    arch = quality.architecture_key(quality.architecture("mocov2"))
    state = {key: {} for key in quality.STATE_KEYS}
    state["scores"] = {"mocov2": {s: {"knn_top1": 30.0 + int(s)} for s in "012"},
                       f"random/{arch}": {s: {"knn_top1": 10.0} for s in "012"}}
    state["seconds"] = {"mocov2": {"0": 601.0, "1": 300.0, "2": 310.0}}
    state["trained_from"] = {"mocov2": {s: [str(work / "mocov2" / f"seed{s}"), "digest"] for s in "012"}}
    for s in "012":  # finished runs of the recipe the state measured (else merged_state drops their scores)
        (work / "mocov2" / f"seed{s}").mkdir(parents=True)
        (work / "mocov2" / f"seed{s}" / "benchmark_run.json").write_text(json.dumps({"recipe_sha256": "digest"}))
    (work / "state-seeds0_1_2.json").write_text(json.dumps(state))
    args = argparse.Namespace(work=str(work), out=str(tmp_path / "quality.json"), methods=["mocov2"],
                              seeds=[0, 1, 2], root="data/demo", figures="")
    views = quality.DataViews(None, None, None)
    report = quality.write_report(args, views, {}, figures=False)
    assert report["stopped_at_time_limit"]["mocov2"] == {"0": True, "1": False, "2": None}
    assert "| 601, 300, 310 (seed 0 stopped at max_time) |" in quality.markdown_table(report)
    assert json.loads((tmp_path / "quality.json").read_text())["stopped_at_time_limit"]["mocov2"]["0"] is True


def test_figures_outside_the_repository_are_named_by_their_absolute_path(tmp_path):
    """--figures may point anywhere: figures in the repository are named relative to it (RESULTS.md embeds
    them), others by their absolute path instead of failing after the whole benchmark ran."""
    assert quality.shown_path(ROOT / "benchmarks" / "results" / "quality_mocov2.png") == \
        "benchmarks/results/quality_mocov2.png"
    assert quality.shown_path(tmp_path / "quality_mocov2.png") == str((tmp_path / "quality_mocov2.png").resolve())


def test_merge_keeps_the_methods_an_earlier_report_measured_and_this_one_did_not(tmp_path):
    """A rerun of one method merged with an earlier quality.json: the rerun's rows replace that method's, the
    other methods' rows, flags and origin come over unchanged, and the verdicts cover both."""
    def rows_of(method, pretrained, random):
        return [{"method": method, "probe": "knn_top1", "backbone": kind, "mean": statistics.fmean(values),
                 "std": round(statistics.stdev(values), 2), "values": values,
                 "pretrain_s": [100.0, 101.0, 102.0] if kind == "pretrained" else []}
                for kind, values in (("pretrained", pretrained), ("random", random))]

    earlier = {"rows": rows_of("mocov2", [30.0, 31.0, 32.0], [10.0, 11.0, 12.0])
                       + rows_of("hvp_mtl", [20.0, 21.0, 22.0], [15.0, 15.0, 15.0]),
               "machine": {"date": "2026-01-01 10:00"}, "command": "python -m benchmarks.quality --report",
               "curves": {"mocov2": {"key": "val/knn_top1", "runs": {"0": "r0"}}, "hvp_mtl": {"key": "x", "runs": {}}},
               "stopped_at_time_limit": {"mocov2": {"0": False}, "hvp_mtl": {"0": True},
                                         "random/resnet": {"0": False}},
               "teachers": {}, "pretrain_cpu_s_and_load": {"mocov2": {"0": [150.0, 1.0]}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    # This report reran hvp_mtl only, but holds mocov2's baseline rows too (an architecture's baselines are shared
    # by its recipes): mocov2 has not been measured here and comes over with its own rows.
    shared_baseline = [r for r in rows_of("mocov2", [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]) if r["backbone"] == "random"]
    report = {"rows": rows_of("hvp_mtl", [40.0, 41.0, 42.0], [15.0, 16.0, 17.0]) + shared_baseline,
              "methods": ["hvp_mtl"],
              "verdicts": [], "curves": {"hvp_mtl": {"key": "val/knn_mAP", "runs": {"0": "new"}}},
              "stopped_at_time_limit": {"hvp_mtl": {"0": False}}, "teachers": {}, "pretrain_cpu_s_and_load": {}}
    assert quality.merge_report(report, path) == ["mocov2"]
    assert [r["method"] for r in report["rows"]] == ["mocov2", "mocov2", "hvp_mtl", "hvp_mtl"]  # METHODS order
    assert [r["values"] for r in report["rows"] if r["method"] == "mocov2"] == [[30.0, 31.0, 32.0], [10.0, 11.0, 12.0]]
    assert report["methods"] == ["mocov2", "hvp_mtl"]
    hvp = next(r for r in report["rows"] if r["method"] == "hvp_mtl" and r["backbone"] == "pretrained")
    assert hvp["values"] == [40.0, 41.0, 42.0]  # the rerun, not the earlier rows
    assert report["stopped_at_time_limit"] == {"hvp_mtl": {"0": False}, "mocov2": {"0": False},
                                               "random/resnet": {"0": False}}
    assert report["curves"]["mocov2"] == earlier["curves"]["mocov2"]
    assert report["pretrain_cpu_s_and_load"] == {"mocov2": {"0": [150.0, 1.0]}}
    verdicts = {v["method"]: v for v in report["verdicts"]}
    assert verdicts["mocov2"]["gain"] == pytest.approx(20.0) and verdicts["mocov2"]["passes"]
    assert verdicts["hvp_mtl"]["gain"] == pytest.approx(25.0) and verdicts["hvp_mtl"]["passes"]
    assert report["merged"] == {"mocov2": {"file": str(path), "measured": "2026-01-01 10:00",
                                           "command": "python -m benchmarks.quality --report"}}
    table = quality.markdown_table(report)
    assert "| mocov2 | knn_top1 | 11.0 ± 1.0 | 31.0 ± 1.0 | — | +20.0 | yes | 100, 101, 102 |" in table
    assert f"Rows of mocov2: measured 2026-01-01 10:00 (`python -m benchmarks.quality --report`), taken from {path}." in table

    # Merging the merged report again (e.g. --merge naming --out itself) keeps each method's first origin.
    again = tmp_path / "again.json"
    again.write_text(json.dumps({**report, "machine": {"date": "2026-02-02 10:00"}}))
    fresh = {"rows": rows_of("hvp_mtl", [40.0, 41.0, 42.0], [15.0, 16.0, 17.0]), "methods": ["hvp_mtl"]}
    assert quality.merge_report(fresh, again) == ["mocov2"]
    assert fresh["merged"]["mocov2"]["measured"] == "2026-01-01 10:00"
    assert quality.merge_report(fresh, again) == []  # nothing left to take
    with pytest.raises(FileNotFoundError, match="--merge .*missing.json"):
        quality.merge_report(fresh, tmp_path / "missing.json")


def test_rows_of_an_interrupted_run_keep_their_seeds_and_never_pass():
    """Seeds without a value are left out of a row (not the whole row); a verdict needs 3 seeds on both sides."""
    arch = quality.architecture_key(quality.architecture("mpcl"))
    state = {
        "scores": {"mpcl": {"0": {"knn_top1": 60.0}, "2": {"knn_top1": 62.0}},
                   f"random/{arch}": {s: {"knn_top1": 10.0} for s in "012"}},
        "seconds": {"mpcl": {"0": 100.0, "2": 120.0}},
    }
    rows = quality.build_rows(state, ["mpcl"], [0, 1, 2])
    pretrained = next(r for r in rows if r["backbone"] == "pretrained")
    assert pretrained["values"] == [60.0, 62.0] and pretrained["pretrain_s"] == [100.0, 120.0]
    assert pretrained["mean"] == pytest.approx(61.0) and pretrained["std"] == pytest.approx(statistics.stdev([60, 62]), abs=0.01)
    (verdict,) = quality.verdicts(rows)
    assert verdict["gain"] == pytest.approx(51.0) and verdict["seeds"] == 2 and not verdict["passes"]
    assert "| 61.0 ± 1.4 (2 seeds) | — | +51.0 | no (2 seeds) | 100, 120 |" in quality.markdown_table({"rows": rows})


@pytest.mark.slow
def test_probe_knn_equals_the_library_vote(demo_root, tmp_path):
    """The benchmark's kNN score is the vote of knn_vote_on_splits (the monitor's path) on the same backbone."""
    from ssl_zoo.data.datamodule import ImageFolderDataModule
    from ssl_zoo.eval.knn import knn_vote_on_splits

    arch = {"backbone": "resnet18", "backbone_kwargs": {"model_kwargs": {"channels": [8, 16, 32, 64]}},
            "img_size": 32}
    views = quality.find_views(demo_root)
    backbone = quality.random_backbone(arch, seed=0)
    scores = quality.probe_backbone(backbone, arch, views, 0, tmp_path)
    assert set(scores) == set(quality.PROBES)
    datamodule = ImageFolderDataModule(root=views.folder, batch_size=16, num_workers=0)
    vote = knn_vote_on_splits(backbone, datamodule, 32, quality.KNN_K, quality.KNN_T, "backbone", None, None)
    assert scores["knn_top1"] == pytest.approx(vote[0]["top1"], abs=0.01)
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    # The linear probe's confusion matrix holds its validation predictions: its diagonal is the top-1.
    confusion = json.loads((tmp_path / "linear" / "confusion.json").read_text())
    matrix = torch.tensor(confusion["matrix"])
    assert confusion["classes"] == sorted(p.name for p in (Path(views.folder) / "val").iterdir())
    assert matrix.sum(1).tolist() == [len(list((Path(views.folder) / "val" / c).iterdir()))
                                      for c in confusion["classes"]]
    assert 100 * matrix.diagonal().sum().item() / matrix.sum().item() == pytest.approx(scores["linear_top1"],
                                                                                       abs=0.01)
    # The same seed builds the same random backbone: the baseline is reproducible.
    again = quality.random_backbone(arch, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_results_json_in_the_repository_follows_the_schema():
    path = ROOT / "benchmarks/results/quality.json"
    if not path.is_file():
        pytest.skip("benchmarks/results/quality.json not written yet (make bench-quality)")
    report = json.loads(path.read_text())
    assert set(report) >= {"rows", "machine"}
    for row in report["rows"]:
        assert row["method"] in quality.METHODS and row["probe"] in quality.PROBES
        assert row["backbone"] in ("pretrained", "random", "supervised", quality.PEER)
        assert len(row["values"]) >= 1 and row["mean"] == pytest.approx(statistics.fmean(row["values"]), abs=0.01)


# ============================================================================ pooling of the multi-label probe
def test_pooling_probe_reads_each_pooling_and_skips_missing_runs(demo_root, tmp_path):
    """On a 32 px ResNet-18 the last map is 1 x 1, so its pooled embedding, GAP, GMP and GAMP are one vector and
    the four probes agree exactly; a ViT/4's 8 x 8 patch tokens make them differ. Runs not trained are listed."""
    from benchmarks import quality_pooling

    out = tmp_path / "pooling.json"
    assert quality_pooling.main(["--root", demo_root, "--work", str(tmp_path / "work"), "--methods", "mocov2",
                                 "mvp", "--seeds", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["model"]: row for row in report["rows"]}
    resnet = rows[f"random/{quality.architecture_key(quality.architecture('mocov2'))}"]
    vit = rows[f"random/{quality.architecture_key(quality.architecture('mvp'))}"]
    assert len(rows) == 2  # random init of each architecture only: nothing was trained under --work
    assert resnet["backbone"] == resnet["gap"] == resnet["gmp"] == resnet["gamp"]
    assert len({vit[p] for p in quality_pooling.POOLINGS}) > 1
    assert all(0.0 <= row[p] <= 100.0 for row in rows.values() for p in quality_pooling.POOLINGS)
    assert {name.split(" ")[0] for name in report["skipped"]} == {
        "mocov2", "mvp", *(f"supervised/{quality.architecture_key(quality.architecture(m))}"
                              for m in ("mocov2", "mvp"))}


def test_peers_measured_alone_keep_their_rows_beside_our_earlier_ones(tmp_path):
    """``--peers-only`` then ``--report --merge``: our rows of the method come from the earlier file, the peer's from
    this report (not the earlier file's peer, if it had one), and the comparison sets one beside the other."""
    def rows_of(method, backbone, values):
        return [{"method": method, "probe": "knn_top1", "backbone": backbone, "mean": statistics.fmean(values),
                 "std": round(statistics.stdev(values), 2), "values": values, "pretrain_s": []}]

    earlier = {"rows": rows_of("simsiam", "pretrained", [27.0, 28.0, 29.0]) + rows_of("simsiam", "random", [10.0, 11.0, 12.0])
               + rows_of("simsiam", quality.PEER, [1.0, 2.0, 3.0]),
               "machine": {"date": "2026-01-01 10:00"}, "command": "earlier",
               "curves": {"simsiam": {"key": "val/knn_top1", "runs": {"0": "ours"}},
                          f"{quality.PEER}/simsiam": {"key": "val/knn_top1", "runs": {"0": "old peer"}}},
               "stopped_at_time_limit": {"simsiam": {"0": False}, f"{quality.PEER}/simsiam": {"0": True}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    report = {"rows": rows_of("simsiam", quality.PEER, [26.0, 27.0, 28.0]) + rows_of("simsiam", "random", [9.0, 9.0, 9.0]),
              "methods": ["simsiam"], "curves": {f"{quality.PEER}/simsiam": {"key": "val/knn_top1", "runs": {"0": "new peer"}}},
              "stopped_at_time_limit": {f"{quality.PEER}/simsiam": {"0": False}}}
    assert quality.merge_report(report, path) == ["simsiam"]
    by_backbone = {r["backbone"]: r["values"] for r in report["rows"]}
    assert by_backbone == {"pretrained": [27.0, 28.0, 29.0], "random": [10.0, 11.0, 12.0],
                           quality.PEER: [26.0, 27.0, 28.0]}
    assert report["curves"][f"{quality.PEER}/simsiam"]["runs"] == {"0": "new peer"}
    assert report["curves"]["simsiam"]["runs"] == {"0": "ours"}
    assert report["stopped_at_time_limit"][f"{quality.PEER}/simsiam"] == {"0": False}
    [comparison] = report["peer_comparison"]
    assert comparison["method"] == "simsiam" and comparison["holds"] and comparison["difference"] == 1.0


def test_peers_only_trains_no_recipe_of_ours(demo_root, tmp_path, monkeypatch):
    """``--peers-only``: the peer and the baselines of a method are trained, our recipe is not."""
    trained = []

    def fake_pretrain_and_probe(state, name, method, config, seed, extra, views, work):
        trained.append(name)
        state["scores"].setdefault(name, {})[str(seed)] = {"knn_top1": 1.0}

    monkeypatch.setattr(quality, "pretrain_and_probe", fake_pretrain_and_probe)
    ceiling = {"trained": False, "seconds": 0.0, "recipe_sha256": "x", "ckpt": "x"}
    monkeypatch.setattr(quality, "fit_supervised", lambda arch, views, work, seed: (work / "ceiling", ceiling))
    monkeypatch.setattr(quality, "load_student", lambda ckpt, arch: None)
    monkeypatch.setattr(quality, "random_backbone", lambda arch, seed: None)
    monkeypatch.setattr(quality, "probe_backbone", lambda *a, **k: {"knn_top1": 0.0})
    monkeypatch.setattr(quality, "monitor_metric", lambda *a, **k: None)
    monkeypatch.setattr(quality, "write_report", lambda *a, **k: {"rows": [], "verdicts": []})
    quality.main(["--root", demo_root, "--methods", "simsiam", "--seeds", "0", "--peers-only",
                  "--work", str(tmp_path / "work"), "--out", str(tmp_path / "q.json"), "--figures", ""])
    assert trained == [f"{quality.PEER}/simsiam"]


@pytest.mark.parametrize("contradiction", ["--no-peers", "--baselines-only"])
def test_peers_only_refuses_the_flags_that_contradict_it(contradiction, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--methods", "simsiam", "--peers-only", contradiction])
    assert exit_info.value.code == 2
    assert "--peers-only trains lightly's peers" in capsys.readouterr().err
