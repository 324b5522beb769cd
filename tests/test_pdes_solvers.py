"""The advection and diffusion-reaction specs: their reference solvers against exact and independent
solutions (measured orders), row-locality, initial conditions, parameters, file names, the spatial
operator and the TTC rewards."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ups_lightning.errors import UserError
from ups_lightning.pdes import get_pde, pde_of_file_attrs
from ups_lightning.pdes.advection import advection_rhs, sin_cell_averages as _sin_cell_averages
from ups_lightning.pdes.advection import solve_advection
from ups_lightning.pdes.initial import cell_centres
from ups_lightning.pdes.reacdiff import (SpectralReference, laplacian_symbol, logistic_flow, mol_rk4,
                                         normalise_unit_interval, solve_reacdiff)
from ups_lightning.pdes.reacdiff import smooth_unit_field as _smooth_unit

ADV = "advection1d"
RD = "reacdiff1d"


def _orders(errors, grids=None) -> np.ndarray:
    e = np.asarray(errors, dtype=np.float64)
    ratio = 2.0 if grids is None else np.asarray(grids[1:], float) / np.asarray(grids[:-1], float)
    return np.log(e[:-1] / e[1:]) / np.log(ratio)


def test_exact_test_fields():
    nx = 64
    x = cell_centres(nx)
    # cell averages of sin(2 pi (x - s)) are the point values scaled by sinc(dx)
    s = 0.3
    scale = np.sin(np.pi / nx) / (np.pi / nx)
    assert np.abs(_sin_cell_averages(nx, s) - scale * np.sin(2 * np.pi * (x - s))).max() < 1e-14
    u = _smooth_unit(cell_centres(4096))
    assert 0.0 < u.min() and u.max() < 1.0


# ================================================================================================
# advection
# ================================================================================================
@pytest.mark.parametrize("beta", [1.0, -0.4])
def test_advection_converges_to_exact_shift(beta):
    """MC-limited MUSCL: ~2nd order in L1, ~1.7 in L2 (the limiter clips smooth extrema)."""
    spec = get_pde(ADV)
    t_end = 1.0 if beta > 0 else 0.75
    grids = [64, 128, 256, 512]
    l1, l2 = [], []
    for nx in grids:
        u0 = _sin_cell_averages(nx)[None, :, None]
        u = spec.solve(u0, {"beta": beta}, [0.0, t_end / 2, t_end])[0, -1, :, 0]
        err = u - _sin_cell_averages(nx, beta * t_end)
        l1.append(np.abs(err).mean())
        l2.append(np.sqrt((err**2).mean()))
    o1, o2 = _orders(l1), _orders(l2)
    assert l2[-1] < 3e-4, l2
    assert (o1[1:] > 1.85).all(), (l1, o1)
    assert (o2 > 1.6).all(), (l2, o2)


def test_advection_unlimited_scheme_is_exactly_second_order():
    """With the limiter off (Fromm) the same scheme converges at order 2 in every norm."""
    grids = [32, 64, 128, 256]
    l2, linf = [], []
    for nx in grids:
        u = solve_advection(_sin_cell_averages(nx)[None], 1.0, [0.0, 1.0], limiter="none")[0, -1]
        err = u - _sin_cell_averages(nx, 1.0)
        l2.append(np.sqrt((err**2).mean()))
        linf.append(np.abs(err).max())
    assert (_orders(l2) > 1.95).all(), l2
    assert (_orders(linf) > 1.95).all(), linf


def test_advection_on_pdebench_initial_conditions_matches_exact_shift():
    """init_multi fields moved by a whole number of cells (exact: a periodic roll)."""
    spec = get_pde(ADV)
    nx, beta, t_end = 512, 0.4, 0.625               # beta t = 0.25 = 128 cells
    u0 = spec.initial_conditions(np.arange(16), nx)
    sol = spec.solve(u0, {"beta": beta}, np.linspace(0.0, t_end, 6))
    exact = np.roll(u0[..., 0], 128, axis=-1)
    rel = np.sqrt(((sol[:, -1, :, 0] - exact) ** 2).mean(-1)) / np.sqrt((u0[..., 0] ** 2).mean(-1))
    assert np.median(rel) < 1e-2 and rel.max() < 5e-2, rel
    # conservative: the mean is kept to round-off; the total variation never grows
    mean = sol[..., 0].mean(-1)
    assert np.abs(mean - mean[:, :1]).max() < 1e-13
    tv = np.abs(np.roll(sol[..., 0], -1, -1) - sol[..., 0]).sum(-1)
    assert (np.diff(tv, axis=1) <= 1e-12).all()


def test_advection_zero_speed_is_identity_and_save_times_are_hit():
    spec = get_pde(ADV)
    u0 = spec.initial_conditions([1, 2], 64)
    sol = spec.solve(u0, {"beta": 0.0}, [0.0, 0.3, 1.0])
    assert np.array_equal(sol[:, -1], u0)
    # a full period at any beta returns (close) to the start; frame 0 is u0 exactly
    sol = spec.solve(u0, {"beta": 2.0}, [0.0, 0.123, 0.5])
    assert np.array_equal(sol[:, 0], u0)
    assert sol.shape == (2, 3, 64, 1) and sol.dtype == np.float64


# ================================================================================================
# diffusion-reaction
# ================================================================================================
def test_reacdiff_pure_diffusion_matches_heat_equation():
    """rho -> 0: a Fourier mode decays exactly as the semi-discrete heat equation says (to
    round-off) and converges at order 2 to the continuous decay exp(-4 pi^2 nu t)."""
    nu, t_end = 0.5, 0.1
    errs = []
    grids = [32, 64, 128, 256]
    for nx in grids:
        x = cell_centres(nx)
        u0 = 0.5 + 0.3 * np.sin(2 * np.pi * x)
        u = solve_reacdiff(u0[None], nu, 0.0, [0.0, t_end])[0, -1]
        lam = 4.0 * np.sin(np.pi / nx) ** 2 * nx * nx             # the central difference's mode
        assert np.abs(u - (0.5 + 0.3 * np.sin(2 * np.pi * x) * np.exp(-nu * lam * t_end))).max() < 1e-14
        continuous = 0.5 + 0.3 * np.sin(2 * np.pi * x) * np.exp(-nu * 4 * np.pi**2 * t_end)
        errs.append(np.abs(u - continuous).max())
    assert (_orders(errs) > 1.95).all(), errs
    # through the spec with a tiny rho: the same to ~rho
    spec = get_pde(RD)
    x = cell_centres(64)
    u0 = (0.5 + 0.3 * np.sin(2 * np.pi * x))[None, :, None]
    a = spec.solve(u0, {"nu": nu, "rho": 1e-12}, [0.0, t_end])[0, -1, :, 0]
    b = solve_reacdiff(u0[..., 0], nu, 0.0, [0.0, t_end])[0, -1]
    assert np.abs(a - b).max() < 1e-11


def test_reacdiff_reaction_matches_exact_logistic():
    """Constant fields (any nu) and nu -> 0 (any field): the exact logistic solution."""
    spec = get_pde(RD)
    rho, t = 3.0, np.linspace(0.0, 1.0, 6)
    c = np.array([0.0, 1e-3, 0.3, 0.9, 1.0])
    u0 = np.repeat(c[:, None], 32, axis=1)[..., None]
    sol = spec.solve(u0, {"nu": 0.5, "rho": rho}, t)[..., 0]
    g = np.exp(rho * t)[None, :, None]
    exact = c[:, None, None] * g / (1.0 - c[:, None, None] + c[:, None, None] * g)
    assert np.abs(sol - exact).max() < 1e-13
    x = cell_centres(64)
    v0 = _smooth_unit(x)
    sol = spec.solve(v0[None, :, None], {"nu": 1e-14, "rho": rho}, t)[0, :, :, 0]
    g = np.exp(rho * t)[:, None]
    assert np.abs(sol - v0 * g / (1.0 - v0 + v0 * g)).max() < 1e-11
    g = math.exp(1.4)
    assert np.abs(logistic_flow(np.array([0.25]), 2.0, 0.7) - 0.25 * g / (0.75 + 0.25 * g)).max() < 1e-15


def test_reacdiff_second_order_in_time_against_rk4():
    """The Strang splitting against classical RK4 on the same semi-discrete system."""
    nx, nu, rho, t_end = 64, 0.01, 5.0, 0.5
    spec = get_pde(RD)
    u0 = np.concatenate([_smooth_unit(cell_centres(nx))[None],
                         spec.initial_conditions([0, 1, 2], nx)[..., 0]])
    ref = mol_rk4(u0, nu, rho, t_end, safety=0.25)
    errs = [np.abs(solve_reacdiff(u0, nu, rho, [0.0, t_end], dt=t_end / n)[:, -1] - ref).max()
            for n in (8, 16, 32, 64)]
    assert (_orders(errs) > 1.9).all(), errs
    # stiff diffusion (PDEBench's nu = 0.5): the default step is within ~1e-5 of RK4
    nu, rho = 0.5, 1.0
    ref = mol_rk4(u0, nu, rho, 0.2)
    assert np.abs(solve_reacdiff(u0, nu, rho, [0.0, 0.1, 0.2])[:, -1] - ref).max() < 2e-5


def test_reacdiff_second_order_in_space_against_spectral_reference():
    nu, rho, t_end = 0.01, 5.0, 0.5
    ref = SpectralReference(_smooth_unit(cell_centres(256)), nu, rho, t_end, n_steps=1000)
    assert np.abs(ref.at(cell_centres(256))[0] - SpectralReference(
        _smooth_unit(cell_centres(256)), nu, rho, t_end, n_steps=500).at(cell_centres(256))[0]).max() < 1e-11
    spec = get_pde(RD)
    grids = [32, 64, 128, 256]
    errs = []
    for nx in grids:
        x = cell_centres(nx)
        u = spec.solve(_smooth_unit(x)[None, :, None], {"nu": nu, "rho": rho}, [0.0, t_end])[0, -1, :, 0]
        errs.append(np.sqrt(((u - ref.at(x)[0]) ** 2).mean()))
    assert errs[-1] < 2e-5, errs
    assert (_orders(errs) > 1.9).all(), errs


def test_reacdiff_initial_conditions_span_unit_interval_and_solution_stays_inside():
    spec = get_pde(RD)
    u0 = spec.initial_conditions(np.arange(40), 128)
    assert u0.shape == (40, 128, 1) and u0.dtype == np.float64
    assert (u0.min(axis=(1, 2)) == 0.0).all() and (u0.max(axis=(1, 2)) == 1.0).all()
    sol = spec.solve(u0[:8], {"nu": 0.01, "rho": 10.0}, np.linspace(0.0, 1.0, 11))
    assert sol.min() > -1e-12 and sol.max() < 1.0 + 1e-12
    # a constant field normalises to 0 (not NaN)
    assert np.array_equal(normalise_unit_interval(np.full((1, 8), 3.0)), np.zeros((1, 8)))


def test_reacdiff_laplacian_symbol_matches_central_difference():
    nx, dx = 16, 1.0 / 16
    rng = np.random.default_rng(0)
    u = rng.standard_normal(nx)
    direct = (np.roll(u, -1) - 2 * u + np.roll(u, 1)) / dx**2
    spectral = np.fft.irfft(np.fft.rfft(u) * laplacian_symbol(nx, dx), n=nx)
    assert np.abs(direct - spectral).max() < 1e-10


# ================================================================================================
# both specs: the interface contract
# ================================================================================================
PARAMS = {ADV: {"beta": 0.7}, RD: {"nu": 0.05, "rho": 4.0}}


@pytest.mark.parametrize("name", [ADV, RD])
def test_solve_is_row_local_bit_identical(name):
    spec = get_pde(name)
    u0 = spec.initial_conditions(np.arange(7), 64)
    t = [0.0, 0.05, 0.1, 0.25]
    batch = spec.solve(u0, PARAMS[name], t)
    for i in (0, 3, 6):
        alone = spec.solve(u0[i:i + 1], PARAMS[name], t)
        assert np.array_equal(alone[0], batch[i])
    assert np.array_equal(spec.solve(u0[[5, 2]], PARAMS[name], t), batch[[5, 2]])
    if name == ADV:   # the other direction of the wind takes the other branch
        b2 = spec.solve(u0, {"beta": -1.3}, t)
        assert np.array_equal(spec.solve(u0[4:5], {"beta": -1.3}, t)[0], b2[4])


@pytest.mark.parametrize("name", [ADV, RD])
def test_initial_conditions_deterministic_per_seed(name):
    spec = get_pde(name)
    a = spec.initial_conditions([3, 11, 5], 96)
    assert a.shape == (3, 96, 1) and a.dtype == np.float64
    assert np.array_equal(a, spec.initial_conditions([3, 11, 5], 96))
    assert np.array_equal(a[1], spec.initial_conditions([11], 96)[0])       # a row is its seed's alone
    assert np.array_equal(a[[2, 0]], spec.initial_conditions([5, 3], 96))
    assert not np.array_equal(a[0], a[2])
    assert np.isfinite(a).all()


@pytest.mark.parametrize("name", [ADV, RD])
def test_solve_refuses_bad_input(name):
    spec = get_pde(name)
    u0 = spec.initial_conditions([0, 1], 32)
    p = PARAMS[name]
    with pytest.raises(ValueError):
        spec.solve(u0[..., 0], p, [0.0, 0.1])                    # no channel axis
    with pytest.raises(ValueError):
        spec.solve(u0, p, [0.1, 0.2])                            # does not start at 0
    with pytest.raises(ValueError):
        spec.solve(u0, p, [0.0, 0.2, 0.1])                       # not increasing
    with pytest.raises(ValueError):
        spec.solve(u0, p, [0.0, float("nan")])
    bad = u0.copy()
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError):
        spec.solve(bad, p, [0.0, 0.1])
    with pytest.raises(ValueError):
        spec.solve(u0, {}, [0.0, 0.1])                           # missing parameter
    with pytest.raises(ValueError):
        spec.solve(u0, {k: float("inf") for k in p}, [0.0, 0.1])
    assert spec.solve(u0[:0], p, [0.0, 0.1]).shape == (0, 2, 32, 1)


def test_non_finite_results_raise_floating_point_error():
    adv = get_pde(ADV)
    huge = np.tile([1e308, -1e308], 16)[None, :, None]
    with pytest.raises(FloatingPointError), np.errstate(all="ignore"):
        adv.solve(huge, {"beta": 1.0}, [0.0, 0.1])
    rd = get_pde(RD)                                             # u < 0: the logistic blows up
    with pytest.raises(FloatingPointError):
        rd.solve(np.full((1, 16, 1), -1.0), {"nu": 0.1, "rho": 10.0}, [0.0, 1.0])


@pytest.mark.parametrize("name", [ADV, RD])
def test_check_params_refuses_missing_and_non_finite(name):
    spec = get_pde(name)
    good = spec.default_params()
    assert spec.check_params(good) == good
    for p in spec.params:
        with pytest.raises(UserError, match=p.name):
            spec.check_params({k: v for k, v in good.items() if k != p.name})
        for bad in (float("nan"), float("inf"), "x", None, True):
            with pytest.raises(UserError):
                spec.check_params({**good, p.name: bad})
    with pytest.raises(UserError):
        spec.check_params({**good, "mu": 1.0})


def test_parameter_ranges():
    adv, rd = get_pde(ADV), get_pde(RD)
    assert adv.check_params({"beta": -2.0}) == {"beta": -2.0}    # any finite speed
    assert adv.check_params({"beta": 0}) == {"beta": 0.0}
    for bad in ({"nu": 0.0, "rho": 1.0}, {"nu": 0.5, "rho": -1.0}):
        with pytest.raises(UserError):
            rd.check_params(bad)
    assert rd.features({"nu": 0.5, "rho": 10.0}) == pytest.approx([0.0, 1.0])
    assert adv.features({"beta": 0.4}) == pytest.approx([0.4])


def test_pdebench_file_names_and_attributes():
    adv, rd = get_pde(ADV), get_pde(RD)
    for beta in ("0.1", "0.2", "0.4", "0.7", "1.0", "2.0", "4.0", "7.0"):
        name = f"1D_Advection_Sols_beta{beta}.hdf5"
        assert adv.params_from_filename(f"/data/1D/Advection/Train/{name}") == {"beta": float(beta)}
        assert adv.file_name({"beta": float(beta)}) == name
    for nu, rho in (("0.5", "1.0"), ("0.5", "10.0"), ("2.0", "5.0"), ("5.0", "2.0")):
        name = f"ReacDiff_Nu{nu}_Rho{rho}.hdf5"
        assert rd.params_from_filename(name) == {"nu": float(nu), "rho": float(rho)}
        assert rd.file_name({"nu": float(nu), "rho": float(rho)}) == name
    # PDEBench's single-trajectory test files
    assert rd.params_from_filename("1D/ReactionDiffusion/Test/ReacDiff_react_Nu10.0_Rho2.0.hdf5") == \
        {"nu": 10.0, "rho": 2.0}
    # Data_Merge.py's attributes: beta for advection; Nu and (lower-case) rho for diffusion-reaction
    assert pde_of_file_attrs({"beta"}) == [ADV]
    assert pde_of_file_attrs({"Nu", "rho"})[0] == RD
    assert pde_of_file_attrs({"nu", "Rho"})[0] == RD


# ================================================================================================
# the spatial operator and the rewards
# ================================================================================================
@pytest.mark.parametrize("beta", [1.0, -0.7])
def test_advection_spatial_operator_matches_exact_time_derivative(beta):
    spec = get_pde(ADV)
    f = lambda x: np.sin(2 * np.pi * x) + 0.5 * np.cos(4 * np.pi * x + 0.3)  # noqa: E731
    rel = []
    for nx in (128, 256):
        x, h = cell_centres(nx), 1e-5
        u_t = (f(x - beta * h) - f(x + beta * h)) / (2 * h)         # d/dt of the exact u0(x - beta t)
        r = spec.spatial_operator(torch.from_numpy(f(x))[None], {"beta": beta}, 1.0 / nx)[0].numpy()
        assert np.abs(r - advection_rhs(f(x), beta, 1.0 / nx)).max() < 1e-9 * np.abs(r).max()
        rel.append(np.sqrt(((r - u_t) ** 2).mean() / (u_t**2).mean()))
    assert rel[-1] < 5e-3 and rel[0] / rel[1] > 2.5, rel


def test_reacdiff_spatial_operator_matches_exact_time_derivative():
    spec = get_pde(RD)
    nu, rho, h = 0.05, 3.0, 1e-4
    rel = []
    for nx in (128, 256):
        x = cell_centres(nx)
        u0 = _smooth_unit(x)
        # u_t at t = 0 from the independent spectral solution: one-sided, second order in h
        u1, u2 = (SpectralReference(_smooth_unit(cell_centres(64)), nu, rho, t, n_steps=4).at(x)[0]
                  for t in (h, 2 * h))
        u_t = (-3 * u0 + 4 * u1 - u2) / (2 * h)
        r = spec.spatial_operator(torch.from_numpy(u0)[None], {"nu": nu, "rho": rho}, 1.0 / nx)[0].numpy()
        rel.append(np.sqrt(((r - u_t) ** 2).mean() / (u_t**2).mean()))
    assert rel[-1] < 1e-3 and rel[0] / rel[1] > 3.5, rel         # O(dx^2): 1.7e-3, 4.2e-4


@pytest.mark.parametrize("name, params, nx, dt", [
    (ADV, {"beta": 1.0}, 128, 0.01),
    (ADV, {"beta": 0.1}, 256, 0.05),
    (RD, {"nu": 0.5, "rho": 1.0}, 128, 0.01),
    (RD, {"nu": 0.01, "rho": 5.0}, 128, 0.02),
])
def test_score_ranks_the_true_next_state_first(name, params, nx, dt):
    spec = get_pde(name)
    dx = 1.0 / nx
    u0 = spec.initial_conditions([4, 9, 21], nx)
    prev = spec.solve(u0, params, [0.0, 0.1])[:, -1]           # past the initial transient
    true = spec.solve(prev, params, [0.0, dt])[:, -1]
    rng = np.random.default_rng(0)
    scale = np.abs(true - prev).max(axis=(1, 2), keepdims=True) + 1e-3
    candidates = {
        "noise": true + 0.3 * scale * rng.standard_normal(true.shape),
        "frozen": prev,
        "offset": true + 0.5 * scale,
        "overshoot": prev + 2.0 * (true - prev),
    }
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    s_true = spec.score(t(prev), t(true), params, dx, dt)
    pen = spec.rewards(t(prev), t(true), params, dx, dt)
    assert set(pen) == set(spec.penalties)
    assert torch.isfinite(s_true).all()
    for what, cand in candidates.items():
        s = spec.score(t(prev), t(cand), params, dx, dt)
        assert (s_true > s).all(), (what, s_true, s)
    # float32 frames (as the models produce them) rank the same way
    s32 = spec.score(t(prev).float(), t(candidates["noise"]).float(), params, dx, dt)
    assert (spec.score(t(prev).float(), t(true).float(), params, dx, dt) > s32).all()


def test_spec_metadata():
    adv, rd = get_pde(ADV), get_pde(RD)
    assert adv.penalties == ("mass", "energy", "tv", "pde") and adv.invariants == ("mass",)
    assert rd.penalties == ("bounds", "pde") and rd.invariants == ("bounds",) and rd.bounds == (0.0, 1.0)
    for spec in (adv, rd):
        assert spec.fields == ("u",) and spec.spatial_dims == 1 and spec.boundary == "periodic"
        assert {"scheme", "dt_rule", "initial_condition"} <= set(spec.solver_settings)
    # the guard's projection keeps the diffusion-reaction field in [0, 1]
    u = torch.tensor([[[-0.2], [0.5], [1.3]]])
    assert rd.project(u, u).flatten().tolist() == [0.0, 0.5, 1.0]


# ================================================================================================
# the order bench (equation-agnostic; the problems are the specs' own)
# ================================================================================================
def test_solver_order_bench_prints_tables(capsys):
    from ups_lightning.bench.solver_order import cases_of, main

    assert len(cases_of(get_pde(ADV))) >= 1 and len(cases_of(get_pde(RD))) >= 1
    assert main(["--pde", ADV, RD, "--grids", "32", "64"]) == 0
    out = capsys.readouterr().out
    assert out.count("| 64 |") >= 3 and "| steps |" in out and "Total wall time" in out
    # advection's unlimited scheme shows order 2.00 already between 32 and 64 cells
    unlimited = out[out.index("limiter off"):]
    assert "| 2.00 | 2.00 | 2.00 |" in unlimited.split("**")[1]
