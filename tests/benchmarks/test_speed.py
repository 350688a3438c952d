"""Speed benchmarks: each entry point runs with tiny sizes and writes the JSON it promises, and the compute
limit mirrors what each method really encodes. Correctness only: no timing is ever asserted."""

import json
import math
import statistics
import warnings

import pytest
import torch
from torch import nn

from benchmarks import component_costs, cpu_threads, data_pipeline, quality, step_overhead
from benchmarks.timing import median_time, paired_medians, peak_flops

PROMISED_STEP_KEYS = {"method", "images_per_s", "step_s", "limit_s", "ratio"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _input_layer(network: nn.Module) -> nn.Module:
    """The layer every image entering a timm ResNet / ViT or an open_clip tower passes through once."""
    for name in ("patch_embed", "conv1"):
        if hasattr(network, name):
            return getattr(network, name)
    raise AssertionError(f"no input layer found on {type(network).__name__}")


def _record_input_shapes(layer: nn.Module, shapes: list) -> torch.utils.hooks.RemovableHandle:
    return layer.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(step_overhead.METHODS))
def test_limit_encodes_exactly_the_views_the_method_encodes(method, demo_root):
    model, batch, n = step_overhead.load_method(method, batch_size=2, demo_root=demo_root)
    assert n == 2
    limit = step_overhead.method_limit(model, batch)

    # The method's own step: every image through the student's and each teacher's input layer.
    teacher = getattr(model, "teacher_backbone", None)
    teacher_net = getattr(teacher, "visual", None) or getattr(teacher, "model", None) or getattr(
        getattr(teacher, "backbone", None), "model", None)
    student_seen, teacher_seen = [], []
    hooks = [_record_input_shapes(_input_layer(model.backbone.model), student_seen)]
    if teacher_net is not None:
        hooks.append(_record_input_shapes(_input_layer(teacher_net), teacher_seen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer
        model.training_step(batch, 0)
    for hook in hooks:
        hook.remove()

    assert sorted(student_seen) == sorted(tuple(x.shape) for x in limit.student_inputs)
    assert sorted(teacher_seen) == sorted(tuple(x.shape) for _, x in limit.teachers)
    assert limit.student_views == sum(s[0] for s in student_seen)

    # The bare step back-propagates into the copy of the student only.
    limit.step()
    grads = [p.grad for p in limit.student.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert limit.student is not model.backbone.model


def test_limit_flops_are_student_forward_backward_plus_teacher_forward():
    from benchmarks.step_overhead import ComputeLimit, count_flops

    student, teacher = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
    limit = ComputeLimit(student, [torch.randn(3, 8)], [(teacher, torch.randn(5, 8))])
    # forward 2*3*8*4, weight gradient 2*3*8*4 (inputs need no gradient), teacher forward 2*5*8*4
    assert count_flops(limit.step) == 2 * 3 * 8 * 4 * 2 + 2 * 5 * 8 * 4


@pytest.mark.slow
def test_step_overhead_writes_the_promised_json(demo_root, tmp_path):
    out = tmp_path / "step.json"
    step_overhead.main(["--method", "mocov2", "lightly_moco", "--batch-size", "2", "--rounds", "1", "--steps",
                        "1", "--warmup", "0", "--threads", "1", "--peak-tflops", "1", "--demo-root", demo_root,
                        "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["environment"]["threads"] == 1
    rows = {row["method"]: row for row in report["results"]}
    assert set(rows) == {"mocov2", "lightly_moco"}
    assert rows["lightly_moco"]["compared_with"] == "mocov2"
    for row in rows.values():
        assert PROMISED_STEP_KEYS <= set(row)
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("step_s", "limit_s", "module_step_s"))
        assert len(row["trainer_pairs"]) == len(row["module_pairs"]) == 1  # 1 round x 1 step
        assert row["batch_size"] == 2 and row["peak_tflops"] == 1.0  # the figures' derivation: test below
        # MoCo v2: the query view through the student, the key view through the momentum encoder
        assert row["student_views_per_step"] == row["teacher_views_per_step"] == 2
        assert row["flops_step"] > row["flops_limit"] > 0
    # the same backbone and views: the same unavoidable compute
    assert rows["mocov2"]["flops_limit"] == rows["lightly_moco"]["flops_limit"]
    table = step_overhead.markdown_table(report).splitlines()
    assert len(table) == 2 + 2 and "lightly_moco (peer of mocov2)" in table[3]


@pytest.mark.slow  # two short runs of the command line, each in a fresh interpreter
def test_cpu_threads_runs_both_settings_on_the_users_command(demo_root, tmp_path):
    out = tmp_path / "threads.json"
    cpu_threads.main(["--configs", "experiments/mocov2/cpu.yaml", "--batches", "3", "--repeats", "1", "--json",
                      str(out), "--args", "--data.init_args.root", f"{demo_root}/folder", "--data.init_args.num_workers",
                      "1", "--data.init_args.batch_size", "4", "--trainer.log_every_n_steps", "1"])
    report = json.loads(out.read_text())
    row = report["configs"]["experiments/mocov2/cpu.yaml"]
    for setting in ("threads0", "threads1"):
        assert len(row[setting]["runs"]) == 1  # one per repeat
        assert all(run["wall_s"] > 0 and run["images_per_s"] > 0 for run in row[setting]["runs"])
        median = statistics.median(r["images_per_s"] for r in row[setting]["runs"])
        assert row[setting]["images_per_s"] == pytest.approx(median, abs=0.05)
    assert row["speedup"] == round(row["threads1"]["images_per_s"] / row["threads0"]["images_per_s"], 2)
    # every CPU recipe and every demo is in the default list
    listed = cpu_threads.default_configs()
    assert "experiments/mocov3/cpu_vit.yaml" in listed and "experiments/hvp_mtl/demo.yaml" in listed
    assert len(listed) == 2 * len(quality.METHODS) + 1


def test_component_costs_writes_components_teacher_share_and_memory(demo_root, tmp_path):
    out = tmp_path / "components.json"
    component_costs.main(["--sinkhorn-batch", "16", "--prototypes", "30", "--ia-views", "32", "--ia-dim", "8",
                          "--queue-size", "64", "--queue-dim", "8", "--queue-batch", "4", "--batch-size", "2",
                          "--repeats", "1", "--threads", "1", "--memory-methods", "--demo-root", demo_root,
                          "--json", str(out)])
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["components"]]
    assert names == ["sinkhorn_knopp", "ia_closs", "queue_enqueue", "moco_v2_loss_with_queue"]
    for c in report["components"]:
        assert c["seconds"] > 0 and c["reference"]["seconds"] > 0 and c["vs_reference"] > 0
    share = report["mvp_teacher_share"]
    assert share["batch_size"] == 2 and 0 < share["teacher_share"]
    assert report["peak_memory"] == []  # no methods asked for
    assert len(component_costs.markdown_tables(report).splitlines()) == 2 + 4 + 2


@pytest.mark.slow  # a fresh interpreter imports torch, Lightning and the methods
def test_peak_memory_runs_each_method_in_a_fresh_process(demo_root):
    (memory,) = component_costs.peak_memory(["mocov2"], batch_size=2, steps=1, device="cpu", demo_root=demo_root)
    assert memory["method"] == "mocov2" and memory["batch_size"] == 2
    assert memory["peak_rss_mib"] >= memory["rss_before_steps_mib"] > 0 and memory["rss_after_import_mib"] > 0
    assert memory["step_rss_increase_mib"] == pytest.approx(memory["peak_rss_mib"] - memory["rss_before_steps_mib"])
    # the child's own address space, not the parent's high-water mark (ru_maxrss would survive the exec)
    assert memory["peak_rss_while_building_mib"] >= memory["rss_after_import_mib"]


@pytest.mark.slow
def test_data_pipeline_counts_views_on_the_photographs(tmp_path):
    out = tmp_path / "data.json"
    data_pipeline.main(["--size", "32", "--rounds", "1", "--passes", "1", "--shard-copies", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert {im["file"] for im in report["images"]} >= {"china.jpg", "flower.jpg"}
    expected = {"bam": 8, "simsiam": 2, "lightly_simsiam": 2, "mocov2": 2, "lightly_mocov2": 2, "mvp": 1, "hvp_mtl": 2}
    for kind in ("bytes", "decoded"):
        rows = [r for r in report["results"] if r["input"] == kind]
        assert {r["transform"]: r["views_per_call"] for r in rows} == expected
        peers = {r["transform"]: r["lightly_peer"] for r in rows if r["speedup_vs_lightly"] is not None}
        assert peers == {"simsiam": "lightly_simsiam", "mocov2": "lightly_mocov2"}
    for r in report["results"]:
        assert r["views_per_s_per_core"] == pytest.approx(r["images_per_s_per_core"] * r["views_per_call"])
    assert len(data_pipeline.markdown_table(report).splitlines()) == 2 + 2 * 7
    shards = report["shards"]
    assert shards["images"] == 2 * len(report["images"])  # every copy converted and read back
    assert set(shards["read_images_per_s"]) == {"files", "shards", "files+decode", "shards+decode"}
    assert shards["conversion"][0]["num_workers"] == 1


def test_median_time_runs_warmup_then_repeats():
    calls = []
    seconds = median_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and seconds >= 0
    with pytest.raises(ValueError, match="repeats"):
        median_time(lambda: None, repeats=0)


def test_paired_medians_alternate_the_two_functions():
    order = []
    first_s, second_s, ratio = paired_medians(lambda: order.append("a"), lambda: order.append("b"), repeats=3,
                                              warmup=1)
    assert order == ["a", "b"] * 4
    assert first_s > 0 and second_s > 0 and ratio > 0


def test_peak_flops_override_table_and_unknown(monkeypatch):
    assert peak_flops(torch.device("cpu"), "32") is None
    assert peak_flops(torch.device("cpu"), "bf16", override_tflops=2.5) == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda"), "bf16") == 756e12  # the PCIe card, not the SXM figure
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), "bf16") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda"), "32") is None


def test_trunk_blocks_of_bare_networks():
    import timm

    resnet = timm.create_model("resnet18", num_classes=0)
    assert step_overhead.trunk_blocks(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
    assert step_overhead.trunk_blocks(vit) == list(vit.blocks)
    with pytest.raises(TypeError, match="no repeated blocks"):
        step_overhead.trunk_blocks(nn.Linear(2, 2))


# ---------------------------------------------------------------------- derived figures from known timings
def test_step_overhead_derives_its_figures_from_known_timings(monkeypatch, demo_root):
    """Timings replaced by hand-picked (limit_s, step_s) pairs and FLOP counts: every derived figure is known."""
    trainer_pairs = [(1.0, 2.0), (1.0, 3.0), (2.0, 3.0)]  # ratios 2, 3, 1.5
    module_pairs = [(1.0, 1.5), (2.0, 2.0), (1.0, 1.25)]  # ratios 1.5, 1, 1.25
    flops = iter([6e12, 4e12])  # the module step, then the limit
    monkeypatch.setattr(step_overhead, "trainer_step_pairs", lambda *a, **k: list(trainer_pairs))
    monkeypatch.setattr(step_overhead, "module_step_pairs", lambda *a, **k: list(module_pairs))
    monkeypatch.setattr(step_overhead, "count_flops", lambda fn: next(flops))
    row = step_overhead.measure("mocov2", batch_size=4, rounds=1, steps=1, warmup=0, peak_tflops=2.0,
                                demo_root=demo_root)
    assert row["step_s"] == 3.0  # median of 2, 3, 3
    assert row["module_step_s"] == 1.5  # median of 1.5, 2, 1.25
    assert row["limit_s"] == 1.0  # median of the six limits 1, 1, 2, 1, 2, 1
    assert row["ratio"] == 2.0 and row["module_ratio"] == 1.25
    assert row["lightning_share"] == pytest.approx((2.0 - 1.25) / 2.0)
    assert row["images_per_s"] == pytest.approx(4 / 3.0)
    assert row["achieved_tflops_step"] == pytest.approx(2.0) and row["achieved_tflops_limit"] == pytest.approx(4.0)
    assert row["mfu"] == pytest.approx(1.0) and row["mfu_limit"] == pytest.approx(2.0)


def test_component_costs_put_each_timing_in_its_field(monkeypatch, demo_root):
    monkeypatch.setattr(component_costs, "paired_medians", lambda first, second, *a, **k: (0.5, 2.0, 0.3))
    component = component_costs._component("x", "what", lambda: None, "ref", lambda: None, 1, torch.device("cpu"))
    assert (component["seconds"], component["reference"]["seconds"], component["vs_reference"]) == (0.5, 2.0, 0.3)
    share = component_costs.mvp_teacher_share({}, 2, 1, torch.device("cpu"), demo_root=demo_root)
    assert (share["teacher_s"], share["step_s"], share["teacher_share"]) == (0.5, 2.0, 0.3)
