"""Metrics of benchmark.md section 3 against slow, loop-by-loop reference formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ups_lightning.eval import metrics as M


def _data(B=5, T=4, X=32, C=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, X) if C is None else (B, T, X, C)
    true = torch.randn(shape, generator=g, dtype=torch.float64) + 0.3
    pred = true + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred, true


def _reference(pred, true, L=1.0):
    """PDEBench's formulas written out with loops, the RMS over all samples at once."""
    p = pred.numpy() if pred.dim() == 4 else pred.numpy()[..., None]
    t = true.numpy() if true.dim() == 4 else true.numpy()[..., None]
    B, T, X, C = p.shape
    e = p - t
    nr, rm, bd = [], [], []
    for b in range(B):
        for tt in range(T):
            for c in range(C):
                err = math.sqrt(np.mean(e[b, tt, :, c] ** 2))
                rm.append(err)
                nr.append(err / math.sqrt(np.mean(t[b, tt, :, c] ** 2)))
                bd.append(math.sqrt((e[b, tt, 0, c] ** 2 + e[b, tt, -1, c] ** 2) / 2))
    cr, bands = [], {"low": [], "mid": [], "high": []}
    for tt in range(T):
        for c in range(C):
            cr.append(math.sqrt(np.mean([np.mean(e[b, tt, :, c]) ** 2 for b in range(B)])))
            F = np.array([np.abs(np.fft.rfft(e[b, tt, :, c])) ** 2 for b in range(B)])  # (B, K)
            per_k = np.sqrt(F.mean(0)) / X * L
            bands["low"].append(per_k[0:4].mean())
            bands["mid"].append(per_k[4:12].mean())
            bands["high"].append(per_k[12:X // 2 + 1].mean())
    return {
        "nrmse": np.mean(nr), "rmse": np.mean(rm), "crmse": np.mean(cr), "brmse": np.mean(bd),
        "max_err": np.abs(e).max(), "frmse_low": np.mean(bands["low"]), "frmse_mid": np.mean(bands["mid"]),
        "frmse_high": np.mean(bands["high"]),
    }


@pytest.mark.parametrize("C", [None, 2])
def test_pdebench_metrics_match_reference(C):
    pred, true = _data(C=C)
    got = M.pdebench_metrics(pred, true, domain_length=2.0)
    ref = _reference(pred, true, L=2.0)
    assert list(got) == list(M.PDEBENCH_KEYS)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-10), k


def test_exact_prediction_scores_zero_and_known_values():
    _, true = _data()
    z = M.pdebench_metrics(true, true)
    assert all(v == 0.0 for v in z.values())
    # a constant offset c: rmse = c, crmse = c, brmse = c, max = c, only the k=0 mode has error
    c = 0.25
    got = M.pdebench_metrics(true + c, true, domain_length=1.0)
    for k in ("rmse", "crmse", "brmse", "max_err"):
        assert got[k] == pytest.approx(c)
    assert got["frmse_low"] == pytest.approx(c / 4)  # |rfft| at k=0 is nx*c -> c*L, averaged over 4 bins
    assert got["frmse_mid"] == pytest.approx(0.0, abs=1e-12) and got["frmse_high"] == pytest.approx(0.0, abs=1e-12)


def test_max_error_is_true_max_over_samples():
    pred, true = _data()
    pred = pred.clone()
    pred[3, 2, 7] = true[3, 2, 7] + 9.0
    assert M.pdebench_metrics(pred, true)["max_err"] == pytest.approx(9.0)


def test_per_frame_and_at_k():
    pred, true = _data(T=12)
    curve = M.nrmse_per_frame(pred, true)
    assert curve.shape == (12,)
    assert float(curve.mean()) == pytest.approx(M.pdebench_metrics(pred, true)["nrmse"])
    at = M.nrmse_at(pred, true, ks=(1, 10, 31))
    assert at["nrmse_1"] == pytest.approx(float(curve[0]))
    assert at["nrmse_10"] == pytest.approx(float(curve[9]))
    assert math.isnan(at["nrmse_31"])


def test_nrmse_pdebench_copies_given_frames():
    pred, true = _data(T=8)
    full = M.nrmse_pdebench(pred, true, initial_step=3)
    tail = M.nrmse_per_frame(pred[:, 3:], true[:, 3:])
    assert full == pytest.approx(float(tail.sum()) / 8)  # zero error on the 3 given frames


def test_rollout_metrics_equals_functional_over_uneven_batches():
    pred, true = _data(B=11, T=5, X=32, C=1, seed=3)
    m = M.RolloutMetrics(domain_length=2.0)
    for lo, hi in ((0, 1), (1, 5), (5, 7), (7, 11)):
        m.update(pred[lo:hi].float(), true[lo:hi].float())
    got = m.compute()
    ref = M.pdebench_metrics(pred.float(), true.float(), domain_length=2.0)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert torch.allclose(got["nrmse_per_frame"], M.nrmse_per_frame(pred.float(), true.float()), rtol=1e-9)
    # preallocated states give the same, reset clears
    m2 = M.RolloutMetrics(n_frames=5, nx=32, channels=1, domain_length=2.0)
    m2.update(pred[:4], true[:4])
    m2.update(pred[4:], true[4:])
    assert m2.compute()["crmse"] == pytest.approx(M.pdebench_metrics(pred, true)["crmse"], rel=1e-9)
    m2.reset()
    m2.update(pred[:2], true[:2])
    assert m2.compute()["nrmse"] == pytest.approx(M.pdebench_metrics(pred[:2], true[:2])["nrmse"], rel=1e-9)


def test_rollout_metrics_reduce_fx():
    m = M.RolloutMetrics()
    red = m._reductions
    assert all(red[n] is not None for n in red)
    from torchmetrics.utilities.data import dim_zero_max, dim_zero_sum

    assert red["max_err"] is dim_zero_max
    assert all(red[n] is dim_zero_sum for n in red if n != "max_err")


def test_physics_metrics():
    X, T = 64, 6
    x = torch.arange(X, dtype=torch.float64) / X
    u0 = torch.sin(2 * math.pi * x)[None].repeat(2, 1) + 1.5
    decay = torch.linspace(0.9, 0.5, T, dtype=torch.float64)
    # amplitude decays around the conserved mean: no drift, no energy or TV creation
    pred = 1.5 + (u0 - 1.5)[:, None, :] * decay[None, :, None]
    assert M.mass_drift(pred, 1 / X, u0=u0) == pytest.approx(0.0, abs=1e-12)
    assert M.energy_increase(pred, u0=u0) == 0.0
    assert M.tv_increase(pred, u0=u0) == 0.0
    # shift the mass of the last frame by 0.1: drift = 0.1 X dx / sum|u0| dx = 0.1 / 1.5
    shifted = pred.clone()
    shifted[:, -1] += 0.1
    assert M.mass_drift(shifted, 1 / X, u0=u0) == pytest.approx(0.1 / 1.5, rel=1e-9)
    assert M.mass_drift(shifted, 1 / X, u0=u0, reduce="mean") == pytest.approx(0.1 / 1.5 / T, rel=1e-9)
    # growing amplitude creates energy and TV
    grow = 1.5 + (u0 - 1.5)[:, None, :] * torch.linspace(1.1, 1.5, T, dtype=torch.float64)[None, :, None]
    assert M.energy_increase(grow, u0=u0) > 0.1
    e0 = float((u0[0] ** 2).sum() / 2)
    e_end = float((grow[0, -1] ** 2).sum() / 2)
    assert M.energy_increase(grow, u0=u0) == pytest.approx((e_end - e0) / e0, rel=1e-9)
    tv0 = float((torch.roll(u0[0], -1) - u0[0]).abs().sum())
    assert M.tv_increase(grow, u0=u0) == pytest.approx(0.5 * tv0 / tv0, rel=1e-9)
    assert M.spectral_energy_error(pred, pred) == 0.0
    assert M.spectral_energy_error(2 * pred, pred) == pytest.approx(3.0)


def test_correlation_horizon():
    B, T, X = 3, 6, 64
    x = torch.arange(X, dtype=torch.float64) / X
    true = torch.sin(2 * math.pi * x).expand(B, T, X).clone()
    pred = true.clone()
    pred[1, 2:] = -true[1, 2:]  # anti-correlated from frame k = 3 on
    pred[2, 4:] = torch.cos(2 * math.pi * x)  # uncorrelated from k = 5 on
    # sample 0 never decorrelates -> T + 1
    assert M.correlation_horizon(pred, true) == pytest.approx(((T + 1) + 3 + 5) / 3)


def _brute_crps(ens, y, fair):
    m = ens.shape[0]
    a = np.mean(np.abs(ens - y))
    pair = sum(abs(ens[i] - ens[j]) for i in range(m) for j in range(m))
    return a - pair / (2 * m * (m - 1) if fair else 2 * m * m)


def test_crps_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    ens = torch.randn(5, 2, 3, 4, generator=g, dtype=torch.float64)
    true = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    e, t = ens.numpy(), true.numpy()
    for fair in (True, False):
        ref = np.mean([_brute_crps(e[:, b, i, j], t[b, i, j], fair)
                       for b in range(2) for i in range(3) for j in range(4)])
        assert M.crps_ensemble(ens, true, fair=fair) == pytest.approx(ref, rel=1e-10)
    assert M.crps_ensemble(true[None], true) == 0.0


def test_calibrated_ensemble_scores_calibrated():
    g = torch.Generator().manual_seed(2)
    M_, shape = 20, (4, 10, 200)
    centre = torch.randn(shape, generator=g, dtype=torch.float64)
    truth = centre + torch.randn(shape, generator=g, dtype=torch.float64)
    ens = centre[None] + torch.randn((M_, *shape), generator=g, dtype=torch.float64)
    assert M.spread_skill_ratio(ens, truth) == pytest.approx(1.0, abs=0.05)
    # M exchangeable members: coverage ~ the nearest representable nominal level (19/21, 11/21)
    assert M.coverage(ens, truth, 0.9) == pytest.approx(M.nearest_level(M_, 0.9)[1], abs=0.03)
    assert M.coverage(ens, truth, 0.5) == pytest.approx(M.nearest_level(M_, 0.5)[1], abs=0.03)
    assert M.ece_coverage(ens, truth) < 0.08
    # an over-confident ensemble: low spread/skill, poor coverage, large ECE
    tight = centre[None] + 0.1 * torch.randn((M_, *shape), generator=g, dtype=torch.float64)
    assert M.spread_skill_ratio(tight, truth) < 0.2
    assert M.coverage(tight, truth, 0.9) < 0.2
    assert M.ece_coverage(tight, truth) > 0.3


def test_all_metrics_keys():
    pred, true = _data(B=3, T=12, X=32)
    ens = pred[None] + 0.1 * torch.randn(4, *pred.shape, dtype=torch.float64)
    out = M.all_metrics(pred, true, u0=true[:, 0], ens=ens)
    for k in (*M.PDEBENCH_KEYS, "nrmse_1", "nrmse_10", "nrmse_31", "mass_drift", "energy_increase",
              "tv_increase", "spectral_energy_error", "correlation_horizon", "crps", "spread_skill",
              "coverage_50", "coverage_90", "ece"):
        assert k in out and isinstance(out[k], float), k
