"""Warm-up + cosine schedule: shape, end points, and the LambdaLR wrapper."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pytest
import torch

from models.schedule import build_scheduler, warmup_cosine, warmup_steps_for


def test_shape() -> None:
    total, warm = 100, 10
    f = [warmup_cosine(s, total, warm, 0.1) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1)  # first step already learns
    assert f[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in pairwise(f[:warm]))  # rising
    assert f[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(f[warm:]))  # falling
    mid = warm + (total - warm) // 2
    assert f[mid] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half way down the cosine
    assert f[total] == pytest.approx(0.1)
    assert f[-1] == pytest.approx(0.1)  # held at the floor


def test_no_warmup_starts_at_peak() -> None:
    assert warmup_cosine(0, 10, 0) == 1.0
    assert warmup_cosine(5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 0, 0), "total_steps"), ((0, 10, -1), "warmup_steps"), ((0, 10, 1, 2.0), "min_ratio")],
)
def test_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        warmup_cosine(*args)


def test_warmup_steps_for() -> None:
    assert warmup_steps_for(200, 0.05) == 10
    assert warmup_steps_for(200, 7) == 7
    assert warmup_steps_for(5, 50) == 4  # never the whole run


def test_scheduler_follows_the_function_and_its_state_is_json() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.01)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, min_ratio=0.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01 * warmup_cosine(s, 20, 4) for s in range(20)])
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=4)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
