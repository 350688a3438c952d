"""Speed options (``ssl_zoo.models.acceleration``): ``channels_last`` gives the same loss and gradients and
reaches the EMA teacher; ``compile`` wraps every trunk block in place and keeps the maths; both off by default."""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from ssl_zoo.methods import BAMIA, HVPMTL, MVP, MPCLBarlowTwins, MPCLMoCoV2, MPCLMoCoV3
from ssl_zoo.models.acceleration import trunk_blocks

ROOT = Path(__file__).resolve().parents[2]


EXPERIMENTS = ROOT / "experiments"


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
