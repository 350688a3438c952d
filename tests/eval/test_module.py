"""``ssl_zoo.eval.module``: evaluation keeps one copy of a sample ``DistributedSampler`` padded in, checked in one
process standing in for rank 0 of two."""

from __future__ import annotations

import torch

from ssl_zoo.eval.module import EvalModule, first_occurrences

FAKE_WORLD = 2


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
    monkeypatch.setattr(type(probe), "trainer", property(lambda self: type("T", (), {"world_size": FAKE_WORLD})()))
    got_scores, got_targets = probe._gathered()
    order = torch.argsort(index[:7])
    assert got_scores.shape == (7, 2)
    torch.testing.assert_close(got_scores, scores[:7][order])
    torch.testing.assert_close(got_targets, targets[:7][order])


def test_first_occurrences_drops_padded_duplicates():
    # two processes' shards of a 5-sample split, the second padded with sample 0 again
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    keep = first_occurrences(index)
    assert keep.tolist() == [0, 3, 1, 4, 2]
    assert index[keep].tolist() == [0, 1, 2, 3, 4]
