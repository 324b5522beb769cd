"""The weight average every stage and peer is validated and checkpointed with (stages/callbacks.EMA)."""
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from ups_lightning.stages.callbacks import _ema_keeping_constants


def _average(weights, decay, bias_correction):
    """torch's AveragedModel over a 1-parameter model taking the values in ``weights``, as the EMA
    callback drives it (one update per optimizer step; the first copies the weights)."""
    model = torch.nn.Linear(1, 1, bias=False)
    avg = AveragedModel(model, avg_fn=_ema_keeping_constants(decay, bias_correction))
    for w in weights:
        with torch.no_grad():
            model.weight.fill_(w)
        avg.update_parameters(model)
    return float(avg.module.weight)


def test_the_bias_corrected_average_weighs_each_step_by_its_age_alone():
    d, ws = 0.99, [float(i) for i in range(1, 44)]   # 43 steps, as the U-Net took in 10 minutes
    t = len(ws)
    expected = sum(d ** (t - i) * (1 - d) * w for i, w in enumerate(ws, 1)) / (1 - d ** t)
    assert _average(ws, d, True) == pytest.approx(expected, rel=1e-5)
    # without the correction the first step's weights keep d^(t-1) ~ 0.65 of the average
    plain = d ** (t - 1) * ws[0] + sum(d ** (t - i) * (1 - d) * w for i, w in enumerate(ws[1:], 2))
    assert _average(ws, d, False) == pytest.approx(plain, rel=1e-5)
    assert _average(ws, d, False) < 0.4 * _average(ws, d, True)   # the old average sat near the start
    # over many steps the two agree (the correction fades as d^t -> 0)
    long = [1.0] * 5 + [2.0] * 2000
    assert _average(long, 0.9, True) == pytest.approx(_average(long, 0.9, False), abs=1e-6)


def test_a_constant_parameter_stays_bit_identical():
    model = torch.nn.Linear(3, 1)
    avg = AveragedModel(model, avg_fn=_ema_keeping_constants(0.99, True))
    before = model.weight.detach().clone()
    for _ in range(5):
        avg.update_parameters(model)
    assert torch.equal(avg.module.weight, before)
