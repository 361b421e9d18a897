"""Learning-rate schedules: a linear warmup, then linear decay to 0, a half cosine to 0, or a constant.

Written here, where the loop can be read with them, rather than taken from `transformers.get_scheduler`: that
function's module imports `transformers.trainer_utils`, which imports peft (when installed) and the Trainer's
utilities, which a run needs nowhere else: 0.1 s of every run's start for three one-line formulas. The formulas
are transformers' (`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` with half a cycle,
`get_constant_schedule_with_warmup`): tests/test_schedules.py checks every step against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimizer step `step` (0 before the first update)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: one of {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def make_scheduler(optimizer: Optimizer, schedule: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A scheduler to step once per optimizer step (after `optimizer.step()`)."""
    return LambdaLR(optimizer, lr_factor(schedule, warmup_steps, total_steps))
