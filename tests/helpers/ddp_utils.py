"""Run a function in several CPU processes joined by a gloo process group.

Usage::

    from tests.helpers.ddp_utils import run_distributed

    def _check(rank: int, world_size: int, batch: torch.Tensor) -> dict:  # module level
        ...
        return {"loss": loss.detach(), "grad": z.grad}

    results = run_distributed(_check, world_size=2, batch=batch)  # one entry per rank

``fn`` must be defined at module level of an importable module (it is pickled by reference into
freshly spawned interpreters), its keyword arguments and return value must be picklable
(tensors are fine).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_average_step", "named_gradients", "run_distributed"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
) -> None:
    # One intra-op thread per process: the test machines have few cores and W processes share them.
    torch.set_num_threads(1)
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, **kwargs: Any) -> list[Any]:
    """Call ``fn(rank, world_size, **kwargs)`` in ``world_size`` spawned gloo processes.

    Returns:
        The value each rank returned, indexed by rank. An exception in any rank is re-raised here
        (as ``torch.multiprocessing.ProcessRaisedException`` carrying the child's traceback).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _worker,
            args=(world_size, _free_port(), out_dir, fn, kwargs),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]


class _TrainingStepModule(torch.nn.Module):
    """What Lightning's DDP strategy wraps: a module whose ``forward(batch)`` is ``training_step``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.training_step(batch, 0)


def named_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter by name; a trainable parameter without one is an error
    (DDP would then never reduce its bucket)."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise AssertionError(f"trainable parameters received no gradient: {missing}")
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def ddp_average_step(model: torch.nn.Module, batch: dict, rank: int, world_size: int) -> dict:
    """One ``model.training_step`` on this rank's shard of ``batch`` inside ``DistributedDataParallel``.

    The batch's tensors are split along dim 0 into ``world_size`` equal shards. DDP broadcasts rank 0's
    parameters and buffers, then averages the gradients over ranks during ``backward``, as in a
    ``strategy: ddp`` run. Returns the mean of the ranks' losses (what a synced log shows) and the averaged
    gradients by parameter name, for comparison with one process on the whole batch.
    """
    local = {k: v.chunk(world_size)[rank] for k, v in batch.items()}
    ddp_model = DistributedDataParallel(_TrainingStepModule(model))  # must outlive backward: it owns the hooks
    loss = ddp_model(local)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {"loss": mean_loss / world_size, "grads": named_gradients(model)}
