"""When the EMA teachers move: once per optimiser step.

The update itself is lightly's ``update_momentum`` (MoCo Eq. 2, BYOL Eq. 1, on the parameters only, as MoCo's
``_momentum_update_key_encoder``) and the MoCo v3 / BYOL momentum ramp lightly's ``cosine_schedule``; the
methods call them directly; this gate keeps the update at one per optimiser step.
"""

from __future__ import annotations

__all__ = ["OncePerOptimizerStep"]


class OncePerOptimizerStep:
    """Gate for EMA updates run from ``on_train_batch_end``: open once after each optimiser step.

    Lightning calls ``on_train_batch_end`` after every micro-batch; under gradient accumulation the batches
    that did not step leave the student unchanged, and moving the teacher towards it again would apply the
    momentum several times per step. The gate compares the trainer's ``global_step`` (optimiser steps taken)
    with the one it last let through. Before :meth:`start` it is always open (unit tests that call the hook
    without a trainer).
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def start(self, global_step: int) -> None:
        """Called from ``on_train_start``: the steps already taken (a resumed run) are not new."""
        self.last_step = global_step

    def __call__(self, global_step: int) -> bool:
        """True when ``global_step`` is new since the last call that returned True."""
        if self.last_step is None:
            return True
        if global_step == self.last_step:
            return False
        self.last_step = global_step
        return True
