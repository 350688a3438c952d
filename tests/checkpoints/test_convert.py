"""``python -m ssl_zoo.checkpoints.convert``: a published checkpoint written as one every job takes without a name."""

from __future__ import annotations

import torch

from ssl_zoo.checkpoints import load_backbone, read_backbone_weights
from ssl_zoo.checkpoints.convert import main as convert_main
from tests.helpers import official_models as official

IMG = 32  # a 2 x 2 patch grid keeps every model small; the 768-wide ones have one block


def _images(seed: int = 0, size: int = IMG) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _ddp(state: dict) -> dict:
    """What ``DistributedDataParallel(model).state_dict()`` saves: every key under ``module.``."""
    return {f"module.{k}": v for k, v in state.items()}


def _mocov3_vit_small_file(tmp_path) -> tuple[official.MoCoV3, str]:
    torch.manual_seed(1)
    model = official.MoCoV3(official.mocov3_vit_small, "head")
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": _ddp(model.state_dict()), "optimizer": {},
                "scaler": {}}, path)
    return model, str(path)


def _timm_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_convert_writes_a_checkpoint_every_job_takes_without_a_name(tmp_path, capsys):
    model, path = _mocov3_vit_small_file(tmp_path)
    out = tmp_path / "converted" / "mocov3_vits.pth"
    assert convert_main([path, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layout mocov3, student: base_encoder.*" in printed and "momentum_encoder.*" in printed
    assert "vit_small_patch16_224" in printed and "num_heads: 12" in printed and f"wrote {out}" in printed
    converted = read_backbone_weights(out)
    assert converted.is_pretraining_checkpoint and converted.name == "vit_small_patch16_224"
    assert converted.img_size == IMG
    _close(load_backbone(out).eval()(_images()), _timm_features(model.base_encoder, _images()))
    # an unknown file: one line, exit status 2
    bad = tmp_path / "bad.pth"
    torch.save({"net": {"stem.weight": torch.randn(2)}}, bad)
    assert convert_main([str(bad), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1
