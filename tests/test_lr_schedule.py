"""The LR schedule of every stage: warm-up then cosine, driven by steps or by the wall-clock limit,
whichever runs out first."""
import math

import pytest

from ups_lightning.stages.base import lr_factor

S = dict(warmup_ratio=0.05, floor=0.05, cosine=True)


def test_step_driven_schedule_warms_up_peaks_and_anneals_to_the_floor():
    total = 1000
    f = [lr_factor(s, total, 0.0, **S) for s in range(total)]
    assert f[0] == pytest.approx(1 / 50)                  # warm-up starts near zero ...
    assert f[48] < f[49] == pytest.approx(1.0)            # ... reaches the peak after 5% of the steps
    assert all(a >= b for a, b in zip(f[49:], f[50:]))    # then only decreases
    assert f[-1] == pytest.approx(0.05)                   # down to the floor at the last step
    mid = lr_factor(524, total, 0.0, **S)                 # halfway through the cosine part
    assert mid == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-3)


def test_a_time_capped_stage_leaves_warm_up_and_anneals():
    # 40 epochs x 1000 steps planned, but the clock stops the stage after ~900 steps: the schedule
    # must follow the clock (a step-only warm-up of 2000 steps would never end)
    total = 40_000
    assert lr_factor(10, total, time_progress=0.01, **S) == pytest.approx(0.2)
    assert lr_factor(100, total, time_progress=0.06, **S) > 0.99
    assert lr_factor(500, total, time_progress=0.5, **S) < 0.6
    assert lr_factor(900, total, time_progress=1.0, **S) == pytest.approx(0.05)


def test_constant_schedule_and_no_warm_up():
    assert lr_factor(0, 100, 0.0, warmup_ratio=0.0, floor=0.05, cosine=False) == 1.0
    assert lr_factor(99, 100, 0.9, warmup_ratio=0.1, floor=0.05, cosine=False) == 1.0
    assert lr_factor(4, 100, 0.0, warmup_ratio=0.1, floor=0.05, cosine=False) == pytest.approx(0.5)
