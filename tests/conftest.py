"""Shared fixtures: a tiny demo dataset generated once per test session, wandb off."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small copy of the built-in demo dataset (COCO, Tencent-ML and folder formats), 64 px."""
    from ssl_zoo.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return str(make_demo_dataset(root, num_train=48, num_val=16, size=64, seed=0))


@pytest.fixture(scope="session")
def two_process_losses():
    """``(per_rank, single)``: what 2 gloo ranks and one process on the whole batch compute for every loss that
    sees the global batch and for the bare collectives (``tests/helpers/two_process_losses.py``), spawned once."""
    from tests.helpers.two_process_losses import run_two_processes

    return run_two_processes()
