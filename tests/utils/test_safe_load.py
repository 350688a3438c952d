"""Safe loading: every ``torch.load`` of the package reads weights only, a checkpoint holding a pickled object is
refused (backbone weights, ``--resume``, evaluation checkpoints) and config files are parsed with safe YAML."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from ssl_zoo.checkpoints import UnsafeCheckpointError, load_backbone
from ssl_zoo.cli import main
from ssl_zoo.models import Backbone

ROOT = Path(__file__).resolve().parents[2]


SIMSIAM = str(ROOT / "experiments/simsiam/demo.yaml")


def _fit(tmp_path: Path, *overrides: str, config: str = SIMSIAM):
    return main(["fit", "--config", config, "--trainer.logger", "false", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_workers", "0",
                 "--model.init_args.img_size", "32", *overrides])


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            yield (owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)), node.func.attr, node


def test_every_load_in_the_package_is_safe():
    """torch.load with weights_only=True, YAML with a safe loader, never pickle / jit / unsafe YAML."""
    unsafe = []
    files = sorted((ROOT / "ssl_zoo").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        for owner, name, call in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            keywords = {k.arg: k.value for k in call.keywords}
            if (owner, name) == ("torch", "load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            elif owner == "yaml" and name in ("load", "load_all"):
                loader = keywords.get("Loader", call.args[1] if len(call.args) > 1 else None)
                if loader is None or "Safe" not in ast.unparse(loader):
                    unsafe.append(f"{where}: yaml.{name} without a SafeLoader")
            elif owner == "yaml" and name in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all"):
                unsafe.append(f"{where}: yaml.{name}")
            elif (owner, name) in {("pickle", "load"), ("pickle", "loads"), ("torch.jit", "load"),
                                   ("dill", "load"), ("joblib", "load")}:
                unsafe.append(f"{where}: {owner}.{name}")
            elif (owner, name) == ("np", "load") and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                    and keywords["allow_pickle"].value:
                unsafe.append(f"{where}: np.load(allow_pickle=True)")
    assert not unsafe, "\n".join(unsafe)


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_checkpoint(tmp_path: Path, state: dict) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({**state, "payload": _Payload(marker)}, path)
    return path, marker


def test_backbone_weights_with_a_pickled_object_are_refused(tmp_path):
    from ssl_zoo.models import Backbone

    weights = Backbone("resnet18").model.state_dict()
    path, marker = _malicious_checkpoint(tmp_path, {"state_dict": weights})
    with pytest.raises(pickle.UnpicklingError):
        Backbone("resnet18", pretrained=str(path))
    assert not marker.exists()


def test_resuming_from_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, demo_root):
    path, marker = _malicious_checkpoint(tmp_path, {"state_dict": {}, "epoch": 0, "global_step": 0})
    with pytest.raises(pickle.UnpicklingError):
        _fit(tmp_path, "--data.init_args.root", demo_root, "--data.init_args.batch_size", "4",
             "--ckpt_path", str(path))
    assert not marker.exists()


def test_config_files_are_parsed_with_safe_yaml(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "evil.yaml"
    bad.write_text(Path(SIMSIAM).read_text()
                   + f"wandb_project: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                     f"['{marker}']]\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad), "--print_config"])
    capsys.readouterr()
    assert not marker.exists()


class _PickledPayload:
    """Pickles into a call of ``exec`` that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    state = {f"backbone.{k}": v for k, v in Backbone("resnet18").state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "resnet18"}, "x": _PickledPayload(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_backbone(ckpt)
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler does run it.
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "pwned"
