"""PDEBench 1D Burgers: u_t + (u^2/2)_x = (nu/pi) u_xx, periodic (benchmark.md section 1).

Reference solver: finite volume, MUSCL reconstruction with the monotonised-central (MC) limiter,
local Lax-Friedrichs interface flux, central-difference diffusion (written as an interface flux so the
update is exactly conservative up to round-off), two-stage midpoint time stepping

    u* = u + dt/2 R(u);   u_new = u + dt R(u*)

with dt = cfl * min(dx / max|u|, 0.5 dx^2 / (nu/pi)) chosen per trajectory (PDEBench's rule: the CFL
factor scales the diffusive limit too; see ``_stable_dt``) and clipped so that every save time is hit
exactly. Everything is float64 and vectorised over trajectories (rows); every operation is row-local.
Validated against the exact Cole-Hopf solution (also here): second order in space and time where the
solution is smooth (tests/test_solver.py; README "Reference solvers").
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ups_lightning.pdes.base import PDE, Parameter, Published
from ups_lightning.pdes.initial import INIT_MULTI_DOC, init_multi

__all__ = ["Burgers1D", "solve_burgers", "burgers_rhs", "cole_hopf", "cole_hopf_cell_averages",
           "SOLVER_SETTINGS"]

#: What the scheme is, for manifests and reports.
SOLVER_SETTINGS = {
    "equation": "u_t + (u^2/2)_x = (nu/pi) u_xx, periodic",
    "scheme": "finite volume, MUSCL + MC limiter, local Lax-Friedrichs flux, central diffusion",
    "time_stepping": "two-stage midpoint: u* = u + dt/2 R(u); u_new = u + dt R(u*)",
    "cfl": 0.25,
    "diffusive_limit": 0.5,
    "dt_rule": "per trajectory: cfl * min(dx / max|u|, 0.5 dx^2 / (nu/pi)) (PDEBench), clipped to hit"
    " save times",
    "precision": "float64 compute, float32 storage",
    "initial_condition": INIT_MULTI_DOC,
}


# --------------------------------------------------------------------------------------------
# the scheme
# --------------------------------------------------------------------------------------------
def burgers_rhs(u: np.ndarray, dx: float, diff: float) -> np.ndarray:
    """Semi-discrete right-hand side R(u) = -(F_{i+1/2} - F_{i-1/2}) / dx for rows of ``u``.

    F = local Lax-Friedrichs flux of the MUSCL/MC-reconstructed states, minus the central
    diffusive flux ``diff * (u_{i+1} - u_i) / dx``.
    """
    up = np.roll(u, -1, axis=-1)           # u_{i+1}
    dp = up - u                            # forward difference at i (= backward at i+1)
    dm = np.roll(dp, 1, axis=-1)           # backward difference at i
    # MC limiter: minmod(2 dm, 2 dp, (dm + dp)/2); zero unless dm and dp share a sign
    mag = np.minimum(np.minimum(np.abs(dm), np.abs(dp)) * 2.0, 0.5 * np.abs(dm + dp))
    half_slope = 0.25 * (np.sign(dm) + np.sign(dp)) * mag      # = slope / 2
    u_l = u + half_slope                                       # left state at i+1/2
    u_r = np.roll(u - half_slope, -1, axis=-1)                 # right state at i+1/2
    speed = np.maximum(np.abs(u_l), np.abs(u_r))
    flux = 0.25 * (u_l * u_l + u_r * u_r) - 0.5 * speed * (u_r - u_l)
    if diff:
        flux -= (diff / dx) * dp
    return (np.roll(flux, 1, axis=-1) - flux) / dx


class _Workspace:
    """Preallocated buffers for ``_rhs_into`` (the solver's hot loop allocates nothing: with
    fresh temporaries per operation, page faults cost as much system time as the arithmetic)."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        (self.dp, self.dm, self.t1, self.t2, self.t3, self.ul, self.ur, self.r,
         self.stage) = (np.empty(shape) for _ in range(9))


def _rhs_into(u: np.ndarray, dx: float, diff: float, w: _Workspace, out: np.ndarray) -> np.ndarray:
    """``burgers_rhs`` into ``out`` with the same operations in the same order (bit-identical)."""
    dp, dm, t1, t2, t3, ul, ur = w.dp, w.dm, w.t1, w.t2, w.t3, w.ul, w.ur
    np.subtract(u[:, 1:], u[:, :-1], out=dp[:, :-1])          # dp = roll(u, -1) - u
    np.subtract(u[:, :1], u[:, -1:], out=dp[:, -1:])
    dm[:, 1:] = dp[:, :-1]                                     # dm = roll(dp, 1)
    dm[:, :1] = dp[:, -1:]
    np.abs(dm, out=t1)                                         # MC limiter magnitude -> t1
    np.abs(dp, out=t2)
    np.minimum(t1, t2, out=t1)
    t1 *= 2.0
    np.add(dm, dp, out=t2)
    np.abs(t2, out=t2)
    np.multiply(0.5, t2, out=t2)
    np.minimum(t1, t2, out=t1)
    np.sign(dm, out=t2)                                        # half slope -> t2
    np.sign(dp, out=t3)
    t2 += t3
    np.multiply(0.25, t2, out=t2)
    t2 *= t1
    np.add(u, t2, out=ul)                                      # u_l
    np.subtract(u, t2, out=t3)                                 # u_r = roll(u - hs, -1)
    ur[:, :-1] = t3[:, 1:]
    ur[:, -1:] = t3[:, :1]
    np.abs(ul, out=t1)                                         # speed -> t1
    np.abs(ur, out=t2)
    np.maximum(t1, t2, out=t1)
    np.multiply(ul, ul, out=t2)                                # flux -> t2
    np.multiply(ur, ur, out=t3)
    t2 += t3
    np.multiply(0.25, t2, out=t2)
    np.multiply(0.5, t1, out=t1)
    np.subtract(ur, ul, out=t3)
    t1 *= t3
    t2 -= t1
    if diff:
        np.multiply(diff / dx, dp, out=t1)
        t2 -= t1
    np.subtract(t2[:, :-1], t2[:, 1:], out=out[:, 1:])        # roll(flux, 1) - flux
    np.subtract(t2[:, -1:], t2[:, :1], out=out[:, :1])
    out /= dx
    return out


def _stable_dt(u: np.ndarray, dx: float, diff: float, cfl: float) -> np.ndarray:
    umax = np.max(np.abs(u), axis=-1)
    with np.errstate(divide="ignore"):
        dt = np.where(umax > 0.0, cfl * dx / np.where(umax > 0.0, umax, 1.0), np.inf)
    if diff > 0.0:
        # PDEBench multiplies the diffusive limit by the CFL number too. Without it, dt = 0.5
        # dx^2/D sits exactly on the midpoint rule's stability boundary for the highest mode
        # (G(-2) = 1) and advection tips it over: the scheme blows up wherever this limit binds.
        dt = np.minimum(dt, cfl * 0.5 * dx * dx / diff)
    return dt


def solve_burgers(
    u0: np.ndarray,
    nu: float,
    t_save: Sequence[float] | np.ndarray,
    domain_length: float = 1.0,
    cfl: float = 0.25,
) -> np.ndarray:
    """Solve from ``u0`` (B, nx) (or (nx,)) and return (B, len(t_save), nx) float64; frame 0 is u0.

    ``t_save`` is increasing and starts at 0 (relative to u0's time). Each trajectory takes its own
    time steps; one that has reached the next save time waits (dt = 0) until all have.
    """
    u = np.array(u0, dtype=np.float64, copy=True)
    squeeze = u.ndim == 1
    if squeeze:
        u = u[None, :]
    if u.ndim != 2:
        raise ValueError(f"solve_burgers: u0 must be (B, nx), got shape {u.shape}")
    t_save = np.asarray(t_save, dtype=np.float64).reshape(-1)
    if t_save.size == 0 or t_save[0] != 0.0 or np.any(np.diff(t_save) <= 0):
        raise ValueError("solve_burgers: t_save must be increasing and start at 0")
    if not np.isfinite(u).all():
        raise ValueError("solve_burgers: u0 has non-finite values")
    if nu < 0 or cfl <= 0 or domain_length <= 0:
        raise ValueError("solve_burgers: need nu >= 0, cfl > 0, domain_length > 0")
    n_b, nx = u.shape
    dx = domain_length / nx
    diff = nu / np.pi
    out = np.empty((n_b, t_save.size, nx), dtype=np.float64)
    out[:, 0] = u
    t = np.zeros(n_b, dtype=np.float64)
    work = None

    for k in range(1, t_save.size):
        target = t_save[k]
        while True:
            active = t < target
            if not active.any():
                break
            if active.all():
                rows = None
                ua, ta = u, t
            else:                       # only rows that still move do work (row-local)
                rows = np.flatnonzero(active)
                ua, ta = u[rows], t[rows]
            dt = _stable_dt(ua, dx, diff, cfl)
            remaining = target - ta
            last = dt >= remaining
            dt = np.where(last, remaining, dt)
            dtc = dt[:, None]
            if work is None or work.shape != ua.shape:
                work = _Workspace(ua.shape)
            r, stage = work.r, work.stage
            _rhs_into(ua, dx, diff, work, r)                 # u* = u + (dt/2) R(u)
            np.multiply(0.5 * dtc, r, out=r)
            np.add(ua, r, out=stage)
            _rhs_into(stage, dx, diff, work, r)              # u_new = u + dt R(u*)
            np.multiply(dtc, r, out=r)
            t_new = np.where(last, target, ta + dt)
            if rows is None:
                ua += r
                t = t_new
            else:
                u[rows] = ua + r
                t[rows] = t_new
        if not np.isfinite(u).all():
            bad = np.flatnonzero(~np.isfinite(u).all(axis=1))
            raise FloatingPointError(
                f"solve_burgers: non-finite values at t={target} in rows {bad[:10].tolist()}")
        out[:, k] = u
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------------
# exact solution (Cole-Hopf)
# --------------------------------------------------------------------------------------------
class _ColeHopf:
    """phi_t = D phi_xx with phi0 = exp(-U0 / (2D)), U0' = u0; u = -2D phi_x / phi.

    u0(x) = sum_j a_j sin(2 pi k_j (x - x_left)/L + p_j) (zero mean, so U0 is periodic). phi0's
    Fourier coefficients come from an FFT of a grid fine enough that the tail is below round-off;
    the heat equation then acts mode by mode exactly.
    """

    def __init__(self, nu: float, modes, domain_length: float, x_left: float):
        if nu <= 0:
            raise ValueError("cole_hopf needs nu > 0")
        self.diff = nu / np.pi
        self.L = float(domain_length)
        self.x_left = float(x_left)
        self.modes = [(int(k), float(a), float(p)) for k, a, p in modes]
        m = 256
        while True:
            xi = np.arange(m) / m
            log_phi = self._log_phi0(xi)
            spread = log_phi.max() - log_phi.min()
            if spread > 18.0:   # relative error of u ~ eps * exp(spread): refuse below ~1e-8
                raise ValueError(
                    f"cole_hopf: nu={nu} is too small for an accurate Cole-Hopf evaluation "
                    f"(phi varies by e^{spread:.1f}); use a larger nu or smaller amplitudes")
            phi = np.exp(log_phi - log_phi.max())
            c = np.fft.rfft(phi) / m
            # keep modes down to the FFT's round-off floor; the rest is noise that the
            # derivative would amplify
            small = np.flatnonzero(np.abs(c) < 1e-16 * np.abs(c).max())
            if small.size and small[0] < m // 4:
                nmax = int(small[0])
                break
            if m >= 1 << 16:
                raise ValueError("cole_hopf: initial condition too steep to resolve")
            m *= 2
        self.c = c[:nmax]
        self.n = np.arange(nmax)

    def _log_phi0(self, xi):
        # U0(x) = sum -a L/(2 pi k) cos(2 pi k xi + p); log phi0 = -U0 / (2D)
        u_int = np.zeros_like(xi)
        for k, a, p in self.modes:
            u_int -= a * self.L / (2 * np.pi * k) * np.cos(2 * np.pi * k * xi + p)
        return -u_int / (2 * self.diff)

    def _phi(self, xi, t, derivative: bool):
        wn = 2 * np.pi * self.n / self.L
        decay = self.c * np.exp(-self.diff * wn**2 * t)
        decay[1:] *= 2.0                                   # real signal: +/- n pairs
        arg = 2 * np.pi * np.outer(xi.reshape(-1), self.n)
        if derivative:   # d/dx Re(c e^{i wn x})
            val = (-(decay.real) * np.sin(arg) - decay.imag * np.cos(arg)) @ wn
        else:
            val = decay.real @ np.cos(arg).T - decay.imag @ np.sin(arg).T
        return val.reshape(xi.shape)

    def u(self, x, t):
        xi = (np.asarray(x, dtype=np.float64) - self.x_left) / self.L
        return -2 * self.diff * self._phi(xi, t, True) / self._phi(xi, t, False)

    def u0(self, x):
        xi = (np.asarray(x, dtype=np.float64) - self.x_left) / self.L
        return sum(a * np.sin(2 * np.pi * k * xi + p) for k, a, p in self.modes)

    def cell_averages(self, nx, t):
        # integral of u over a cell = -2D [log phi] between its faces: exact, no quadrature
        faces = (np.arange(nx + 1)) / nx
        log_phi = np.log(self._phi(faces, t, False))
        return -2 * self.diff * np.diff(log_phi) / (self.L / nx)


_DEFAULT_MODES = ((1, 1.0, 0.0),)


def cole_hopf(
    x: np.ndarray,
    t: float,
    nu: float,
    modes: Sequence[tuple[int, float, float]] = _DEFAULT_MODES,
    domain_length: float = 1.0,
    x_left: float = 0.0,
) -> np.ndarray:
    """Exact solution of u_t + (u^2/2)_x = (nu/pi) u_xx at points ``x`` and time ``t``.

    Initial condition u0(x) = sum over ``modes`` (k, a, p) of a sin(2 pi k (x - x_left)/L + p);
    default sin(2 pi x) on (0, 1). phi = exp(-U0/(2D)) spans a factor e^s (s = 1/(2 nu) for
    sin(2 pi x)), so the relative error is about 1e-16 e^s: ~5e-12 at nu = 0.05, ~4e-9 at
    nu = 0.03; raises ValueError when s > 18 (error above ~1e-8).
    """
    return _ColeHopf(nu, modes, domain_length, x_left).u(x, t)


def cole_hopf_cell_averages(
    nx: int,
    t: float,
    nu: float,
    modes: Sequence[tuple[int, float, float]] = _DEFAULT_MODES,
    domain_length: float = 1.0,
) -> np.ndarray:
    """Exact cell averages of the Cole-Hopf solution on ``nx`` cells of (0, L) at time t."""
    return _ColeHopf(nu, modes, domain_length, 0.0).cell_averages(nx, t)


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------
def _minmod(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(a * b > 0, torch.sign(a) * torch.minimum(a.abs(), b.abs()), torch.zeros_like(a))


def llf_flux_divergence(u: Tensor, dx: float) -> Tensor:
    """(F_{i+1/2} - F_{i-1/2}) / dx for f(u) = u^2/2, periodic, MUSCL-minmod + local Lax-Friedrichs."""
    up, um = torch.roll(u, -1, dims=-1), torch.roll(u, 1, dims=-1)
    slope = _minmod(u - um, up - u)
    left = u + 0.5 * slope                               # state left of interface i+1/2
    right = up - 0.5 * torch.roll(slope, -1, dims=-1)    # state right of interface i+1/2
    a = torch.maximum(left.abs(), right.abs())
    flux = 0.25 * (left * left + right * right) - 0.5 * a * (right - left)
    return (flux - torch.roll(flux, 1, dims=-1)) / dx


class Burgers1D(PDE):
    name = "burgers1d"
    title = "1D viscous Burgers"
    equation = "u_t + (u^2/2)_x = (nu/pi) u_xx, periodic"
    params = (Parameter("nu", ("Nu", "nu"), "Nu", 0.001, ref=0.001, feature="log10",
                        doc="the viscosity; the diffusivity is nu/pi as in PDEBench"),)
    filename = "1D_Burgers_Sols_Nu{nu}.hdf5"
    # energy and total variation never grow, mass is conserved; the trapezoidal residual
    # (u_next - u_prev)/dt - (R(u_prev) + R(u_next))/2 with a conservative MUSCL/LLF R(u): the
    # frames are tens of solver steps apart, so the truth does not score 0 across a moving shock
    # (0.1-0.5 at nu = 0.001, 256 cells) but lower than wrong candidates (measured against a
    # time-centred R((u_prev + u_next)/2), which gives the truth a clearly larger residual)
    penalties = ("mass", "energy", "tv", "pde")
    invariants = ("mass",)
    solver_settings = SOLVER_SETTINGS
    recipe_id = "init_multi/1"
    published = (Published("FNO", 0.029, {"nu": 0.001}, "PDEBench (Takamoto et al.), arXiv:2210.07182 v7 tables"),
                 Published("FNO", 0.042, {"nu": 0.001}, "PDEBench, NeurIPS 2022 Datasets and Benchmarks version"))

    def initial_conditions(self, seeds, nx):
        seeds = np.asarray(seeds).reshape(-1)
        return init_multi(seeds.size, nx, seeds)[..., None]

    def domain_forms(self, file_length):
        """PDEBench's released Burgers files store x in (-1, 1) while its generation config of the
        same version solves on (0, 1) (PDEBench issue #51): the unit interval is the second form,
        and the file's frames decide (pdes.fit)."""
        forms = super().domain_forms(file_length)
        if not math.isclose(float(file_length), 1.0, rel_tol=1e-6):
            forms.append(("the unit interval (PDEBench's Burgers generation; its released files store x in "
                          "(-1, 1): PDEBench issue #51)", 1.0))
        return forms

    def solve(self, u0, params, t_save, domain_length=1.0):
        u0 = np.asarray(u0)
        return solve_burgers(u0[..., 0], float(params["nu"]), t_save, domain_length)[..., None]

    def spatial_operator(self, u, params, dx):
        lap = (torch.roll(u, -1, dims=-1) - 2.0 * u + torch.roll(u, 1, dims=-1)) / (dx * dx)
        return -llf_flux_divergence(u, dx) + (float(params["nu"]) / math.pi) * lap

    def order_cases(self):
        """Convergence problems for ``python -m ups_lightning.bench.solver_order``."""
        nu, t_end = 0.1, 0.1

        def run(nx):
            u0 = cole_hopf_cell_averages(nx, 0.0, nu)[None, :, None]
            start = time.perf_counter()
            u = self.solve(u0, {"nu": nu}, [0.0, t_end])[0, -1, :, 0]
            return u, cole_hopf_cell_averages(nx, t_end, nu), time.perf_counter() - start

        return [{"title": f"{self.name}: u0 = sin(2 pi x), nu = {nu:g}, t = {t_end:g}, vs the exact "
                          f"Cole-Hopf cell averages", "run": run}]
