"""Ensemble calibration at the levels M members can represent (issue 11 item 5)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from ups_lightning.eval import metrics as M

N_POINTS = 40_000
Z = 4.0   # standard errors allowed per level


def _draw(M_: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth and M members per point from N(mu, s^2) (members scaled by ``spread``), mu and s
    varying over points; spread = 1 is a perfectly calibrated (exchangeable) ensemble."""
    g = torch.Generator().manual_seed(seed)
    mu = 3.0 * torch.randn(N_POINTS, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(N_POINTS, generator=g, dtype=torch.float64)
    truth = mu + s * torch.randn(N_POINTS, generator=g, dtype=torch.float64)
    ens = mu + spread * s * torch.randn(M_, N_POINTS, generator=g, dtype=torch.float64)
    return ens, truth


def _se(p: float, n: int = N_POINTS) -> float:
    """Binomial standard error of an empirical coverage over n independent points."""
    return math.sqrt(p * (1.0 - p) / n)


def test_levels_for_eight_members_are_exact():
    assert M.ensemble_levels(8) == [7 / 9, 5 / 9, 3 / 9, 1 / 9]
    assert [Fraction(v).limit_denominator(100) for v in M.ensemble_levels(8)] == \
        [Fraction(7, 9), Fraction(5, 9), Fraction(1, 3), Fraction(1, 9)]
    assert M.ensemble_levels(2) == [1 / 3]
    assert M.ensemble_levels(3) == [2 / 4]
    assert M.nearest_level(8, 0.9) == (1, 7 / 9)
    assert M.nearest_level(8, 0.5) == (2, 5 / 9)
    assert M.nearest_level(9, 0.5) == (2, 6 / 10)   # exact tie 0.6 / 0.4: the wider interval


@pytest.mark.parametrize("bad", [0, 1])
def test_fewer_than_two_members_raise(bad):
    with pytest.raises(ValueError, match="at least 2 members"):
        M.ensemble_levels(bad)
    ens, truth = torch.zeros(bad, 5), torch.zeros(5)
    for fn in (lambda: M.coverage(ens, truth, 0.9), lambda: M.ece_coverage(ens, truth),
               lambda: M.interval_coverage(ens, truth, 1), lambda: M.coverage_curve(ens, truth)):
        with pytest.raises(ValueError, match="at least 2 members"):
            fn()


def test_interval_index_out_of_range_raises():
    ens, truth = _draw(4, 1.0, 0)
    for i in (0, 3):
        with pytest.raises(ValueError, match="out of range"):
            M.interval_coverage(ens, truth, i)


@pytest.mark.parametrize("M_", [4, 8])
def test_perfectly_calibrated_ensemble(M_):
    ens, truth = _draw(M_, 1.0, seed=10 + M_)
    curve = M.coverage_curve(ens, truth)
    assert [lv for lv, _ in curve] == M.ensemble_levels(M_)
    for i, (lv, emp) in enumerate(curve, start=1):
        assert lv == pytest.approx((M_ + 1 - 2 * i) / (M_ + 1))
        assert abs(emp - lv) < Z * _se(lv), (i, emp, lv)
        assert M.interval_coverage(ens, truth, i) == emp
    # |dev_i| < Z se_i at every level, so their mean is below the mean bound
    bound = Z * sum(_se(lv) for lv, _ in curve) / len(curve)
    assert M.ece_coverage(ens, truth) < bound
    # the summary's level -> nearest representable interval
    assert M.coverage(ens, truth, 0.9) == M.interval_coverage(ens, truth, M.nearest_level(M_, 0.9)[0])


@pytest.mark.parametrize("M_", [4, 8])
def test_under_dispersed_ensemble_under_covers(M_):
    ens, truth = _draw(M_, 0.1, seed=20 + M_)
    for lv, emp in M.coverage_curve(ens, truth):
        assert emp < 0.5 * lv, (emp, lv)
    levels = M.ensemble_levels(M_)
    assert M.ece_coverage(ens, truth) > 0.5 * sum(levels) / len(levels)


@pytest.mark.parametrize("M_", [4, 8])
def test_over_dispersed_ensemble_over_covers(M_):
    ens, truth = _draw(M_, 3.0, seed=30 + M_)
    for lv, emp in M.coverage_curve(ens, truth):
        assert emp > lv + Z * _se(lv), (emp, lv)
    assert M.ece_coverage(ens, truth) > Z * max(_se(lv) for lv in M.ensemble_levels(M_))


def test_matches_sorted_member_interval():
    """Continuous data: coverage of interval i is the fraction of truths in [x_(i), x_(M+1-i)]."""
    ens, truth = _draw(8, 1.0, seed=3)
    xs = ens.sort(dim=0).values
    for i in range(1, 5):
        inside = (truth >= xs[i - 1]) & (truth <= xs[8 - i])
        assert M.interval_coverage(ens, truth, i) == pytest.approx(float(inside.double().mean()), abs=1e-12)


def test_ties_do_not_bias():
    """Truth and members i.i.d. on {0, 1, 2}: ties everywhere, coverage still nominal."""
    g = torch.Generator().manual_seed(4)
    M_ = 8
    truth = torch.randint(0, 3, (N_POINTS,), generator=g).double()
    ens = torch.randint(0, 3, (M_, N_POINTS), generator=g).double()
    for lv, emp in M.coverage_curve(ens, truth):
        assert abs(emp - lv) < Z * _se(lv), (emp, lv)
    # all members equal the truth: the tie-broken rank is uniform, coverage exactly nominal
    same = truth.expand(M_, -1)
    for lv, emp in M.coverage_curve(same, truth):
        assert emp == pytest.approx(lv, abs=1e-12)


def test_all_metrics_reports_nominal_levels():
    g = torch.Generator().manual_seed(5)
    true = torch.randn(2, 6, 16, 1, generator=g, dtype=torch.float64)
    ens = true[None] + torch.randn(8, 2, 6, 16, 1, generator=g, dtype=torch.float64)
    out = M.all_metrics(ens.mean(0), true, u0=true[:, 0], ens=ens)
    assert out["coverage_90_nominal"] == pytest.approx(7 / 9)
    assert out["coverage_50_nominal"] == pytest.approx(5 / 9)
    assert out["coverage_90"] == M.interval_coverage(ens, true, 1)
    assert out["coverage_50"] == M.interval_coverage(ens, true, 2)
    assert out["ece"] == M.ece_coverage(ens, true)
    one = M.all_metrics(ens[0], true, u0=true[:, 0], ens=ens[:1])
    for k in ("coverage_50", "coverage_50_nominal", "coverage_90", "coverage_90_nominal", "ece"):
        assert math.isnan(one[k]), k
