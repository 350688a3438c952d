"""What the gathers must do, checked in one process by standing in for rank 0 of a 2-process group.

The 2-process gloo tests (``test_losses_distributed.py``, ``test_distributed*.py``) are the real check, but
they are too slow for the fast suite. Here the collectives the code calls are replaced by ones that return
this rank's tensor concatenated with a fixed "other rank" tensor, so what each rank computes can be compared
with a float64 loop: IA-CLoss must keep the gradient through the gathered keys (its own embeddings are keys
of its anchors too), and evaluation must count a sample padded in by ``DistributedSampler`` once.
"""

from __future__ import annotations

import torch

import ssl_zoo.losses.ia_closs as ia_closs
from ssl_zoo.eval.module import EvalModule

WORLD = 2


def _fake_rank0(monkeypatch, module, other: dict[torch.dtype, torch.Tensor]) -> None:
    """Rank 0 of ``WORLD``; rank 1 holds ``other[dtype]`` for every gathered tensor of that dtype."""
    monkeypatch.setattr(module, "world_size", lambda: WORLD)
    monkeypatch.setattr(module, "rank", lambda: 0)
    monkeypatch.setattr(module, "gather", lambda x: torch.cat([x, other[x.dtype].to(x)]))
    monkeypatch.setattr(module, "gather_no_grad", lambda x: torch.cat([x, other[x.dtype].to(x)]).detach())


def _ia_reference(z_local, z_other, ids_local, ids_other, tau):
    """Rank 0's share W * sum_{i local, |P(i)| >= 1} l_i / N_valid (global N_valid), as a float64 loop."""
    z_all = torch.cat([z_local, z_other])
    ids_all = torch.cat([ids_local, ids_other])
    unit = [v / v.norm() for v in z_all]
    n_valid = sum(int((ids_all == ids_all[j]).sum() > 1) for j in range(len(ids_all)))
    total = 0.0
    for i in range(len(z_local)):
        others = [a for a in range(len(z_all)) if a != i]
        positives = [p for p in others if ids_all[p] == ids_all[i]]
        if not positives:
            continue
        num = sum(torch.exp(unit[i] @ unit[p] / tau) for p in positives)
        den = sum(torch.exp(unit[i] @ unit[a] / tau) for a in others)
        total = total - torch.log(num / den) / len(positives)
    return WORLD * total / n_valid


def test_ia_closs_keeps_the_gradient_through_the_gathered_keys(monkeypatch):
    g = torch.Generator().manual_seed(0)
    z_local, z_other = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ids_local, ids_other = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([1, 2, 4, 4, 5])  # ids 1, 2 span ranks
    # the other rank gathers its embeddings after normalising them, as this one does
    unit_other = torch.nn.functional.normalize(z_other, dim=1)
    _fake_rank0(monkeypatch, ia_closs, {torch.float32: unit_other, torch.int64: ids_other})

    z = z_local.clone().requires_grad_(True)
    loss = ia_closs.image_aware_contrastive_loss(z, ids_local, temperature=0.2)
    loss.backward()
    z64 = z_local.double().requires_grad_(True)
    expected = _ia_reference(z64, z_other.double(), ids_local, ids_other, 0.2)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


class _Probe(EvalModule):
    protocol = "test"

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"multilabel": True, "num_classes": 2, "threshold": 0.5})


def test_evaluation_keeps_one_copy_of_a_padded_sample(monkeypatch):
    """7 samples over 2 processes: rank 1's shard repeats sample 0 to reach 4; the metrics see 7 samples."""
    probe = _Probe()
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.2, 0.7], [0.6, 0.4], [0.3, 0.9], [0.1, 0.2], [0.7, 0.6],
                           [0.9, 0.1]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0], [0, 1], [1, 0], [1, 1], [1, 0]]).float()
    index = torch.tensor([0, 2, 4, 6, 1, 3, 5, 0])  # DistributedSampler order: rank 0 even, rank 1 odd + pad
    probe._val_buffer = [(scores[:4], targets[:4], index[:4])]  # this process (rank 0)
    other = {"scores": scores[4:], "targets": targets[4:], "index": index[4:]}

    def all_gather(t):
        key = "index" if t.dtype == torch.int64 else ("scores" if t.equal(scores[:4]) else "targets")
        return torch.stack([t, other[key]])

    monkeypatch.setattr(probe, "all_gather", all_gather)
    monkeypatch.setattr(type(probe), "trainer", property(lambda self: type("T", (), {"world_size": WORLD})()))
    got_scores, got_targets = probe._gathered()
    order = torch.argsort(index[:7])
    assert got_scores.shape == (7, 2)
    torch.testing.assert_close(got_scores, scores[:7][order])
    torch.testing.assert_close(got_targets, targets[:7][order])
