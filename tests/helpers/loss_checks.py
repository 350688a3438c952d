"""What the loss tests share: seeded inputs, a float64 comparison, and the value-and-gradient check against a
float64 loop over a paper's equation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

F64 = torch.float64


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor | float, expected: float | np.ndarray, rtol: float = 1e-5, atol: float = 1e-5):
    """``actual`` (a float32 tensor or a float) against a float64 reference, element-wise."""
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def unit_vector(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def check_value_and_gradients(impl: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                              inputs: dict, with_grad: tuple[str, ...], without_grad: tuple[str, ...] = (),
                              rtol: float = 1e-4) -> None:
    """Value and gradients of ``impl`` (float32) against ``reference`` (float64 loop) on the same inputs.

    Value tests alone let a term through that silently carries no gradient (a ``detach`` in the wrong place, an
    input consumed through ``.data``): autograd on the float64 loop gives the reference gradient of every input in
    ``with_grad``; the inputs in ``without_grad`` are targets (keys, queues, PTB weights) and must receive none.
    The gradient is that of a random linear functional of the output, so every output entry counts.
    """
    f32 = {k: v.float().clone().requires_grad_(k in with_grad or k in without_grad) if torch.is_tensor(v) else v
           for k, v in inputs.items()}
    f64 = {k: v.to(F64).clone().requires_grad_(k in with_grad) if torch.is_tensor(v) else v
           for k, v in inputs.items()}
    out, ref = impl(**f32), reference(**f64)
    weights = rand(*ref.shape, seed=99).to(F64) if ref.dim() else torch.ones((), dtype=F64)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=1e-6)
    (out * weights.float()).sum().backward()
    (ref * weights).sum().backward()
    for name in with_grad:
        assert f32[name].grad is not None, f"{name} received no gradient"
        assert f32[name].grad.abs().sum() > 0, f"{name} received an all-zero gradient"
        torch.testing.assert_close(f32[name].grad.double(), f64[name].grad, rtol=rtol, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    for name in without_grad:
        grad = f32[name].grad
        assert grad is None or not grad.any(), f"{name} is a target but received a gradient"
