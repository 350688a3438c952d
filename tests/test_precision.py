"""Precision and speed options: float32 loss maths under bf16 autocast, a ``bf16-mixed`` (and channels-last)
fast_dev_run of every method's demo config on CPU, and the ``channels_last`` / ``compile`` method options."""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ssl_zoo.losses import (
    ImageAwareContrastiveLoss,
    KeyQueue,
    SupConLoss,
    SwappedPredictionLoss,
    SymmetricKLDivergence,
    WeightedAsymmetricLoss,
    masked_l1_loss,
    moco_v2_info_nce,
    moco_v3_info_nce,
    mpcl_total_loss,
    mvp_alignment_loss,
    projector_contrastive_regularization,
    ptb_weights,
    sinkhorn_knopp,
)
from ssl_zoo.methods import BAMIA, HVPMTL, MVP, MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
from ssl_zoo.methods.hvp_mtl import label_similarity
from ssl_zoo.models.acceleration import trunk_blocks

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


# ---------------------------------------------------------------------- losses under bf16 autocast
def _loss_cases() -> dict[str, tuple[Callable[..., Tensor], tuple]]:
    """Each loss of the package with inputs of the scale it sees in training (bool / integer inputs stay as they are)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    ids = torch.tensor([0, 0, 1, 1, 2, 3, 2, 4, 5, 5, 6, 7])
    codes = torch.softmax(r(12, 7), dim=1)
    return {
        "ia_closs": (ImageAwareContrastiveLoss(temperature=0.1), (r(12, 16), ids)),
        "supcon": (SupConLoss(temperature=0.1), (r(12, 16), ids)),
        "weighted_asl": (WeightedAsymmetricLoss(), (3 * r(6, 10), (torch.rand(6, 10, generator=g) < 0.3).float())),
        "sinkhorn": (sinkhorn_knopp, (F.normalize(r(12, 7), dim=1),)),  # cosines with unit prototypes
        "swapped_prediction": (SwappedPredictionLoss(temperature=0.1), (r(12, 7), r(12, 7), codes, codes.flip(0))),
        "masked_l1": (masked_l1_loss, (r(2, 3, 8, 8), r(2, 3, 8, 8), (torch.rand(2, 1, 8, 8, generator=g) < 0.6))),
        "mvp_all_tokens": (mvp_alignment_loss, (r(3, 5, 16), r(3, 5, 16))),
        "mvp_masked_tokens": (functools.partial(mvp_alignment_loss, mask=torch.rand(3, 4, generator=g) < 0.5),
                              (r(3, 5, 16), r(3, 5, 16))),
        "pcr": (projector_contrastive_regularization, (r(3, 6, 8),)),
        "ptb_weights": (ptb_weights, (torch.rand(3, generator=g),)),
        "mpcl_total": (mpcl_total_loss, (torch.rand(3, generator=g), r(3), torch.softmax(r(3), dim=0))),
        "moco_v2": (lambda q, k, queue: moco_v2_info_nce(q, k, queue)[0], (r(6, 8), r(6, 8), F.normalize(r(30, 8)))),
        "moco_v3": (lambda q, k: moco_v3_info_nce(q, k)[0], (r(6, 8), r(6, 8))),
        "symmetric_kl": (SymmetricKLDivergence(temperature=0.1), (r(4, 6), r(4, 6))),
        "hvp_label_similarity": (label_similarity, (r(4, 8), r(5, 8))),
    }


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("case", list(_loss_cases()))
def test_loss_math_stays_float32_under_bf16_autocast(case):
    """Under ``bf16-mixed`` a loss receives bf16 activations inside ``torch.autocast``: it must return float32
    and compute exactly what float32 maths gives on those (rounded) inputs."""
    fn, args = _loss_cases()[case]
    args_bf16 = _cast(args, torch.bfloat16)
    first = args_bf16[0].detach().requires_grad_(True)
    args_bf16 = (first, *args_bf16[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16_inputs = fn(*args_bf16)
        out_fp32_inputs = fn(*args)
    assert out_bf16_inputs.dtype == out_fp32_inputs.dtype == torch.float32
    # The same float32 maths as outside autocast: only the rounding of the inputs differs.
    torch.testing.assert_close(out_bf16_inputs, fn(*_cast(args_bf16, torch.float32)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_fp32_inputs, fn(*args), rtol=1e-6, atol=1e-6)
    # And close to the float32 result: bf16 rounds inputs by 2^-9 relative, amplified by 1/tau <= 20 here.
    torch.testing.assert_close(out_bf16_inputs, fn(*args), rtol=3e-2, atol=3e-2)
    if out_bf16_inputs.requires_grad:  # sinkhorn and ptb_weights are targets without gradient
        out_bf16_inputs.sum().backward()
        assert first.grad.dtype == torch.bfloat16 and torch.isfinite(first.grad.float()).all()


def test_key_queue_stores_float32_unit_keys_under_bf16_autocast():
    torch.manual_seed(0)
    queue, reference = KeyQueue(8, size=10), KeyQueue(8, size=10)
    reference.load_state_dict(queue.state_dict())
    keys = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        queue.enqueue(keys)
    reference.enqueue(keys.float())
    assert queue.keys.dtype == torch.float32
    torch.testing.assert_close(queue.keys, reference.keys, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(queue.keys[:4].norm(dim=1), torch.ones(4))


# ---------------------------------------------------------------------- bf16-mixed through the CLI
PRETRAINING_DIRS = ("bam_ia", "simsiam", "mocov2", "mocov3", "mpcl", "mvp", "hvp_mtl")
DEMO_CONFIGS = sorted(p for d in PRETRAINING_DIRS for p in (EXPERIMENTS / d).glob("demo*.yaml"))


def test_every_method_has_a_demo_config():
    assert {p.parent.name for p in DEMO_CONFIGS} == set(PRETRAINING_DIRS)
    classes = {yaml.safe_load(p.read_text())["model"]["class_path"] for p in DEMO_CONFIGS}
    assert classes == {f"ssl_zoo.methods.{c.__name__}" for c in (BAMIA, MPCLMoCoV2, MPCLMoCoV3, MVP, HVPMTL)}


def _small_model_args(config: Path) -> list[str]:
    """The config's model family at a fraction of its cost: bf16 convolutions are emulated on most CPUs."""
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    if init["backbone"].startswith("resnet"):  # one block per stage at 32 px
        return ["--model.init_args.img_size", "32",
                "--model.init_args.backbone_kwargs", '{"model_kwargs": {"layers": [1, 1, 1, 1]}}']
    return ["--model.init_args.backbone_kwargs", '{"img_size": 64, "model_kwargs": {"depth": 2}}']  # 2 ViT blocks


@pytest.mark.slow
@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_demo_config_fast_dev_run_in_bf16_mixed_on_cpu(config, demo_root, tmp_path):
    from ssl_zoo.cli import main

    data = yaml.safe_load(config.read_text())["data"]
    root = f"{demo_root}/folder" if data["class_path"].endswith("ImageFolderDataModule") else demo_root
    cli = main(["--config", str(config), "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "cpu",
                "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
                "--data.init_args.root", root, "--data.init_args.num_workers", "0",
                "--data.init_args.batch_size", "2", "--model.init_args.channels_last", "true",
                *_small_model_args(config)], run=False)
    # Autocast is on: the first linear layer of the trained network computes in bfloat16.
    linear = next(m for m in cli.model.backbone.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    dtypes: list[torch.dtype] = []
    linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert cli.trainer.precision == "bf16-mixed" and dtypes and dtypes[0] == torch.bfloat16
    # The Trainer ran the configure_model hook: the convolutions are channels-last (the GPU bf16 layout).
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in cli.model.backbone.parameters() if p.ndim == 4)
    losses = {k: v for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/loss")}
    assert "train/loss" in losses
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)


# ---------------------------------------------------------------------- channels_last and compile
def _tiny_resnet_simsiam(**options) -> BAMIA:
    torch.manual_seed(0)
    model = BAMIA(backbone="resnet18", backbone_kwargs={"model_kwargs": {"layers": [1, 1, 1, 1]}}, img_size=32,
                  proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, bam=False, ia_loss="none", **options)
    model.log = lambda *args, **kwargs: None  # outside a Trainer
    return model


def _loss_and_grads(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    torch.manual_seed(1)  # same pair order
    loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _simsiam_batch(n: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"views": torch.randn(n, 2, 3, 32, 32, generator=g), "block_ids": torch.zeros(n, 2, dtype=torch.long),
            "index": torch.arange(n)}


def _stem_input_layouts(backbone: nn.Module) -> list[bool]:
    """Records, per call, whether the stem convolution received a channels-last input."""
    stem = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    seen: list[bool] = []
    stem.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


def test_channels_last_gives_the_same_loss_and_gradients_on_a_conv_backbone():
    batch = _simsiam_batch(2)
    reference = _tiny_resnet_simsiam()
    model = _tiny_resnet_simsiam(channels_last=True)
    model.configure_model()
    model.configure_model()  # Lightning may call the hook again (fit, then validate): idempotent
    conv_weights = [p for p in model.backbone.parameters() if p.ndim == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    seen = _stem_input_layouts(model.backbone)

    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    assert seen == [True, True]  # both views, converted once each
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # NHWC convolutions sum in another order: equal up to float32 round-off. The round-off of a gradient is
    # relative to the magnitudes summed into it, not to its own size (a nearly cancelling one can be tiny), so
    # the floor is scaled by the largest gradient of the model.
    scale = max(g.norm() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-3 * g.norm() + 1e-5 * scale, name


def test_channels_last_reaches_the_ema_teacher():
    torch.manual_seed(0)
    model = MPCLMoCoV2(backbone="resnet18", backbone_kwargs={"model_kwargs": {"layers": [1, 1, 1, 1]}}, img_size=32,
                       num_projectors=2, projector_hidden_dims=16, proj_dim=8, queue_size=16, channels_last=True)
    model.configure_model()
    for backbone in (model.backbone, model.teacher_backbone):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in backbone.parameters() if p.ndim == 4)
    seen = _stem_input_layouts(model.teacher_backbone)
    model.keys(torch.randn(2, 3, 32, 32))
    assert seen == [True]


@pytest.mark.parametrize("cls", [BAMIA, MPCLMoCoV2, MPCLMoCoV3, MPCLBarlowTwins, MVP, HVPMTL], ids=lambda c: c.__name__)
def test_every_method_takes_the_speed_options_off_by_default(cls):
    params = inspect.signature(cls.__init__).parameters
    doc = inspect.getdoc(cls)
    for option in ("compile", "channels_last"):
        assert params[option].default is False and params[option].annotation in (bool, "bool")
        assert f"{option}:" in doc, f"{cls.__name__} does not document '{option}'"


def test_speed_options_parse_from_the_command_line():
    from ssl_zoo.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "simsiam/demo.yaml"), "--model.init_args.compile", "true",
              "--model.init_args.channels_last", "true", "--print_config"])
    assert exit_info.value.code in (0, None)
    init = yaml.safe_load(out.getvalue())["model"]["init_args"]
    assert init["compile"] is True and init["channels_last"] is True


@pytest.mark.slow
def test_compile_compiles_every_trunk_block_in_place_and_keeps_the_maths(monkeypatch):
    """``compile=True`` wraps each trunk block with ``torch.compile``; the traced step equals the eager one.

    The blocks are traced by TorchDynamo with its ``eager`` backend: generating Inductor's C++ kernels takes
    minutes on a CPU, the graph capture (what can break) takes seconds.
    """
    compile_module = nn.Module.compile
    compiled: list[nn.Module] = []

    def compile_with_eager_backend(self: nn.Module, *args, **kwargs) -> None:
        compiled.append(self)
        compile_module(self, backend="eager")

    monkeypatch.setattr(nn.Module, "compile", compile_with_eager_backend)
    tiny = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "model_kwargs": {"depth": 2}},
                img_size=32, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8, head_norm="layer", bam=False,
                ia_loss="none")
    torch.manual_seed(0)
    reference = BAMIA(**tiny)
    torch.manual_seed(0)
    model = BAMIA(**tiny, compile=True)
    for m in (reference, model):
        m.log = lambda *args, **kwargs: None
    keys = list(model.state_dict())
    model.configure_model()
    model.configure_model()  # idempotent

    blocks = trunk_blocks(model.backbone)
    assert len(blocks) == 2 and [id(b) for b in compiled] == [id(b) for b in blocks]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert list(model.state_dict()) == keys  # checkpoints and EMA copies see the same names

    batch = _simsiam_batch(2)
    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
