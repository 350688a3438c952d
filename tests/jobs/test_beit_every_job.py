"""MVP's own architecture through every downstream job: a tiny BEiT in the paper's layout (one relative position
bias table shared by all blocks, no absolute position embedding, layer scale, the CLS token after the final
norm), pre-trained one step by ``make pretrain METHOD=mvp``, then ``make linear | knn | gamp | finetune | detect |
segment CKPT=...`` exactly as the run summary prints them, each shortened to one or two steps, each appending
its record to the run's ``eval.json``.

Detection builds the BEiT for the largest padded batch (its window is fixed) and segmentation for the demo
crops; both copy the shared relative position table into per-block ones where the layout asks for it and
interpolate the tables to the new window.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from ssl_zoo.cli import main
from ssl_zoo.eval.results import read_eval_records
from tests.jobs.test_eval_every_method import BACKBONE_KWARGS, config_of, data_overrides, make_command

BEIT_MVP_LAYOUT = ('{"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 96, "num_heads": 3, "init_values": 0.1, '
                   '"use_shared_rel_pos_bias": true, "use_rel_pos_bias": false, "use_abs_pos_emb": false, '
                   '"global_pool": "token"}}')
#: job -> (the protocol its eval.json record names, the overrides that shorten it to a step or two)
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
DENSE_SHORT = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"]
JOBS = {
    "linear": ("linear", SHORT),
    "knn": ("knn", ["--trainer.limit_val_batches", "1"]),
    "gamp": ("multilabel_linear", SHORT),
    "finetune": ("finetune", SHORT),
    "detect": ("detection", DENSE_SHORT),
    "segment": ("segmentation", DENSE_SHORT),
}


@pytest.fixture(scope="module")
def beit_mvp_checkpoint(demo_root, tmp_path_factory):
    command = make_command("pretrain", "METHOD=mvp")
    run_dir = tmp_path_factory.mktemp("mvp_beit")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([*command, *data_overrides(config_of(command), demo_root), "--trainer.max_epochs", "1",
              "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(run_dir),
              "--model.init_args.backbone", "beit_base_patch16_224", BACKBONE_KWARGS, BEIT_MVP_LAYOUT])
    return run_dir / "checkpoints" / "last.ckpt", printed.getvalue()


def _dense_overrides(job: str, demo_root: str) -> list[str]:
    root = demo_root if job == "detect" else f"{demo_root}/ADEChallengeData2016"
    return ["--data.init_args.root", root, "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
def test_a_beit_mvp_checkpoint_goes_through_every_job(beit_mvp_checkpoint, demo_root, tmp_path):
    ckpt, printed = beit_mvp_checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "backbone.model.rel_pos_bias.relative_position_bias_table" in state  # the paper's layout
    assert not any(k.startswith("backbone.model.pos_embed") for k in state)
    for job, (_protocol, short) in JOBS.items():
        match = re.search(rf"make {job} CKPT=(\S+)", printed)
        assert match and match.group(1) == str(ckpt), (job, printed)
        command = make_command(job, f"CKPT={ckpt}")
        assert "--model.init_args.backbone" not in command  # everything comes from the checkpoint
        overrides = _dense_overrides(job, demo_root) if job in ("detect", "segment") else \
            data_overrides(config_of(command), demo_root)
        cli = main([*command, *overrides, *short, "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path / job)])
        backbone = cli.model.backbone
        assert backbone.family == "beit" and backbone.name == "beit_base_patch16_224", job
        loss = cli.trainer.callback_metrics.get("train/loss")
        assert loss is None or torch.isfinite(loss), (job, loss)
    records = read_eval_records(ckpt.parent.parent / "eval.json")
    assert [r["protocol"] for r in records] == [protocol for protocol, _ in JOBS.values()]
    for record in records:
        assert record["backbone"] == "beit_base_patch16_224" and record["ckpt"] == str(ckpt.resolve())
        assert record["metrics"] and all(v is None or v == v for v in record["metrics"].values())
