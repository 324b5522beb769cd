"""The reference solver: accuracy against Cole-Hopf, conservation, TV, reproducibility, ICs."""
from __future__ import annotations

import numpy as np
import pytest

from ups_lightning.data import solver as S
from ups_lightning.data.solver import generate_trajectories
from ups_lightning.pdes import burgers as B
from ups_lightning.pdes import get_pde
from ups_lightning.pdes.burgers import cole_hopf, cole_hopf_cell_averages, solve_burgers
from ups_lightning.pdes.initial import cell_centres, init_multi


def _tv(u: np.ndarray) -> np.ndarray:
    return np.abs(np.roll(u, -1, axis=-1) - u).sum(axis=-1)


# -- the exact solution is itself right ---------------------------------------------------------
def test_cole_hopf_matches_initial_condition_and_pde():
    nu, diff = 0.05, 0.05 / np.pi
    x = np.linspace(0.0, 1.0, 400, endpoint=False)
    assert np.abs(cole_hopf(x, 0.0, nu) - np.sin(2 * np.pi * x)).max() < 1e-9
    modes = [(1, 0.6, 0.3), (3, 0.3, 1.1)]
    u0 = sum(a * np.sin(2 * np.pi * k * x + p) for k, a, p in modes)
    assert np.abs(cole_hopf(x, 0.0, nu, modes=modes) - u0).max() < 1e-9
    # residual of u_t + u u_x - D u_xx by centred differences (h^2-accurate)
    h, t = 2.5e-4, 0.2
    xs = np.linspace(0.05, 0.95, 37)
    f = lambda xx, tt: cole_hopf(xx, tt, nu)  # noqa: E731
    u = f(xs, t)
    u_t = (f(xs, t + h) - f(xs, t - h)) / (2 * h)
    u_x = (f(xs + h, t) - f(xs - h, t)) / (2 * h)
    u_xx = (f(xs + h, t) - 2 * u + f(xs - h, t)) / h**2
    assert np.abs(u_t + u * u_x - diff * u_xx).max() < 1e-4 * np.abs(u * u_x).max()
    # cell averages are consistent with point values
    avg = cole_hopf_cell_averages(512, t, nu)
    pts = cole_hopf(cell_centres(512), t, nu)
    assert np.abs(avg - pts).max() < 1e-3


def test_cole_hopf_refuses_ill_conditioned_nu():
    with pytest.raises(ValueError, match="too small"):
        cole_hopf(np.linspace(0, 1, 8), 0.1, 0.001)


# -- accuracy: second order under grid refinement ----------------------------------------------
def test_convergence_order_against_cole_hopf():
    nu, t_end = 0.05, 0.25          # steep (shock forming) but smooth solution of sin(2 pi x)
    grids = [64, 128, 256, 512]
    errors = []
    for nx in grids:
        u0 = cole_hopf_cell_averages(nx, 0.0, nu)
        u = solve_burgers(u0[None], nu, [0.0, t_end])[0, -1]
        exact = cole_hopf_cell_averages(nx, t_end, nu)
        errors.append(np.sqrt(np.mean((u - exact) ** 2)))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 5e-5, errors
    assert (orders > 1.7).all(), (errors, orders)


# -- conservation and total variation ----------------------------------------------------------
def test_mass_conserved_to_round_off():
    seeds = np.arange(24) * 7 + 3
    u0 = init_multi(len(seeds), 128, seeds)
    u = solve_burgers(u0, 0.001, np.linspace(0.0, 2.0, 21))
    drift = np.abs(u.sum(axis=-1) - u0.sum(axis=-1, keepdims=True)).max(axis=1)
    rel = drift / np.abs(u0).sum(axis=-1)
    assert rel.max() < 1e-12, rel.max()


def test_total_variation_non_increasing():
    # random PDEBench ICs, including abs() (16, 20) and windowed (2, 5) ones
    seeds = np.array([0, 1, 2, 5, 16, 20, 7, 11])
    u0 = init_multi(len(seeds), 128, seeds)
    u = solve_burgers(u0, 0.001, np.linspace(0.0, 2.0, 401))   # ~1-2 steps per frame
    tv = _tv(u)
    increase = np.diff(tv, axis=1)
    assert (increase <= 1e-12 * tv[:, :1]).all(), increase.max()
    assert (tv[:, -1] < tv[:, 0]).all()          # and it really dissipates


def test_energy_non_increasing_and_max_principle():
    u0 = init_multi(8, 128, np.arange(8))
    u = solve_burgers(u0, 0.001, np.linspace(0.0, 2.0, 41))
    energy = 0.5 * (u**2).sum(axis=-1)
    assert (np.diff(energy, axis=1) <= 1e-12 * energy[:, :1]).all()
    assert (np.abs(u).max(axis=(1, 2)) <= np.abs(u0).max(axis=1) + 1e-12).all()


# -- time stepping details ---------------------------------------------------------------------
def test_save_times_hit_and_frame_zero_is_u0():
    u0 = init_multi(3, 64, [4, 5, 6])
    t_save = np.array([0.0, 0.013, 0.1, 0.1000001, 0.7])
    u = solve_burgers(u0, 0.01, t_save)
    assert u.shape == (3, 5, 64) and u.dtype == np.float64
    assert np.array_equal(u[:, 0], u0)
    # one step of dt=1e-7 barely moves the field
    assert np.abs(u[:, 3] - u[:, 2]).max() < 1e-5
    # a single (nx,) field is accepted and gives the same answer as its row
    assert np.array_equal(solve_burgers(u0[1], 0.01, t_save), u[1])


def test_zero_field_and_inviscid_limit():
    u0 = np.zeros((2, 32))
    u0[1] = np.sin(2 * np.pi * cell_centres(32))
    u = solve_burgers(u0, 0.0, [0.0, 0.05, 0.1])
    assert np.array_equal(u[0], np.zeros((3, 32)))
    assert np.isfinite(u).all()


@pytest.mark.parametrize("bad", [
    dict(t_save=[0.1, 0.2]), dict(t_save=[0.0, 0.2, 0.1]), dict(nu=-1.0),
    dict(u0=np.full((1, 8), np.nan)), dict(u0=np.zeros((1, 2, 8))),
])
def test_solver_rejects_bad_arguments(bad):
    args = dict(u0=np.zeros((1, 8)), nu=0.01, t_save=[0.0, 0.1])
    args.update(bad)
    with pytest.raises(ValueError):
        solve_burgers(**args)


# -- reproducibility ---------------------------------------------------------------------------
def test_allocation_free_rhs_matches_reference_bit_for_bit():
    u = init_multi(5, 48, np.arange(5) + 11)
    u[2] = np.repeat([1.0, -0.5, 0.25, 0.0], 12)          # flat pieces and jumps: limiter cases
    for diff in (0.0, 0.001 / np.pi, 0.3):
        out = np.empty_like(u)
        B._rhs_into(u, 1 / 48, diff, B._Workspace(u.shape), out)
        assert np.array_equal(out, B.burgers_rhs(u, 1 / 48, diff))


def test_rows_independent_of_batch_bit_for_bit():
    seeds = [3, 1000, 0, 42, 9]
    u0 = init_multi(len(seeds), 64, seeds)
    u0[2] = 0.0                                   # a row that never moves (dt = inf -> clipped)
    t_save = np.linspace(0.0, 1.0, 6)
    together = solve_burgers(u0, 0.001, t_save)
    for i in range(len(seeds)):
        alone = solve_burgers(u0[i:i + 1], 0.001, t_save)
        assert np.array_equal(alone[0], together[i]), i
    assert np.array_equal(solve_burgers(u0[::-1], 0.001, t_save)[::-1], together)


def test_generate_trajectories_reproducible_and_worker_independent():
    kw = dict(pde="burgers1d", params={"nu": 0.001}, n=10, nx=32, nt=6, t_max=0.5,
              seeds=np.arange(10) + 77, progress=False)
    one = generate_trajectories(workers=1, **kw)
    two = generate_trajectories(workers=2, **kw)
    again = generate_trajectories(workers=1, **kw)
    assert one.shape == (10, 6, 32, 1) and one.dtype == np.float32
    assert np.array_equal(one, two) and np.array_equal(one, again)
    # each row equals the row solved on its own (by the scheme itself and through the spec)
    alone = solve_burgers(init_multi(1, 32, [80]), 0.001, np.linspace(0, 0.5, 6))
    assert np.array_equal(one[3, ..., 0], alone[0].astype(np.float32))
    spec = get_pde("burgers1d")
    via_spec = spec.solve(spec.initial_conditions([80], 32), {"nu": 0.001}, np.linspace(0, 0.5, 6))
    assert np.array_equal(one[3], via_spec[0].astype(np.float32))
    # chunking never changes a row
    rows = {int(r): f for rs, fs in S.iter_trajectory_chunks("burgers1d", {"nu": 0.001}, 10, 32, 6, 0.5,
                                                             kw["seeds"], workers=1, chunk=3)
            for r, f in zip(rs, fs)}
    assert all(np.array_equal(rows[i], one[i]) for i in range(10))


# -- initial conditions ------------------------------------------------------------------------
def test_initial_condition_statistics():
    n, nx = 2000, 128
    u = init_multi(n, nx, np.arange(n))
    assert u.shape == (n, nx) and u.dtype == np.float64 and np.isfinite(u).all()
    # deterministic per seed, independent of the other seeds in the call
    assert np.array_equal(init_multi(1, nx, [1234])[0], u[1234])
    assert not np.array_equal(u[0], u[1])
    # two sines with amplitudes < 1: |u| < 2
    assert np.abs(u).max() < 2.0
    one_sign = (u >= 0).all(axis=1) | (u <= 0).all(axis=1)       # abs() was applied
    windowed = np.abs(u[:, :3]).max(axis=1) < 1e-6                # tanh window closes the edges
    assert 0.07 < one_sign.mean() < 0.13, one_sign.mean()
    assert 0.07 < windowed.mean() < 0.13, windowed.mean()
    plain = ~one_sign & ~windowed
    # plain fields: zero mean, energy only in wavenumbers 1..4, amplitude per mode < 1
    spec = np.abs(np.fft.rfft(u[plain], axis=1)) * 2 / nx
    assert np.abs(spec[:, 0]).max() < 1e-12
    assert spec[:, 5:].max() < 1e-12
    assert spec[:, 1:5].max() < 2.0 and (spec[:, 1:5].max(axis=1) > 0).all()
    # every wavenumber 1..4 occurs; a sign flip is a coin toss
    used = (spec[:, 1:5] > 1e-9).mean(axis=0)
    assert (used > 0.25).all(), used
    first_sign = np.sign(u[plain, :].sum(axis=1) + u[plain, 0])
    assert 0.4 < (first_sign > 0).mean() < 0.6


def test_init_multi_rejects_bad_seeds():
    with pytest.raises(ValueError):
        init_multi(2, 16, [1])
    with pytest.raises(ValueError):
        init_multi(1, 16, [-1])
