"""The paper-cost model: FLOPs against hand counts (a linear layer, a ResNet bottleneck, a transformer block),
parts of a step, live memory against a hand count, optimiser state against a real optimiser, the schedule
arithmetic, and a paper-size step that allocates no real activation."""

import json
import math

import pytest
import torch
from torch import nn

from benchmarks import paper_cost, paper_cost_jobs
from benchmarks.component_costs import peak_rss_mib, reset_peak_rss
from benchmarks.paper_cost_step import (
    build_on_meta,
    fake_mode,
    measure_step,
    optimizer_state_bytes,
    to_fake,
)

GIB = 2**30


def _fake(factory):
    mode = fake_mode()
    return to_fake(build_on_meta(factory), mode), mode


def _step(model, mode, shape, parts=None, precision=None, requires_grad=True):
    with mode:
        x = torch.empty(*shape, requires_grad=requires_grad)
    return measure_step(model, [x], lambda: model(x).float().sum(), precision, mode, parts or {"student": [model]})


def test_linear_layer_flops_equal_the_hand_count():
    b, d_in, d_out = 8, 64, 32
    model, mode = _fake(lambda: nn.Linear(d_in, d_out))
    cost = _step(model, mode, (b, d_in))
    matmul = 2 * b * d_in * d_out  # multiply-adds x 2
    assert cost.flops["student"] == {"forward": matmul, "backward": 2 * matmul}  # grad of input + of weight
    # Without a gradient for the input, the backward computes the weight's gradient only.
    cost = _step(model, mode, (b, d_in), requires_grad=False)
    assert cost.flops["student"] == {"forward": matmul, "backward": matmul}


def test_resnet_bottleneck_flops_equal_the_hand_count():
    from timm.models.resnet import Bottleneck

    b, c, s = 2, 256, 14  # ResNet-50's res2 block: 1x1 256->64, 3x3 64->64, 1x1 64->256, no downsampling
    model, mode = _fake(lambda: Bottleneck(inplanes=c, planes=64))
    cost = _step(model, mode, (b, c, s, s))
    forward = 2 * b * s * s * (c * 64 + 64 * 64 * 9 + 64 * c)
    assert cost.flops["student"] == {"forward": forward, "backward": 2 * forward}


@pytest.mark.parametrize("precision", [None, "bf16-mixed"])
def test_attention_block_flops_equal_the_hand_count(precision):
    from timm.models.vision_transformer import Block

    b, n, d = 2, 10, 64  # 4 heads of 16
    model, mode = _fake(lambda: Block(dim=d, num_heads=4, mlp_ratio=4.0))
    cost = _step(model, mode, (b, n, d), precision=precision)
    matmuls = 2 * b * n * d * (3 * d + d + 4 * d + 4 * d)  # qkv, output projection, MLP up and down
    attention = 2 * (2 * b * n * n * d)  # Q K^T and A V over all heads
    # Backward: input and weight gradients of every projection; attention recomputes Q K^T and runs 4 matmuls.
    assert cost.flops["student"] == {"forward": matmuls + attention, "backward": 2 * matmuls + 5 * attention // 2}


class _TeacherStudent(nn.Module):
    """A student backbone and head, a frozen teacher under no_grad, and a loss computed outside any module."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.backbone = nn.Linear(d, d)
        self.projector = nn.Linear(d, d)
        self.teacher_backbone = nn.Linear(d, d).requires_grad_(False)

    def step(self, x):
        z = self.projector(self.backbone(x))
        with torch.no_grad():
            t = self.teacher_backbone(x)
        return (z @ t.T).sum()  # [B, B] logits: the loss, outside every module


def test_flops_are_split_into_student_teacher_heads_and_losses():
    b, d = 16, 32
    model, mode = _fake(lambda: _TeacherStudent(d))
    with mode:
        x = torch.empty(b, d)
    cost = measure_step(model, [x], lambda: model.step(x), None, mode)
    linear = 2 * b * d * d
    logits = 2 * b * b * d
    assert cost.flops == {
        "student": {"forward": linear, "backward": linear},  # the input needs no gradient: weights only
        "teacher": {"forward": linear, "backward": 0},
        "heads": {"forward": linear, "backward": 2 * linear},
        "losses": {"forward": logits, "backward": logits},  # the gradient of z only (t is a target)
    }


def test_live_memory_peak_equals_the_hand_count():
    """Linear -> ReLU -> Linear in fp32; the peak is in ReLU's backward, where its saved output, the incoming
    gradient and the outgoing gradient [B, H] are alive at once (the weights' gradients are a few kB)."""
    b, d, h, o = 4096, 4, 256, 4
    model, mode = _fake(lambda: nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, o)))
    cost = _step(model, mode, (b, d), requires_grad=False)
    assert 3 * b * h * 4 <= cost.memory["activations"] <= 3 * b * h * 4 + 16 * 1024
    assert cost.memory["weights"] == sum(-(-p.numel() * 4 // 512) * 512 for p in model.parameters())
    assert cost.memory["batch"] == b * d * 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars"])
def test_optimizer_state_bytes_equal_a_real_optimizers_state(optimizer):
    from ssl_zoo.utils.optim import LARS

    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.1),
           "lars": lambda: LARS(params, lr=0.1, momentum=0.9)}[optimizer]()
    predicted = optimizer_state_bytes(opt)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    real = sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))
    assert predicted == real


def _job(trainer, batch_size=32, images=1000, classes=10):
    config = {"trainer": trainer, "model": {"class_path": "x.Y", "init_args": {}},
              "data": {"class_path": "x.Data", "init_args": {"batch_size": batch_size}}}
    dataset = paper_cost_jobs.Dataset("toy", images, classes)
    return paper_cost_jobs.Job(("toy.yaml",), (), "pretrain", config, dataset, images)


def test_schedule_and_projection_arithmetic():
    job = _job({"devices": 4, "num_nodes": 2, "max_epochs": 3, "accumulate_grad_batches": 2})
    assert job.world == 8
    assert job.micro_steps() == 3 * math.ceil(1000 / (32 * 8))  # every GPU's forward / backward passes
    assert job.optimizer_steps() == job.micro_steps() // 2
    assert _job({"devices": 1, "max_steps": 500, "accumulate_grad_batches": 4}).micro_steps() == 2000

    flops = 1e15
    cost = {"flops": {"student": {"forward": flops, "backward": 0}},
            "memory": {"total": 39 * GIB}}
    mfu = {gpu: {"bf16": 0.5, "tf32": 0.25} for gpu in paper_cost.PROJECTED}
    job.trainer["precision"] = "bf16-mixed"
    projection = paper_cost.project(job, cost, mfu)
    a100 = projection["A100-80GB"]
    assert a100["step_s"] == pytest.approx(flops / (312e12 * 0.5))
    assert a100["wall_h"] == pytest.approx(job.micro_steps() * a100["step_s"] / 3600)
    assert a100["gpu_h"] == pytest.approx(8 * a100["wall_h"])
    assert projection["fits"] == {"40 GB": True, "80 GB": True}  # 39 GiB + 1 GiB of CUDA context
    cost["memory"]["total"] = 39.5 * GIB
    assert paper_cost.project(job, cost, mfu)["fits"]["40 GB"] is False


def test_assumed_mfu_follows_the_published_throughput():
    mfu = paper_cost.assumed_mfu(25e9)
    assert mfu["A100-80GB"]["bf16"] == pytest.approx(2470 * 25e9 / 312e12)
    assert mfu["V100"]["32"] == pytest.approx(367 * 25e9 / 15.7e12)
    assert mfu["H100"] == mfu["A100-80GB"]  # no published H100 figure: the A100's is assumed


def test_a_paper_size_step_allocates_no_real_activation():
    """MVP ViT-B at its paper batch (256 per GPU): about 19 GiB of activations, none of them real."""
    job = paper_cost_jobs.load_job(("experiments/mvp/vitb16_in1k_300ep.yaml",))
    reset = reset_peak_rss()
    before = peak_rss_mib()
    cost = paper_cost_jobs.measure(job)
    assert cost["memory"]["activations"] > 15 * GIB
    if reset:  # /proc/self/clear_refs: the peak since the reset
        assert peak_rss_mib() - before < 1024  # MiB: weights and activations are all fake


@pytest.mark.slow
def test_command_writes_every_column(tmp_path):
    out = tmp_path / "paper_cost.json"
    paper_cost.main(["experiments/mocov2/r50_in100.yaml", "--no-checks", "--no-hvp", "--json", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["gpus"] == 4 and row["batch_per_gpu"] == 32 and row["train_images"] == 126_689
    assert set(row["flops"]) == {"student", "teacher", "heads", "losses"}
    assert row["flops"]["teacher"]["backward"] == 0 < row["flops"]["teacher"]["forward"]
    assert row["flops"]["student"]["backward"] > row["flops"]["student"]["forward"] > 0
    assert {"weights", "optimizer", "activations", "ddp_buckets", "total"} <= set(row["memory"])
    assert row["optimizer_steps"] == 200 * math.ceil(126_689 / 128)
    assert row["A100-80GB"]["gpu_h"] > row["H100"]["gpu_h"] > 0
    assert report["gpu_measurement"] == paper_cost.gpu_measurements()


def test_flops_total_equals_flop_counter_mode():
    """The parts add up to what torch's own FlopCounterMode counts for the same step."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    model, mode = _fake(lambda: timm.create_model("resnet18", num_classes=10))
    cost = _step(model, mode, (2, 3, 64, 64))
    with mode, FlopCounterMode(display=False) as counter:
        x = torch.empty(2, 3, 64, 64, requires_grad=True)
        model(x).float().sum().backward()
    assert cost.total_flops == counter.get_total_flops()


def _report_row(config, role, tflop, peak_gib, fits_40, a100_h, h100_h):
    half = tflop * 1e12 / 2
    return {"config": config, "role": role, "gpus": 8, "batch_per_gpu": 32, "accumulate": 1,
            "flops": {"student": {"forward": half, "backward": half}, "teacher": {"forward": 0, "backward": 0},
                      "heads": {"forward": 0, "backward": 0}, "losses": {"forward": 0, "backward": 0}},
            "memory": {"weights": GIB, "all_gradients": GIB, "ddp_buckets": 0, "optimizer": GIB,
                       "activations": GIB, "total": peak_gib * GIB},
            "fits": {"40 GB": fits_40, "80 GB": True}, "optimizer_steps": 1000,
            "A100-80GB": {"wall_h": a100_h / 8, "gpu_h": a100_h}, "H100": {"wall_h": h100_h / 8, "gpu_h": h100_h}}


def test_summary_and_markdown_file_are_rendered_from_the_json(tmp_path):
    """--summary groups the rows by the folder of their first config and sums their GPU-hours (hand-computed
    below); --markdown writes the --table Markdown to a file; neither measures anything."""
    from benchmarks.paper_cost_table import markdown, summary_table

    report = {"gpu_measurement": None, "checks": [], "hvp_head": [],
              "assumptions": {"mfu": {"A100-80GB": {"bf16": 0.2}}, "mfu_source": "test",
                              "resnet50_train_flops_per_image": 24.3e9, "mfu_h100": "the A100's"},
              "rows": [_report_row("mvp/a.yaml", "pretrain", 36.0, 20.0, True, 250.0, 80.0),
                       _report_row("mvp/b.yaml+mvp/ablations/c.yaml", "pretrain", 104.0, 53.0, False, 700.0, 220.0),
                       _report_row("eval/d.yaml", "eval", 9.0, 1.5, True, 19.0, 6.0)]}
    lines = summary_table(report).splitlines()
    assert lines[2] == "| mvp | 2 | 36.00-104.00 | 20.0-53.0 | 1 of 2 | 2 of 2 | 950 | 300 |"
    assert lines[3] == "| eval | 1 | 9.00 | 1.5 | 1 of 1 | 1 of 1 | 19 | 6.0 |"
    assert lines[4] == "| **pre-training chains** | 2 | 36.00-104.00 | 20.0-53.0 | 1 of 2 | 2 of 2 | 950 | 300 |"
    assert lines[5] == "| **evaluation / transfer chains** | 1 | 9.00 | 1.5 | 1 of 1 | 1 of 1 | 19 | 6.0 |"
    assert lines[6] == "| **all** | 3 | 9.00-104.00 | 1.5-53.0 | 2 of 3 | 3 of 3 | 969 | 306 |"

    source, out = tmp_path / "paper_cost.json", tmp_path / "paper_cost.md"
    source.write_text(json.dumps(report))
    assert paper_cost.main(["--json", str(source), "--markdown", str(out)]) == report
    assert out.read_text() == markdown(report) + "\n"
    assert "| mvp/b.yaml+mvp/ablations/c.yaml | 8 x 32 | 52.00 | 52.00 |" in out.read_text()
