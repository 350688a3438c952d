"""MoCo v2 / v3 InfoNCE and the key queue (``ssl_zoo.losses.moco``).

Against float64 loops: the loss, the accuracy, the gradient (queries only: keys and queue are targets), the 2 tau
scale of v3, closed forms, bfloat16 inputs; the queue's first-in first-out order and wrap-around; in 2 gloo
processes, v3's loss, gradient and accuracy over the global batch and a queue identical on every rank.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_zoo.losses import (
    KeyQueue,
    moco_v2_info_nce,
    moco_v3_info_nce,
)
from tests.helpers.loss_checks import (
    F64,
    check_value_and_gradients,
    close,
    rand,
    rng,
    unit_rows,
    unit_vector,
)
from tests.helpers.two_process_losses import (
    QUEUE_SIZE,
    WORLD,
    assert_loss_and_gradients_match_single_process,
    close_across_ranks,
    make_inputs,
)


def _info_nce_reference(q, k, negatives_per_query, tau):
    """Loops: -log softmax of the positive among [positive, negatives]; acc = positive is the max."""
    losses, hits = [], []
    for i in range(len(q)):
        qi = q[i] / np.linalg.norm(q[i])
        pos = float(qi @ (k[i] / np.linalg.norm(k[i]))) / tau
        negs = [float(qi @ n) / tau for n in negatives_per_query(i)]
        m = max([pos, *negs])
        losses.append(-(pos - m - math.log(sum(math.exp(v - m) for v in [pos, *negs]))))
        hits.append(pos >= max(negs) if negs else True)
    return float(np.mean(losses)), float(np.mean(hits))


@pytest.mark.parametrize("b,nq,d", [(1, 1, 2), (5, 12, 8)])
@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_moco_v2_matches_brute_force(b, nq, d, tau):
    q = torch.randn(b, d, generator=rng(35))
    k = q + 0.5 * torch.randn(b, d, generator=rng(36))
    queue = F.normalize(torch.randn(nq, d, generator=rng(37)), dim=1)
    loss, acc = moco_v2_info_nce(q, k, queue, temperature=tau)
    exp_loss, exp_acc = _info_nce_reference(q.numpy(), k.numpy(), lambda i: queue.numpy(), tau)
    close(loss, exp_loss)
    close(acc, exp_acc)
    loss_m, acc_m = moco_v2_info_nce(q.bfloat16(), k.bfloat16(), queue, temperature=tau)
    assert loss_m.dtype == torch.float32
    exp_bf16, _ = _info_nce_reference(
        q.bfloat16().float().numpy(), k.bfloat16().float().numpy(), lambda i: queue.numpy(), tau
    )
    close(loss_m, exp_bf16, rtol=1e-4)


@pytest.mark.parametrize("b,d", [(1, 3), (6, 8)])
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_moco_v3_matches_brute_force(b, d, tau):
    q = torch.randn(b, d, generator=rng(38))
    k = q + 0.8 * torch.randn(b, d, generator=rng(39))
    loss, acc = moco_v3_info_nce(q, k, temperature=tau)
    k_unit = unit_rows(k.numpy().astype(np.float64))
    exp_loss, exp_acc = _info_nce_reference(
        q.numpy(), k.numpy(), lambda i: [k_unit[j] for j in range(b) if j != i], tau
    )
    close(loss, 2 * tau * exp_loss)
    close(acc, exp_acc)
    # bfloat16 inputs: the loss is the float64 reference on the bf16-rounded values (computed in float32 inside)
    qb, kb = q.bfloat16().float().numpy(), k.bfloat16().float().numpy()
    kb_unit = unit_rows(kb.astype(np.float64))
    exp_bf16, _ = _info_nce_reference(qb, kb, lambda i: [kb_unit[j] for j in range(b) if j != i], tau)
    close(moco_v3_info_nce(q.bfloat16(), k.bfloat16(), temperature=tau)[0], 2 * tau * exp_bf16, rtol=1e-4)


def test_moco_closed_forms_and_gradients():
    tau, b = 0.2, 4
    eye = torch.eye(b)  # orthonormal queries, each its own key
    q = eye.clone().requires_grad_(True)
    k = eye.clone().requires_grad_(True)
    loss, acc = moco_v3_info_nce(q, k, temperature=tau)
    close(loss, 2 * tau * -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + b - 1)))
    assert acc.item() == 1.0 and not acc.requires_grad
    loss.backward()
    assert k.grad is None and torch.isfinite(q.grad).all()  # keys come from the momentum encoder
    # MoCo v2 with a queue orthogonal to every query: the queue logits are all 0.
    q2 = torch.cat([eye, torch.zeros(b, 3)], dim=1)  # [4, 7]
    queue = torch.cat([torch.zeros(3, b), torch.eye(3)], dim=1)  # [3, 7]
    loss2, acc2 = moco_v2_info_nce(q2, 5 * q2, queue, temperature=tau)
    close(loss2, -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3)))
    assert acc2.item() == 1.0
    # A query pointing at a queue entry instead of its key is counted as wrong.
    _, acc3 = moco_v2_info_nce(queue[:1], -queue[:1], queue, temperature=tau)
    assert acc3.item() == 0.0


def test_key_queue_init_order_and_wrap_around():
    torch.manual_seed(0)
    queue = KeyQueue(dim=3, size=5)
    assert queue.keys.shape == (5, 3) and queue.ptr.dtype == torch.long and int(queue.ptr) == 0
    close(queue.keys.norm(dim=1), np.ones(5))
    assert set(queue.state_dict()) == {"keys", "ptr"}
    expected = queue.keys.clone()
    ptr = 0
    for step, batch_size in enumerate([2, 2, 2, 3, 7, 1]):  # 5 is not a multiple of 2; 7 > size
        keys = torch.randn(batch_size, 3, generator=rng(40 + step)) * 3
        queue.enqueue(keys)
        for key in keys:  # one at a time, oldest overwritten first
            expected[ptr] = key / key.norm()
            ptr = (ptr + 1) % 5
        close(queue.keys, expected.numpy(), atol=1e-6)
        assert int(queue.ptr) == ptr


def test_key_queue_update_before_backward_is_safe():
    queue = KeyQueue(dim=4, size=8)
    q = torch.randn(2, 4, generator=rng(50), requires_grad=True)
    k = torch.randn(2, 4, generator=rng(51))
    loss, _ = moco_v2_info_nce(q, k, queue.keys)
    queue.enqueue(k)  # in-place update of the buffer between forward and backward
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_moco_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        KeyQueue(dim=4, size=0)
    with pytest.raises(ValueError, match="shape"):
        KeyQueue(dim=4, size=8).enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        moco_v3_info_nce(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        moco_v2_info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 4))


def _moco_v2_loop(q, k, queue_keys, temperature):
    """mean_i -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.n_j/tau)) ), q and k normalised."""
    losses = []
    for i in range(q.shape[0]):
        qi, ki = unit_vector(q[i]), unit_vector(k[i].detach())
        positive = torch.exp(qi @ ki / temperature)
        negatives = sum(torch.exp(qi @ n / temperature) for n in queue_keys.detach())
        losses.append(-torch.log(positive / (positive + negatives)))
    return torch.stack(losses).mean()


def _moco_v3_loop(q, k, temperature):
    """2 tau * mean_i -log( exp(q_i.k_i/tau) / sum_j exp(q_i.k_j/tau) ) over the in-batch keys."""
    losses = []
    for i in range(q.shape[0]):
        qi = unit_vector(q[i])
        logits = [qi @ unit_vector(k[j].detach()) / temperature for j in range(k.shape[0])]
        losses.append(-(logits[i] - torch.logsumexp(torch.stack(logits), dim=0)))
    return 2 * temperature * torch.stack(losses).mean()


@pytest.mark.parametrize("tau", [0.2, 0.07])
def test_moco_v2_gradient_reaches_queries_only(tau):
    queue = torch.nn.functional.normalize(rand(9, 6, seed=3), dim=1)
    inputs = {"q": rand(5, 6, seed=1), "k": rand(5, 6, seed=2), "queue_keys": queue, "temperature": tau}
    check_value_and_gradients(lambda **a: moco_v2_info_nce(**a)[0], _moco_v2_loop, inputs,
           with_grad=("q",), without_grad=("k", "queue_keys"))


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_moco_v3_gradient_reaches_queries_only(tau):
    inputs = {"q": rand(5, 6, seed=4), "k": rand(5, 6, seed=5), "temperature": tau}
    check_value_and_gradients(lambda **a: moco_v3_info_nce(**a)[0], _moco_v3_loop, inputs, with_grad=("q",),
           without_grad=("k",))


@pytest.mark.distributed
def test_moco_v3_accuracy_is_global(two_process_losses):
    per_rank, single = two_process_losses
    close_across_ranks(sum(r["moco_v3_acc"] for r in per_rank) / WORLD, single["moco_v3_acc"])


@pytest.mark.distributed
def test_key_queue_is_identical_across_ranks_in_rank_order(two_process_losses):
    per_rank, single = two_process_losses
    close_across_ranks(per_rank[0]["queue_init"], per_rank[1]["queue_init"])
    for r in per_rank:
        close_across_ranks(r["queue_keys"], single["queue_keys"], atol=0.0, rtol=0.0)
        assert r["queue_ptr"] == single["queue_ptr"] == (2 * WORLD * 3) % QUEUE_SIZE
    # Brute force: write normalised keys one by one in rank order, wrapping around.
    inputs = make_inputs()
    expected = per_rank[0]["queue_init"].clone()
    ptr = 0
    for batch in inputs["queue_keys"]:
        for key in batch:  # batch rows are rank 0's three keys then rank 1's three keys
            expected[ptr] = key / key.norm()
            ptr = (ptr + 1) % QUEUE_SIZE
    close_across_ranks(per_rank[0]["queue_keys"], expected)


@pytest.mark.distributed
def test_moco_v3_loss_and_gradients_match_single_process(two_process_losses):
    assert_loss_and_gradients_match_single_process(*two_process_losses, "moco_v3")


def test_moco_v3_loop_reference_gives_the_known_answer():
    """The loop reference itself, on inputs with a known answer."""
    q = torch.eye(2, dtype=F64)
    assert float(_moco_v3_loop(q, q, 1.0)) == pytest.approx(2 * math.log(1 + math.exp(-1)))
