"""The learning-rate schedules equal transformers' at every step (the reference the harness used to import)."""

import pytest
import torch
from transformers.optimization import get_scheduler

from harness.schedules import SCHEDULES, lr_factor, make_scheduler

TRANSFORMERS_NAME = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def learning_rates(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup, total", [(0, 50), (6, 100), (14, 226), (1, 1), (10, 10)])
def test_each_schedule_equals_transformers_at_every_step(schedule, warmup, total):
    ours = learning_rates(lambda opt: make_scheduler(opt, schedule, warmup, total), total + 3)
    theirs = learning_rates(lambda opt: get_scheduler(TRANSFORMERS_NAME[schedule], opt, num_warmup_steps=warmup,
                                                      num_training_steps=total), total + 3)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_linear_warms_up_then_decays_to_zero():
    factor = lr_factor("linear", 4, 12)
    assert [factor(s) for s in (0, 2, 4, 8, 12, 20)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor("step", 0, 10)
