"""``python -m ssl_zoo.checkpoints.convert``: a published checkpoint written as one every job takes without a name."""

from __future__ import annotations

import torch

from ssl_zoo.checkpoints import load_backbone, read_backbone_weights
from ssl_zoo.checkpoints.convert import main as convert_main
from tests.helpers.official_models import (
    IMG,
    assert_features_close,
    mocov3_vit_small_file,
    seeded_images,
    timm_pre_logits,
)


def test_convert_writes_a_checkpoint_every_job_takes_without_a_name(tmp_path, capsys):
    model, path = mocov3_vit_small_file(tmp_path)
    out = tmp_path / "converted" / "mocov3_vits.pth"
    assert convert_main([path, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layout mocov3, student: base_encoder.*" in printed and "momentum_encoder.*" in printed
    assert "vit_small_patch16_224" in printed and "num_heads: 12" in printed and f"wrote {out}" in printed
    converted = read_backbone_weights(out)
    assert converted.is_pretraining_checkpoint and converted.name == "vit_small_patch16_224"
    assert converted.img_size == IMG
    x = seeded_images()
    assert_features_close(load_backbone(out).eval()(x), timm_pre_logits(model.base_encoder, x))
    # an unknown file: one line, exit status 2
    bad = tmp_path / "bad.pth"
    torch.save({"net": {"stem.weight": torch.randn(2)}}, bad)
    assert convert_main([str(bad), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1
