"""PDEBench 2D diffusion-reaction (FitzHugh-Nagumo activator-inhibitor), the numerics (issue 25).

    u_t = Du (u_xx + u_yy) + u - u^3 - k - v
    v_t = Dv (v_xx + v_yy) + u - v          on (-1, 1)^2, zero flux (Neumann) on every side

PDEBench's generator (``pdebench/data_gen/src/sim_diff_react.py``, config ``diff-react.yaml``): Du =
1e-3, Dv = 5e-3, k = 5e-3; 128 x 128 cells; t in [0, 5] saved at 101 frames; the initial u and v
are independent standard normal values per cell (``numpy.random.default_rng(seed)``: u's draws, then
v's, each in (y, x) order); finite volumes with the five-point Laplacian whose boundary faces carry no
flux, integrated by scipy's RK45 (default tolerances, rtol 1e-3). Released as
``2D_diff-react_NA_NA.h5`` (one group per sample, ``data`` (101, 128, 128, 2)).

Reference solver here: the same semi-discrete system (the zero-flux five-point Laplacian, which is
a ghost cell mirroring each edge cell), integrated by classical RK4 at a fixed step per save
interval: n = ceil(interval / dt_max) equal steps, dt_max = SAFETY x 2.78 / (4 max(Du, Dv) (1/dx^2 +
1/dy^2) + REACTION), RK4's stability bound on the negative real axis for the diffusion's largest
eigenvalue plus the reaction's (1 - 3 u^2 stays above -REACTION while |u| < 9.6; standard normal
initial values on 16384 cells stay below 5). The step depends on the grid alone, so a row's result
never depends on the other rows of its batch. Second order in space, fourth in time, measured
against finer solutions (tests/test_pdes_2d.py).

``ReactionDiffusion2D`` is its spec (PDEBench's parameters, recipe, solver, published figures).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ups_lightning.pdes.base import PDE, Parameter, Published, check_save_times, solver_fields_2d, steps_per_interval

__all__ = ["PARAMS", "fhn_rhs", "neumann_laplacian", "dt_max", "solve_fhn2d", "initial_noise",
           "SOLVER_SETTINGS", "ReactionDiffusion2D"]

PARAMS = {"Du": 1e-3, "Dv": 5e-3, "k": 5e-3}   # PDEBench's diff-react.yaml
DOMAIN = (2.0, 2.0)                              # (-1, 1)^2: lengths in x and y
SAFETY = 0.5
REACTION = 278.0    # bound on -(1 - 3 u^2) the step is stable for: |u| < 9.6

SOLVER_SETTINGS = {
    "scheme": "finite volume, five-point Laplacian with zero-flux faces (PDEBench's), classical RK4 "
              f"at a fixed step per save interval (dt <= {SAFETY} x RK4's stability bound)",
    "order": "2 in space, 4 in time (tests/test_pdes_2d.py)",
}


def neumann_laplacian(a: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Five-point Laplacian of (..., Y, X) cell values with no flux through the boundary faces
    (each edge cell mirrored into a ghost cell), as PDEBench's sparse matrix."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return ((p[..., 1:-1, 2:] - 2.0 * a + p[..., 1:-1, :-2]) / (dx * dx)
            + (p[..., 2:, 1:-1] - 2.0 * a + p[..., :-2, 1:-1]) / (dy * dy))


def fhn_rhs(w: np.ndarray, dx: float, dy: float, Du: float, Dv: float, k: float) -> np.ndarray:
    """d/dt of the state (..., Y, X, 2) = (u, v)."""
    u, v = w[..., 0], w[..., 1]
    out = np.empty_like(w)
    out[..., 0] = Du * neumann_laplacian(u, dx, dy) + u - u ** 3 - k - v
    out[..., 1] = Dv * neumann_laplacian(v, dx, dy) + u - v
    return out


def dt_max(ny: int, nx: int, Du: float, Dv: float, domain=DOMAIN) -> float:
    dy, dx = domain[1] / ny, domain[0] / nx
    stiff = 4.0 * max(Du, Dv) * (1.0 / dx ** 2 + 1.0 / dy ** 2) + REACTION
    return SAFETY * 2.78 / stiff


def solve_fhn2d(w0: np.ndarray, t_save: Sequence[float] | np.ndarray, Du: float = PARAMS["Du"],
                Dv: float = PARAMS["Dv"], k: float = PARAMS["k"], domain=DOMAIN,
                dt: float | None = None) -> np.ndarray:
    """Solve from ``w0`` (B, Y, X, 2) (or (Y, X, 2)); returns (B, len(t_save), Y, X, 2) float64,
    frame 0 = w0. ``dt`` overrides the largest step (``dt_max``)."""
    w, squeeze = solver_fields_2d(w0, 2, "solve_fhn2d")
    if not all(math.isfinite(p) and p >= 0 for p in (Du, Dv)) or not math.isfinite(k):
        raise ValueError(f"solve_fhn2d: need finite Du, Dv >= 0 and finite k, got {Du}, {Dv}, {k}")
    t = check_save_times(t_save, "solve_fhn2d")
    ny, nx = w.shape[1:3]
    dy, dx = domain[1] / ny, domain[0] / nx
    step = dt_max(ny, nx, Du, Dv, domain) if dt is None else float(dt)
    out = np.empty((w.shape[0], t.size) + w.shape[1:], dtype=np.float64)
    out[:, 0] = w

    def f(s: np.ndarray) -> np.ndarray:
        return fhn_rhs(s, dx, dy, Du, Dv, k)

    for i in range(1, t.size):
        n = steps_per_interval(t[i] - t[i - 1], step)
        h = (t[i] - t[i - 1]) / n
        for _ in range(n):
            k1 = f(w)
            k2 = f(w + 0.5 * h * k1)
            k3 = f(w + 0.5 * h * k2)
            k4 = f(w + h * k3)
            w = w + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        if not np.isfinite(w).all():
            raise FloatingPointError(f"solve_fhn2d: non-finite values at t={t[i]}")
        out[:, i] = w
    return out[0] if squeeze else out


def initial_noise(seed: int, ny: int, nx: int) -> np.ndarray:
    """PDEBench's initial state for one seed: u then v, standard normal per cell, (Y, X, 2)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(nx * ny).reshape(ny, nx)
    v = rng.standard_normal(nx * ny).reshape(ny, nx)
    return np.stack([u, v], axis=-1)


class ReactionDiffusion2D(PDE):
    """PDEBench's ``2D_diff-react_NA_NA.h5``: frames (B, Y, X, 2) = (u, v) on (-1, 1)^2."""

    name = "reacdiff2d"
    title = "2D diffusion-reaction (FitzHugh-Nagumo)"
    equation = ("u_t = Du lap u + u - u^3 - k - v, v_t = Dv lap v + u - v on (-1, 1)^2, zero flux")
    fields = ("u", "v")
    spatial_dims = 2
    boundary = "neumann"
    # ((x_lo, x_hi), (y_lo, y_hi)): the generator's coordinates and solve's domain_length
    domain = tuple((-0.5 * length, 0.5 * length) for length in DOMAIN)
    # PDEBench fixes them (the file's name says NA_NA: no parameter varies); stated so that a file
    # made with others is refused by its attributes, and the conditioning features are O(1)
    params = tuple(Parameter(n, (n,), n, v, ref=v, feature="log10", doc=d) for n, v, d in (
        ("Du", PARAMS["Du"], "the activator's diffusion coefficient"),
        ("Dv", PARAMS["Dv"], "the inhibitor's diffusion coefficient"),
        ("k", PARAMS["k"], "the activator's threshold")))
    filename = "2D_diff-react_NA_NA.h5"
    dt_ref = 0.05
    penalties = ("pde",)  # the residual of the semi-discrete system (no mean or interval holds)
    invariants = ()       # the reaction creates and destroys u and v: no mean, no interval holds
    recipe_id = "pdebench-diff-react-normal/1"
    published = (Published("FNO", 0.12, {}, "PDEBench (Takamoto et al. 2022) tables"),
                 Published("U-Net", 0.097, {}, "PDEBench's U-Net as tabulated by DPOT (Hao et al., ICML 2024)"))
    solver_settings = SOLVER_SETTINGS

    def initial_conditions(self, seeds, shape):
        """PDEBench's standard-normal u and v per cell, one seed per row: (n, Y, X, 2)."""
        ny, nx = shape
        return np.stack([initial_noise(int(s), ny, nx) for s in np.asarray(seeds).reshape(-1)])

    def solve(self, u0, params, t_save, domain_length=DOMAIN[0]):
        try:
            p = self.check_params(params, f"{self.name} solve")
        except Exception as exc:   # a UserError here is a caller's bug: the solvers raise ValueError
            raise ValueError(str(exc)) from exc
        L = float(domain_length)
        return solve_fhn2d(u0, t_save, Du=p["Du"], Dv=p["Dv"], k=p["k"], domain=(L, L))

    def spatial_operator(self, u, params, dx):
        """The right-hand side on frames (B, 2, Y, X) (torch): the solver's zero-flux five-point
        Laplacian (dx = dy) and the reaction."""
        import torch
        import torch.nn.functional as F

        p = F.pad(u, (1, 1, 1, 1), mode="replicate")      # each edge cell mirrored: no flux
        lap = (p[..., 1:-1, 2:] + p[..., 1:-1, :-2] + p[..., 2:, 1:-1] + p[..., :-2, 1:-1] - 4.0 * u) / (dx * dx)
        a, b = u[:, 0], u[:, 1]
        return torch.stack([float(params["Du"]) * lap[:, 0] + a - a ** 3 - float(params["k"]) - b,
                            float(params["Dv"]) * lap[:, 1] + a - b], dim=1)
