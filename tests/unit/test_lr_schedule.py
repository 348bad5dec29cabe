"""The learning-rate schedule (``engine.make_lr_schedule``): warmup, then cosine / linear decay to 0 at
``total_steps``, or constant. The engine hands this LambdaLR to DeepSpeed, which steps it once after every
optimizer step, so the rate at scheduler step ``s`` is the one update ``s + 1`` uses. A plain SGD over one
parameter stands in for the engine's optimizer: the schedule only scales the group's base rate."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from orpo_ds.config import TrainConfig
from orpo_ds.engine import make_lr_schedule

BASE_LR = 2.0  # not 1, so that a factor returned where the rate belongs would show
# half-way points of the cosine: 0.5 * (1 + cos(pi * p)) for p = 1/4, 1/2, 3/4
COS_QUARTER, COS_HALF, COS_THREE_QUARTERS = (2 + math.sqrt(2)) / 4, 0.5, (2 - math.sqrt(2)) / 4


def _rates(kind: str, warmup: int, total_steps: int, steps: int) -> list[float]:
    """The learning rate at scheduler steps 0 .. steps-1, stepped as DeepSpeed does (optimizer, then schedule)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = make_lr_schedule(opt, TrainConfig(lr_schedule=kind, warmup_steps=warmup), total_steps)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


# warmup 4, then 8 steps of decay to total_steps 12: steps 6, 8, 10 sit a quarter, a half, three quarters in.
# The warmup factor is (s + 1) / (warmup + 1): 1/5 .. 4/5, so the first update already moves. Step 14 is
# past total_steps: the decay is clamped at its end there (linear would go negative).
@pytest.mark.parametrize("kind, after_warmup", [
    ("cosine", {4: 1.0, 6: COS_QUARTER, 8: COS_HALF, 10: COS_THREE_QUARTERS, 12: 0.0, 14: 0.0}),
    ("linear", {4: 1.0, 6: 0.75, 8: 0.5, 10: 0.25, 12: 0.0, 14: 0.0}),
    ("constant", {4: 1.0, 6: 1.0, 8: 1.0, 10: 1.0, 12: 1.0, 14: 1.0}),
])
def test_warmup_then_schedule(kind, after_warmup):
    rates = _rates(kind, warmup=4, total_steps=12, steps=15)
    expected = {0: 1 / 5, 1: 2 / 5, 2: 3 / 5, 3: 4 / 5, **after_warmup}
    assert {s: rates[s] for s in expected} == pytest.approx({s: BASE_LR * f for s, f in expected.items()})


@pytest.mark.parametrize("kind, expected", [
    ("cosine", {0: 1.0, 2: COS_QUARTER, 4: COS_HALF, 6: COS_THREE_QUARTERS, 8: 0.0}),
    ("linear", {0: 1.0, 2: 0.75, 4: 0.5, 6: 0.25, 8: 0.0}),
    ("constant", {0: 1.0, 2: 1.0, 4: 1.0, 6: 1.0, 8: 1.0}),
])
def test_without_warmup_the_first_update_uses_the_full_rate(kind, expected):
    rates = _rates(kind, warmup=0, total_steps=8, steps=9)
    assert {s: rates[s] for s in expected} == pytest.approx({s: BASE_LR * f for s, f in expected.items()})


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_is_monotone_after_warmup(kind):
    rates = _rates(kind, warmup=3, total_steps=20, steps=22)
    assert rates[3] == BASE_LR
    assert all(a >= b for a, b in itertools.pairwise(rates[3:])), rates


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_warmup_longer_than_the_run_does_not_divide_by_zero(kind):
    """total_steps <= warmup (a short run, or max_steps below warmup_steps): the decay's length would be 0
    or negative; the run stays in warmup, and a step past the warmup ends the decay at once."""
    assert _rates(kind, warmup=10, total_steps=3, steps=3) == pytest.approx([BASE_LR * (s + 1) / 11 for s in range(3)])
    # total_steps == warmup: full rate for the step after the warmup, then 0
    assert _rates(kind, warmup=2, total_steps=2, steps=5) == pytest.approx(
        [BASE_LR / 3, BASE_LR * 2 / 3, BASE_LR, 0.0, 0.0])
