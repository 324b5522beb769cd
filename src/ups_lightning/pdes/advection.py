"""PDEBench 1D advection: u_t + beta u_x = 0, periodic on (0, L) (L = 1 in PDEBench).

PDEBench's generator (``pdebench/data_gen/data_gen_NLE/AdvectionEq/advection_multi_solution_Hydra.py``)
draws its initial conditions with ``utils.init_multi`` (the recipe Burgers uses too, ``k_tot=4``), and
solves with a finite-volume scheme: MUSCL reconstruction limited by the monotonised-central limiter
(``utils.VLlimiter``, alpha = 2), the upwind flux, two-stage midpoint time stepping and
dt = CFL dx / |beta| (CFL 0.4 in the released configurations), clipped to hit save times. It saves
201 frames, t = 0, 0.01, ..., 2 on 1024 cells of (0, 1), as ``1D_Advection_Sols_beta{beta}.hdf5``
(``tensor`` (N, 201, 1024) float32, ``x-coordinate`` (1024,), ``t-coordinate`` (202,): one more
entry than there are frames; ``Data_Merge.py`` writes the attribute ``beta``).

Reference solver here (re-implemented, same scheme family): finite volume, MUSCL + MC limiter, upwind
interface flux

    F_{i+1/2} = beta u^-_{i+1/2} (beta >= 0),   beta u^+_{i+1/2} (beta < 0),

two-stage midpoint time stepping u* = u + dt/2 R(u); u_new = u + dt R(u*), and a step size fixed by
the grid and beta alone: each save interval is split into n = ceil(interval / (cfl dx / |beta|))
equal steps, so save times are hit exactly and every row takes the same steps (row-local by
construction: a row's result never depends on its batch). float64 throughout, vectorised over rows.

Validated against the exact solution u0(x - beta t) (periodic) on sin(2 pi x), 32..512 cells: order
~1.96 in L1, ~1.7 in L2 and ~1.25 in Linf (the MC limiter clips smooth extrema to first order
locally); with the limiter off (``limiter="none"``, Fromm's scheme, validation only) exactly 2.00 in
every norm. See tests/test_pdes_solvers.py and ``python -m ups_lightning.bench.solver_order``.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ups_lightning.pdes.base import PDE, Parameter, Published, check_save_times, solver_rows, steps_per_interval
from ups_lightning.pdes.initial import INIT_MULTI_DOC, init_multi

__all__ = ["Advection1D", "solve_advection", "advection_rhs", "muscl_upwind_divergence",
           "sin_cell_averages", "SOLVER_SETTINGS"]

CFL = 0.4

#: What the scheme is, for manifests and reports.
SOLVER_SETTINGS = {
    "equation": "u_t + beta u_x = 0, periodic",
    "scheme": "finite volume, MUSCL + MC limiter (PDEBench VLlimiter, alpha=2), upwind flux",
    "time_stepping": "two-stage midpoint: u* = u + dt/2 R(u); u_new = u + dt R(u*)",
    "cfl": CFL,
    "dt_rule": "fixed by grid and beta: each save interval split into ceil(interval / (cfl dx / |beta|))"
    " equal steps (the same for every row)",
    "precision": "float64 compute",
    "initial_condition": INIT_MULTI_DOC,
    "validated_against": "exact solution u0(x - beta t), periodic",
}


# --------------------------------------------------------------------------------------------
# the scheme
# --------------------------------------------------------------------------------------------
LIMITERS = ("mc", "none")


def advection_rhs(u: np.ndarray, beta: float, dx: float, limiter: str = "mc") -> np.ndarray:
    """Semi-discrete R(u) = -(F_{i+1/2} - F_{i-1/2}) / dx for rows of ``u`` (..., X), periodic:
    MUSCL reconstruction with the MC limiter (``limiter="none"``: the unlimited central slope,
    Fromm's scheme, for validation only), upwind flux."""
    dp = np.roll(u, -1, axis=-1) - u                 # u_{i+1} - u_i
    dm = np.roll(dp, 1, axis=-1)                     # u_i - u_{i-1}
    if limiter == "none":
        half_slope = 0.25 * (dm + dp)
    else:
        # MC limiter: sign * min(2|dm|, 2|dp|, |dm + dp|/2) where dm, dp share a sign, else 0
        mag = np.minimum(2.0 * np.minimum(np.abs(dm), np.abs(dp)), 0.5 * np.abs(dm + dp))
        half_slope = 0.25 * (np.sign(dm) + np.sign(dp)) * mag   # slope / 2
    if beta >= 0.0:
        face = u + half_slope                        # left state of face i+1/2 (cell i)
    else:
        face = np.roll(u - half_slope, -1, axis=-1)  # right state of face i+1/2 (cell i+1)
    flux = beta * face
    return (np.roll(flux, 1, axis=-1) - flux) / dx


def _mc_half_slope(dm, dp, t1, t2, t3) -> None:
    """MC-limited half slope into ``t2`` (t1, t3 scratch)."""
    np.abs(dm, out=t1)
    np.abs(dp, out=t2)
    np.minimum(t1, t2, out=t1)
    np.multiply(2.0, t1, out=t1)
    np.add(dm, dp, out=t2)
    np.abs(t2, out=t2)
    np.multiply(0.5, t2, out=t2)
    np.minimum(t1, t2, out=t1)                       # magnitude
    np.sign(dm, out=t2)
    np.sign(dp, out=t3)
    np.add(t2, t3, out=t2)
    np.multiply(0.25, t2, out=t2)
    np.multiply(t2, t1, out=t2)                      # half slope


class _Workspace:
    """Preallocated buffers: the hot loop allocates nothing."""

    def __init__(self, shape: tuple[int, int]):
        self.dp, self.dm, self.t1, self.t2, self.face, self.r, self.stage = (
            np.empty(shape) for _ in range(7))


def _rhs_into(u: np.ndarray, beta: float, dx: float, w: _Workspace, out: np.ndarray,
              limiter: str = "mc") -> np.ndarray:
    """``advection_rhs`` into ``out`` (same operations, same order: bit-identical)."""
    dp, dm, t1, t2, face = w.dp, w.dm, w.t1, w.t2, w.face
    np.subtract(u[:, 1:], u[:, :-1], out=dp[:, :-1])
    np.subtract(u[:, :1], u[:, -1:], out=dp[:, -1:])
    dm[:, 1:] = dp[:, :-1]
    dm[:, :1] = dp[:, -1:]
    if limiter == "none":
        np.add(dm, dp, out=t2)
        np.multiply(0.25, t2, out=t2)
    else:
        _mc_half_slope(dm, dp, t1, t2, face)
    if beta >= 0.0:
        np.add(u, t2, out=face)
    else:
        np.subtract(u, t2, out=t1)
        face[:, :-1] = t1[:, 1:]
        face[:, -1:] = t1[:, :1]
    np.multiply(beta, face, out=face)                # flux at i+1/2
    np.subtract(face[:, -1:], face[:, :1], out=out[:, :1])
    np.subtract(face[:, :-1], face[:, 1:], out=out[:, 1:])
    np.divide(out, dx, out=out)
    return out


def solve_advection(u0: np.ndarray, beta: float, t_save: Sequence[float] | np.ndarray,
                    domain_length: float = 1.0, cfl: float = CFL, limiter: str = "mc") -> np.ndarray:
    """Solve u_t + beta u_x = 0 from ``u0`` (B, X) (or (X,)); returns (B, len(t_save), X) float64
    with frame 0 = u0. ``t_save`` increasing from 0 (relative to u0's time). ``limiter="none"``
    (unlimited central slopes) exists to validate the scheme's formal order only."""
    u, squeeze = solver_rows(u0, "solve_advection")
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"solve_advection: beta must be finite, got {beta}")
    if not (math.isfinite(domain_length) and domain_length > 0 and math.isfinite(cfl) and 0 < cfl <= 1):
        raise ValueError("solve_advection: need domain_length > 0 and 0 < cfl <= 1")
    if limiter not in LIMITERS:
        raise ValueError(f"solve_advection: limiter must be one of {LIMITERS}, got {limiter!r}")
    t_save = check_save_times(t_save, "solve_advection")
    n_b, nx = u.shape
    dx = domain_length / nx
    out = np.empty((n_b, t_save.size, nx), dtype=np.float64)
    out[:, 0] = u
    if n_b == 0:
        return out[0] if squeeze else out
    dt_max = cfl * dx / abs(beta) if beta != 0.0 else math.inf
    work = _Workspace(u.shape)
    r, stage = work.r, work.stage
    for k in range(1, t_save.size):
        interval = t_save[k] - t_save[k - 1]
        n = steps_per_interval(interval, dt_max)
        dt = interval / n
        if beta != 0.0:
            for _ in range(n):
                _rhs_into(u, beta, dx, work, r, limiter)          # u* = u + dt/2 R(u)
                np.multiply(0.5 * dt, r, out=r)
                np.add(u, r, out=stage)
                _rhs_into(stage, beta, dx, work, r, limiter)      # u_new = u + dt R(u*)
                np.multiply(dt, r, out=r)
                np.add(u, r, out=u)
        if not np.isfinite(u).all():
            bad = np.flatnonzero(~np.isfinite(u).all(axis=1))
            raise FloatingPointError(f"solve_advection: non-finite values at t={t_save[k]} in rows "
                                     f"{bad[:10].tolist()}")
        out[:, k] = u
    return out[0] if squeeze else out


def sin_cell_averages(nx: int, shift: float = 0.0, domain_length: float = 1.0) -> np.ndarray:
    """Exact cell averages of sin(2 pi (x - shift) / L) on ``nx`` cells of (0, L): the exact solution
    of this equation from sin(2 pi x / L) at time t is ``sin_cell_averages(nx, beta t)``."""
    faces = (np.arange(nx + 1) / nx) * domain_length - shift
    k = 2 * np.pi / domain_length
    return (np.cos(k * faces[:-1]) - np.cos(k * faces[1:])) * nx / (2 * np.pi)


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------
def muscl_upwind_divergence(u: Tensor, beta: float, dx: float) -> Tensor:
    """(F_{i+1/2} - F_{i-1/2}) / dx for F = beta u, periodic, MUSCL-MC reconstruction + upwind
    (the solver's semi-discrete operator, in torch)."""
    dp = torch.roll(u, -1, dims=-1) - u
    dm = torch.roll(dp, 1, dims=-1)
    mag = torch.minimum(2.0 * torch.minimum(dm.abs(), dp.abs()), 0.5 * (dm + dp).abs())
    half_slope = 0.25 * (torch.sign(dm) + torch.sign(dp)) * mag
    if beta >= 0.0:
        face = u + half_slope
    else:
        face = torch.roll(u - half_slope, -1, dims=-1)
    flux = beta * face
    return (flux - torch.roll(flux, 1, dims=-1)) / dx


class Advection1D(PDE):
    name = "advection1d"
    title = "1D linear advection"
    equation = "u_t + beta u_x = 0, periodic"
    # PDEBench's Data_Merge.py writes attrs["beta"]; released files also spell it in the file name.
    # Any finite beta is allowed (PDEBench uses beta > 0; the exact solution holds for any sign).
    params = (Parameter("beta", ("beta", "Beta"), "beta", 0.1, ref=1.0, feature="linear",
                        positive=False, doc="the advection speed"),)
    filename = "1D_Advection_Sols_beta{beta}.hdf5"
    # the exact flow conserves the mean, u^2 and the total variation (the scheme only lowers the
    # last two); the trapezoidal residual uses the solver's own MUSCL/upwind operator
    penalties = ("mass", "energy", "tv", "pde")
    invariants = ("mass",)
    recipe_id = "init_multi/1"
    published = (Published("FNO", 7.7e-3, {"beta": 0.1}, "PDEBench (Takamoto et al. 2022) tables"),)
    solver_settings = SOLVER_SETTINGS

    def initial_conditions(self, seeds, nx):
        seeds = np.asarray(seeds).reshape(-1)
        return init_multi(seeds.size, nx, seeds)[..., None]

    def solve(self, u0, params, t_save, domain_length=1.0):
        u, p = self.scalar_solve_inputs(u0, params)
        return solve_advection(u, p["beta"], t_save, domain_length)[..., None]

    def spatial_operator(self, u, params, dx):
        return -muscl_upwind_divergence(u, float(params["beta"]), dx)

    def order_cases(self):
        """Convergence problems for ``python -m ups_lightning.bench.solver_order``."""
        beta, t_end = 1.0, 1.0

        def run_spec(nx):
            u0 = sin_cell_averages(nx)[None, :, None]
            start = time.perf_counter()
            u = self.solve(u0, {"beta": beta}, [0.0, t_end])[0, -1, :, 0]
            return u, sin_cell_averages(nx, beta * t_end), time.perf_counter() - start

        def run_unlimited(nx):
            start = time.perf_counter()
            u = solve_advection(sin_cell_averages(nx)[None], beta, [0.0, t_end], limiter="none")[0, -1]
            return u, sin_cell_averages(nx, beta * t_end), time.perf_counter() - start

        return [
            {"title": f"{self.name}: u0 = sin(2 pi x), beta = {beta:g}, t = {t_end:g} (one period), vs "
                      f"the exact shifted cell averages (MC limiter: clips smooth extrema)",
             "run": run_spec},
            {"title": f"{self.name} with the limiter off (unlimited central slopes, Fromm; validation "
                      f"only): the scheme's formal order, same problem", "run": run_unlimited},
        ]
