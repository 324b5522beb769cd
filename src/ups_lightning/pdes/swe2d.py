"""PDEBench 2D shallow water, radial dam break: the numerics (issue 25).

    h_t + (hu)_x + (hv)_y = 0
    (hu)_t + (hu^2 + g h^2 / 2)_x + (huv)_y = 0
    (hv)_t + (huv)_x + (hv^2 + g h^2 / 2)_y = 0        on (-2.5, 2.5)^2, outflow boundaries

PDEBench's generator (``pdebench/data_gen/src/sim_radial_dam_break.py``, ``gen_radial_dam_break.py``,
config ``radial_dam_break.yaml``): g = 1; 128 x 128 cells; h = 2 inside a circle of radius R about the
origin and 1 outside, at rest, R ~ U(0.3, 0.7) from ``numpy.random.default_rng(seed)``; extrapolation
(outflow) boundaries; t in [0, 1] saved at 101 frames; pyclaw's Roe solver with entropy fix and the
MC limiter. Released as ``2D_rdb_NA_NA.h5``: one group per sample, ``data`` (101, 128, 128, 1) = h,
``grid/x``, ``grid/y``, ``grid/t``.

Reference solver here (re-implemented): finite volumes, MUSCL reconstruction of (h, hu, hv) with the
MC limiter, HLL fluxes (Einfeldt's wave-speed bounds), unsplit in x and y, SSP-RK2 (Heun) in time
at CFL ``CFL`` of each row's own fastest wave, so a row's result never depends on the other rows
of its batch; two ghost cells copy the edge cells (outflow). h stays positive for the dam-break
states (the centre empties to h ~ 0.5 near t = 0.8 as the water runs outward, measured on 48 x 48
cells; a step that would make it non-positive is an error), and mass is conserved until a wave leaves the box (after t = 1 for every
R <= 0.7: the fastest front, sqrt(2 g) + R, reaches 2.1 < 2.5). Validated against the exact
solution of the 1D dam break (a planar dam; first order in L1 across its shock, as every shock-capturing
scheme) and, on smooth data, second order against a finer solution (tests/test_pdes_2d.py).

``ShallowWater2D`` is its spec. PDEBench's file holds the depth alone (its momentum is not saved), so
the spec's solver takes either the full state (h, hu, hv) or a depth at rest (momentum zero: exact for
the dam at t = 0, not for a later frame): ``frames_hold_state = False``, so a solver row on this file
starts from frame 0, and the solver-based rewards and hybrids, which would start from a later frame,
are refused.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from ups_lightning.pdes.base import PDE, Parameter, Published, check_save_times, solver_fields_2d

__all__ = ["GRAVITY", "DOMAIN", "CFL", "solve_swe2d", "dam_break_state", "dam_radius", "exact_dam_break_1d",
           "SOLVER_SETTINGS", "ShallowWater2D"]

GRAVITY = 1.0
DOMAIN = ((-2.5, 2.5), (-2.5, 2.5))     # x, y
CFL = 0.4

SOLVER_SETTINGS = {
    "scheme": "finite volume, MUSCL (MC limiter) on (h, hu, hv), HLL fluxes, SSP-RK2, outflow ghost cells",
    "cfl": CFL,
    "order": "2 on smooth data, 1 in L1 across shocks (tests/test_pdes_2d.py)",
}


def _mc(d_minus: np.ndarray, d_plus: np.ndarray) -> np.ndarray:
    """The monotonised-central limited slope."""
    s = np.sign(d_minus) + np.sign(d_plus)
    return 0.5 * s * np.minimum(np.minimum(np.abs(d_minus), np.abs(d_plus)) * 2.0, 0.5 * np.abs(d_minus + d_plus))


def _hll(ql: np.ndarray, qr: np.ndarray, g: float) -> np.ndarray:
    """HLL flux through faces between left and right states (..., 3) = (h, hn, ht): n normal."""
    hl, hr = ql[..., 0], qr[..., 0]
    ul, ur = ql[..., 1] / hl, qr[..., 1] / hr
    cl, cr = np.sqrt(g * hl), np.sqrt(g * hr)
    sl = np.minimum(ul - cl, ur - cr)[..., None]
    sr = np.maximum(ul + cl, ur + cr)[..., None]

    def flux(q, u, h):
        return np.stack([q[..., 1], q[..., 1] * u + 0.5 * g * h * h, q[..., 2] * u], axis=-1)

    fl, fr = flux(ql, ul, hl), flux(qr, ur, hr)
    mid = (sr * fl - sl * fr + sl * sr * (qr - ql)) / np.where(sr - sl > 0, sr - sl, 1.0)
    return np.where(sl >= 0, fl, np.where(sr <= 0, fr, mid))


def _faces(q: np.ndarray, axis: int, g: float) -> np.ndarray:
    """Flux differences along ``axis`` (-3: y, -2: x) of the state (B, Y, X, 3) with two ghost
    cells copying the edge (outflow), divided later by the spacing."""
    pad = [(0, 0)] * q.ndim
    pad[axis] = (2, 2)
    p = np.pad(q, pad, mode="edge")
    n = q.shape[axis]

    def take(lo: int, count: int) -> np.ndarray:
        return np.take(p, np.arange(lo, lo + count), axis=axis)

    d = take(1, n + 3) - take(0, n + 3)                     # differences between n + 4 cells
    slope = _mc(np.take(d, np.arange(0, n + 2), axis=axis), np.take(d, np.arange(1, n + 3), axis=axis))
    cells = take(1, n + 2)                                  # cells -1 .. n, with their slopes
    left = np.take(cells + 0.5 * slope, np.arange(0, n + 1), axis=axis)    # face values, faces -1/2 .. n-1/2
    right = np.take(cells - 0.5 * slope, np.arange(1, n + 2), axis=axis)
    if axis == -2:       # x faces: normal momentum hu
        f = _hll(left, right, g)
    else:                # y faces: swap to (h, hv, hu), solve, swap back
        f = _hll(left[..., [0, 2, 1]], right[..., [0, 2, 1]], g)[..., [0, 2, 1]]
    return np.take(f, np.arange(1, n + 1), axis=axis) - np.take(f, np.arange(0, n), axis=axis)


def _rhs(q: np.ndarray, dx: float, dy: float, g: float) -> np.ndarray:
    return -_faces(q, -2, g) / dx - _faces(q, -3, g) / dy


def _fastest(q: np.ndarray, g: float) -> np.ndarray:
    h = q[..., 0]
    speed = np.maximum(np.abs(q[..., 1]), np.abs(q[..., 2])) / h + np.sqrt(g * h)
    return speed.reshape(q.shape[0], -1).max(axis=1)


def solve_swe2d(q0: np.ndarray, t_save: Sequence[float] | np.ndarray, g: float = GRAVITY,
                domain: Tuple[Tuple[float, float], Tuple[float, float]] = DOMAIN, cfl: float = CFL) -> np.ndarray:
    """Solve from ``q0`` (B, Y, X, 3) = (h, hu, hv) (or (Y, X, 3)); returns (B, len(t_save), Y, X, 3)
    float64, frame 0 = q0. Every row steps at its own CFL-limited dt, landing on each save time."""
    q, squeeze = solver_fields_2d(q0, 3, "solve_swe2d")
    if (q[..., 0] <= 0).any():
        raise ValueError("solve_swe2d: the depth h must be > 0 everywhere")
    t = check_save_times(t_save, "solve_swe2d")
    ny, nx = q.shape[1:3]
    dx = (domain[0][1] - domain[0][0]) / nx
    dy = (domain[1][1] - domain[1][0]) / ny
    out = np.empty((q.shape[0], t.size) + q.shape[1:], dtype=np.float64)
    out[:, 0] = q
    now = np.zeros(q.shape[0])
    for i in range(1, t.size):
        while True:
            left = t[i] - now
            if not (left > 1e-12 * max(1.0, t[i])).any():
                break
            dt = np.minimum(cfl * min(dx, dy) / _fastest(q, g), np.maximum(left, 0.0))
            dt[left <= 1e-12 * max(1.0, t[i])] = 0.0
            h = dt[:, None, None, None]
            q1 = q + h * _rhs(q, dx, dy, g)
            q = 0.5 * q + 0.5 * (q1 + h * _rhs(q1, dx, dy, g))
            now = now + dt
            if not np.isfinite(q).all() or (q[..., 0] <= 0).any():
                raise FloatingPointError(f"solve_swe2d: non-finite or non-positive depth before t={t[i]}")
        now[:] = t[i]
        out[:, i] = q
    return out[0] if squeeze else out


def dam_radius(seed: int) -> float:
    """PDEBench's dam radius for one seed."""
    return float(np.random.default_rng(seed).uniform(0.3, 0.7))


def dam_break_state(radius: float, ny: int, nx: int, inner: float = 2.0, outer: float = 1.0,
                    domain=DOMAIN) -> np.ndarray:
    """The radial dam at rest on cell centres, (Y, X, 3) = (h, hu, hv)."""
    x = np.linspace(*domain[0], nx + 1)
    y = np.linspace(*domain[1], ny + 1)
    xc, yc = 0.5 * (x[1:] + x[:-1]), 0.5 * (y[1:] + y[:-1])
    r = np.sqrt(xc[None, :] ** 2 + yc[:, None] ** 2)
    q = np.zeros((ny, nx, 3))
    q[..., 0] = np.where(r <= radius, inner, outer)
    return q


def exact_dam_break_1d(x: np.ndarray, t: float, h_left: float, h_right: float, g: float = GRAVITY) -> np.ndarray:
    """Exact depth of the 1D dam break at rest (h_left > h_right > 0, dam at x = 0): a rarefaction
    to the left, a shock to the right; the middle state from the two wave curves (bisection)."""
    cl = math.sqrt(g * h_left)

    def mismatch(hs: float) -> float:
        return 2.0 * (cl - math.sqrt(g * hs)) - (hs - h_right) * math.sqrt(0.5 * g * (hs + h_right) / (hs * h_right))

    lo, hi = h_right, h_left
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mismatch(mid) > 0 else (lo, mid)
    hs = 0.5 * (lo + hi)
    us, cs = 2.0 * (cl - math.sqrt(g * hs)), math.sqrt(g * hs)
    shock = hs * us / (hs - h_right)
    xi = np.asarray(x, dtype=np.float64) / t
    return np.where(xi < -cl, h_left,
                    np.where(xi < us - cs, (2.0 * cl - xi) ** 2 / (9.0 * g),
                             np.where(xi < shock, hs, h_right)))


class ShallowWater2D(PDE):
    """PDEBench's ``2D_rdb_NA_NA.h5``: frames (B, Y, X, 1) = h on (-2.5, 2.5)^2."""

    name = "swe2d"
    title = "2D shallow water (radial dam break)"
    equation = "h_t + div(h u) = 0, (h u)_t + div(h u u + g h^2 / 2 I) = 0 on (-2.5, 2.5)^2, outflow"
    fields = ("h",)
    spatial_dims = 2
    boundary = "outflow"
    # ((x_lo, x_hi), (y_lo, y_hi)): the generator's coordinates and solve's domain_length
    domain = DOMAIN
    params = (Parameter("g", ("g",), "g", GRAVITY, ref=GRAVITY, feature="linear", doc="the gravity"),)
    filename = "2D_rdb_NA_NA.h5"
    dt_ref = 0.01
    penalties = ("mass",)  # the water's volume (its depth's bound has no upper end to scale a penalty by)
    # the water's volume (no wave leaves the box before t = 1 for R <= 0.7) and a depth that stays >= 0
    invariants = ("mass", "bounds")
    bounds = (0.0, math.inf)
    frames_hold_state = False   # the file saves h, not hu and hv: only frame 0 (at rest) is a full state
    recipe_id = "pdebench-radial-dam-break/1"
    published = (Published("FNO", 4.4e-3, {}, "PDEBench (Takamoto et al. 2022) tables"),
                 Published("U-Net", 0.052, {}, "PDEBench's U-Net as tabulated by DPOT (Hao et al., ICML 2024)"))
    solver_settings = SOLVER_SETTINGS

    def initial_conditions(self, seeds, shape):
        """PDEBench's dam of radius R ~ U(0.3, 0.7) per seed, at rest: depths (n, Y, X, 1)."""
        ny, nx = shape
        return np.stack([dam_break_state(dam_radius(int(s)), ny, nx)[..., :1]
                         for s in np.asarray(seeds).reshape(-1)])

    def solve(self, u0, params, t_save, domain_length=DOMAIN[0][1] - DOMAIN[0][0]):
        """From (B, Y, X, 3) = (h, hu, hv), or (B, Y, X, 1) = a depth at rest; the same channels back."""
        try:
            g = self.check_params(params, f"{self.name} solve")["g"]
        except Exception as exc:   # a UserError here is a caller's bug: the solvers raise ValueError
            raise ValueError(str(exc)) from exc
        q = np.asarray(u0, dtype=np.float64)
        if q.ndim != 4 or q.shape[-1] not in (1, 3):
            raise ValueError(f"{self.name} solve: u0 must be (B, Y, X, 3) or a depth at rest (B, Y, X, 1), "
                             f"got shape {q.shape}")
        depth_only = q.shape[-1] == 1
        if depth_only:
            q = np.concatenate([q, np.zeros(q.shape[:-1] + (2,))], axis=-1)
        half = 0.5 * float(domain_length)
        out = solve_swe2d(q, t_save, g=g, domain=((-half, half), (-half, half)))
        return out[..., :1] if depth_only else out
