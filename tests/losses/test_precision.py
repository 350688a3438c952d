"""``float32_math`` (``ssl_zoo.losses.precision``): every loss of the package returns float32 and computes float32
maths on bf16 activations under ``torch.autocast``; the key queue stores float32 unit keys."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_zoo.losses import (
    ImageAwareContrastiveLoss,
    KeyQueue,
    SupConLoss,
    SwappedPredictionLoss,
    SymmetricKLDivergence,
    WeightedAsymmetricLoss,
    masked_l1_loss,
    moco_v2_info_nce,
    moco_v3_info_nce,
    mpcl_total_loss,
    mvp_alignment_loss,
    projector_contrastive_regularization,
    ptb_weights,
    sinkhorn_knopp,
)
from ssl_zoo.methods.hvp_mtl import label_similarity


def _loss_cases() -> dict[str, tuple[Callable[..., Tensor], tuple]]:
    """Each loss of the package with inputs of the scale it sees in training (bool / integer inputs stay as they are)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    ids = torch.tensor([0, 0, 1, 1, 2, 3, 2, 4, 5, 5, 6, 7])
    codes = torch.softmax(r(12, 7), dim=1)
    return {
        "ia_closs": (ImageAwareContrastiveLoss(temperature=0.1), (r(12, 16), ids)),
        "supcon": (SupConLoss(temperature=0.1), (r(12, 16), ids)),
        "weighted_asl": (WeightedAsymmetricLoss(), (3 * r(6, 10), (torch.rand(6, 10, generator=g) < 0.3).float())),
        "sinkhorn": (sinkhorn_knopp, (F.normalize(r(12, 7), dim=1),)),  # cosines with unit prototypes
        "swapped_prediction": (SwappedPredictionLoss(temperature=0.1), (r(12, 7), r(12, 7), codes, codes.flip(0))),
        "masked_l1": (masked_l1_loss, (r(2, 3, 8, 8), r(2, 3, 8, 8), (torch.rand(2, 1, 8, 8, generator=g) < 0.6))),
        "mvp_all_tokens": (mvp_alignment_loss, (r(3, 5, 16), r(3, 5, 16))),
        "mvp_masked_tokens": (functools.partial(mvp_alignment_loss, mask=torch.rand(3, 4, generator=g) < 0.5),
                              (r(3, 5, 16), r(3, 5, 16))),
        "pcr": (projector_contrastive_regularization, (r(3, 6, 8),)),
        "ptb_weights": (ptb_weights, (torch.rand(3, generator=g),)),
        "mpcl_total": (mpcl_total_loss, (torch.rand(3, generator=g), r(3), torch.softmax(r(3), dim=0))),
        "moco_v2": (lambda q, k, queue: moco_v2_info_nce(q, k, queue)[0], (r(6, 8), r(6, 8), F.normalize(r(30, 8)))),
        "moco_v3": (lambda q, k: moco_v3_info_nce(q, k)[0], (r(6, 8), r(6, 8))),
        "symmetric_kl": (SymmetricKLDivergence(temperature=0.1), (r(4, 6), r(4, 6))),
        "hvp_label_similarity": (label_similarity, (r(4, 8), r(5, 8))),
    }


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("case", list(_loss_cases()))
def test_loss_math_stays_float32_under_bf16_autocast(case):
    """Under ``bf16-mixed`` a loss receives bf16 activations inside ``torch.autocast``: it must return float32
    and compute exactly what float32 maths gives on those (rounded) inputs."""
    fn, args = _loss_cases()[case]
    args_bf16 = _cast(args, torch.bfloat16)
    first = args_bf16[0].detach().requires_grad_(True)
    args_bf16 = (first, *args_bf16[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16_inputs = fn(*args_bf16)
        out_fp32_inputs = fn(*args)
    assert out_bf16_inputs.dtype == out_fp32_inputs.dtype == torch.float32
    # The same float32 maths as outside autocast: only the rounding of the inputs differs.
    torch.testing.assert_close(out_bf16_inputs, fn(*_cast(args_bf16, torch.float32)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_fp32_inputs, fn(*args), rtol=1e-6, atol=1e-6)
    # And close to the float32 result: bf16 rounds inputs by 2^-9 relative, amplified by 1/tau <= 20 here.
    torch.testing.assert_close(out_bf16_inputs, fn(*args), rtol=3e-2, atol=3e-2)
    if out_bf16_inputs.requires_grad:  # sinkhorn and ptb_weights are targets without gradient
        out_bf16_inputs.sum().backward()
        assert first.grad.dtype == torch.bfloat16 and torch.isfinite(first.grad.float()).all()


def test_key_queue_stores_float32_unit_keys_under_bf16_autocast():
    torch.manual_seed(0)
    queue, reference = KeyQueue(8, size=10), KeyQueue(8, size=10)
    reference.load_state_dict(queue.state_dict())
    keys = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        queue.enqueue(keys)
    reference.enqueue(keys.float())
    assert queue.keys.dtype == torch.float32
    torch.testing.assert_close(queue.keys, reference.keys, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(queue.keys[:4].norm(dim=1), torch.ones(4))
