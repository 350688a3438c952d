"""Every evaluation job runs on a checkpoint of every method, naming no backbone: the architecture, its
arguments and the input size come from the checkpoint.

The commands are the Makefile's own (``make -n pretrain METHOD=...`` / ``make -n <job> CKPT=...``, i.e.
``python -m ssl_zoo ...``, whose entry point is :func:`ssl_zoo.cli.main`), run in-process with overrides that
only shrink them: one pre-training step on a tiny demo set, then ``fast_dev_run`` for each job. Each
method pre-trains once (a module-scoped fixture); the next commands its run summary prints are the ones run.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from ssl_zoo.checkpoints import STUDENT_PREFIX, read_backbone_weights
from ssl_zoo.cli import main
from ssl_zoo.eval.module import resolve_eval_backbone

ROOT = Path(__file__).resolve().parents[2]
METHODS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/demo.yaml"))
#: The Makefile's evaluation targets and the metric each reports on the demo data.
JOBS = {"linear": "val/top1", "gamp": "val/mAP", "finetune": "val/top1", "knn": "val/top1"}
#: The transfer jobs the run summary also names (run on every method's checkpoint in tests/jobs/test_transfer_runs.py).
TRANSFER_JOBS = ("detect", "segment")

# Overrides that only make the demo runs smaller: one step, 4 images, 32 px for the ResNets, 2-block ViTs (at
# 32 px for mocov3), a 1-block-per-stage Swin for hvp_mtl's second encoder. The jobs must read the depth, the
# window and the input size from the checkpoint: the demo configs and the defaults say otherwise.
# Beyond the demo configs, the other kinds of backbone the configs pre-train: the CPU recipes' quarter-width
# ResNet-18 and ViT with 8 px patches (cpu.yaml), and MVP's BEiT with a shared relative position bias and no
# absolute position embedding (the paper configs' student).
BACKBONE_KWARGS = "--model.init_args.backbone_kwargs"
VIT_32 = '{"img_size": 32, "model_kwargs": {"depth": 2}}'
VIT_64 = '{"img_size": 64, "model_kwargs": {"depth": 2}}'
VIT8_32 = '{"img_size": 32, "model_kwargs": {"patch_size": 8, "embed_dim": 96, "depth": 2, "num_heads": 3}}'
SWIN_64 = '{"img_size": 64, "model_kwargs": {"window_size": 2, "depths": [1, 1, 1, 1]}}'
BEIT_64 = ('{"img_size": 64, "model_kwargs": {"depth": 2, "embed_dim": 96, "num_heads": 3, "use_shared_rel_pos_bias": '
           'true, "use_rel_pos_bias": false, "use_abs_pos_emb": false, "global_pool": "token"}}')
#: variant -> (the `make pretrain` arguments, overrides that shrink the run)
VARIANTS = {
    **{method: ((f"METHOD={method}",), ["--model.init_args.img_size", "32"])
       for method in ("bam_ia", "simsiam", "mpcl", "mocov2")},
    "mocov3": (("METHOD=mocov3",), ["--model.init_args.img_size", "32", BACKBONE_KWARGS, VIT_32]),
    "mvp": (("METHOD=mvp",), [BACKBONE_KWARGS, VIT_64]),
    "hvp_mtl": (("METHOD=hvp_mtl",), [BACKBONE_KWARGS, VIT_64]),
    "hvp_mtl_swin": (("METHOD=hvp_mtl",), ["--model.init_args.backbone", "swin_tiny_patch4_window7_224",
                                           BACKBONE_KWARGS, SWIN_64]),
    "mvp_beit": (("METHOD=mvp",), ["--model.init_args.backbone", "beit_base_patch16_224", BACKBONE_KWARGS, BEIT_64]),
    "simsiam_cpu": (("METHOD=simsiam", "CONFIG=experiments/simsiam/cpu.yaml"), []),
    "mocov3_cpu_vit": (("METHOD=mocov3", "CONFIG=experiments/mocov3/cpu_vit.yaml"), [BACKBONE_KWARGS, VIT8_32]),
}


def test_every_method_has_a_variant_here():
    assert {args[0].removeprefix("METHOD=") for args, _ in VARIANTS.values()} == set(METHODS)


def make_command(*args: str) -> list[str]:
    """The ``python -m ssl_zoo`` arguments ``make <args>`` runs (``make -n``: printed, not run)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-s", "-n", "-o", ".venv/.ssl_zoo-installed", "-o", "data/demo/.complete", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(line for line in out.splitlines() if " -m ssl_zoo " in line)
    words = shlex.split(line)
    return words[words.index("ssl_zoo") + 1:]


def data_overrides(config: str, demo_root: str) -> list[str]:
    """Arguments that run ``config`` (a path under the repository) on the tiny demo set, 4 images a batch."""
    data = yaml.safe_load((ROOT / config).read_text())["data"]
    root = f"{demo_root}/folder" if data["class_path"].endswith("ImageFolderDataModule") else demo_root
    return ["--data.init_args.root", root, "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def config_of(command: list[str]) -> str:
    """The ``--config`` file a ``python -m ssl_zoo`` command names."""
    return command[command.index("--config") + 1]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pretrained(request, demo_root, tmp_path_factory):
    """One pre-training step of a method's demo config; its checkpoint and the summary the run printed."""
    make_args, extra = VARIANTS[request.param]
    command = make_command("pretrain", *make_args)
    run_dir = tmp_path_factory.mktemp(request.param)
    printed = io.StringIO()  # capsys is per test, this fixture per module
    with contextlib.redirect_stdout(printed):
        main([*command, *data_overrides(config_of(command), demo_root), "--trainer.max_epochs", "1",
              "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(run_dir), *extra])
    return request.param, run_dir / "checkpoints" / "last.ckpt", printed.getvalue()


@pytest.mark.slow
def test_pretraining_summary_names_the_run_and_the_next_commands(pretrained):
    name, ckpt, printed = pretrained
    summary = printed[printed.index("── run summary"):]
    assert f"run directory  {ckpt.parent.parent}" in summary
    assert f"last           {ckpt}" in summary
    assert re.search(r"best +\S+/checkpoints/best-epoch000\.ckpt \(train/loss_epoch -?\d", summary), summary
    assert re.search(r"metrics +.*train/loss_epoch -?\d", summary), summary
    for job in (*JOBS, *TRANSFER_JOBS):
        assert f"make {job} CKPT={ckpt}\n" in summary + "\n", summary


def _next_command(printed: str, job: str) -> tuple[str, ...]:
    """``make <job> CKPT=...`` as the pre-training summary printed it."""
    match = re.search(rf"(make {job} CKPT=\S+)", printed)
    assert match, printed
    return tuple(match.group(1).split()[1:])


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_evaluation_job_runs_on_the_checkpoint_without_naming_a_backbone(pretrained, job, demo_root, tmp_path,
                                                                         capsys):
    name, ckpt, printed = pretrained
    command = make_command(*_next_command(printed, job))
    assert "--model.init_args.backbone" not in command and "--model.init_args.img_size" not in command
    assert command[command.index("--model.init_args.ckpt") + 1] == str(ckpt)
    config = yaml.safe_load((ROOT / config_of(command)).read_text())
    assert "backbone" not in (config["model"].get("init_args") or {})  # the demo config fixes none

    cli = main([*command, *data_overrides(config_of(command), demo_root), "--trainer.fast_dev_run", "1",
                "--trainer.default_root_dir", str(tmp_path)])

    weights = read_backbone_weights(ckpt)
    model = cli.model
    assert model.backbone.name == weights.name and model.hparams.backbone == weights.name
    assert model.hparams.img_size == weights.img_size == cli.datamodule.eval_size
    assert model.hparams.teacher is False
    own = model.backbone.model.state_dict()
    assert own.keys() == weights.state_dict.keys()
    for key, value in weights.state_dict.items():
        assert own[key].shape == value.shape, key
        if job != "finetune":  # frozen: exactly the checkpoint's student weights
            assert torch.equal(own[key], value), key
    metrics = cli.trainer.callback_metrics
    assert JOBS[job] in metrics and torch.isfinite(metrics[JOBS[job]])

    summary = capsys.readouterr().out
    summary = summary[summary.index("── run summary"):]
    assert f"evaluated      {ckpt}" in summary and "fast_dev_run" in summary
    others = [other for other in (*JOBS, *TRANSFER_JOBS) if other != job]
    assert all(f"make {other} CKPT={ckpt}" in summary for other in others), summary


# ----------------------------------------------------------------------------------- settings, contradictions
def _vit_checkpoint(path: Path, img_size: int = 32, depth: int = 2) -> Path:
    from ssl_zoo.models import Backbone

    kwargs = {"img_size": img_size, "model_kwargs": {"depth": depth}}
    student = Backbone("vit_tiny_patch16_224", **kwargs)
    state = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "vit_tiny_patch16_224",
                                                          "backbone_kwargs": kwargs, "img_size": img_size}}, path)
    return path


def test_settings_come_from_the_checkpoint_unless_given(tmp_path):
    ckpt = _vit_checkpoint(tmp_path / "last.ckpt")
    resolved = resolve_eval_backbone(str(ckpt))
    assert (resolved.img_size, resolved.teacher, resolved.backbone.name) == (32, False, "vit_tiny_patch16_224")
    assert len(resolved.backbone.model.blocks) == 2 and resolved.backbone.model.pos_embed.shape[1] == 1 + 2 * 2
    with pytest.warns(UserWarning, match="resampled"):
        wider = resolve_eval_backbone(str(ckpt), img_size=64)  # another resolution is allowed: resampled
    assert wider.img_size == 64 and wider.backbone.model.pos_embed.shape[1] == 1 + 4 * 4
    # A plain timm state dict records no hyper-parameters: the ViT's input size is read off its pos_embed.
    plain = tmp_path / "plain.pth"
    torch.save({k[len(STUDENT_PREFIX):]: v for k, v in torch.load(ckpt)["state_dict"].items()}, plain)
    assert read_backbone_weights(plain).img_size == 32


def test_an_evaluation_checkpoint_records_what_it_evaluated(tmp_path):
    """The resolved settings are written to the probe's hyper-parameters, so its own checkpoint (the same
    ``backbone.model.*`` layout) loads as a backbone again, e.g. to run kNN on a fine-tuned network."""
    from ssl_zoo.checkpoints import load_backbone
    from ssl_zoo.eval import FineTune

    tuned = FineTune(ckpt=str(_vit_checkpoint(tmp_path / "last.ckpt")), num_classes=3)
    assert (tuned.hparams.backbone, tuned.hparams.img_size, tuned.hparams.teacher) == ("vit_tiny_patch16_224", 32,
                                                                                     False)
    with torch.no_grad():
        tuned.backbone.model.norm.weight.add_(1.0)  # as training would change it
    path = tmp_path / "finetune.ckpt"
    torch.save({"state_dict": tuned.state_dict(), "hyper_parameters": dict(tuned.hparams)}, path)
    reloaded = load_backbone(path)
    assert len(reloaded.model.blocks) == 2
    assert all(torch.equal(v, tuned.backbone.model.state_dict()[k]) for k, v in reloaded.model.state_dict().items())


def test_contradicting_the_checkpoint_names_both(tmp_path):
    ckpt = _vit_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"'vit_tiny_patch16_224' but backbone 'vit_small_patch16_224' was requested"):
        resolve_eval_backbone(str(ckpt), backbone="vit_small_patch16_224")
    with pytest.raises(ValueError, match=r"patch size 16 px in the checkpoint, 8 px requested"):
        resolve_eval_backbone(str(ckpt), backbone_kwargs={"model_kwargs": {"patch_size": 8}})
    with pytest.raises(ValueError, match=r"no teacher backbone"):
        resolve_eval_backbone(str(ckpt), teacher=True)


def test_a_data_eval_size_that_contradicts_the_probe_is_an_error(tmp_path, demo_root):
    from ssl_zoo.data import ImageFolderDataModule
    from ssl_zoo.eval import LinearProbe

    probe = LinearProbe(ckpt=str(_vit_checkpoint(tmp_path / "last.ckpt")))
    unset = ImageFolderDataModule(root=f"{demo_root}/folder")
    probe.align_eval_size(unset)
    assert unset.eval_size == 32  # follows the checkpoint
    with pytest.raises(ValueError, match=r"data.eval_size=48 contradicts the evaluation input size 32"):
        probe.align_eval_size(ImageFolderDataModule(root=f"{demo_root}/folder", eval_size=48))
