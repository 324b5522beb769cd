"""The reference solver at equal accuracy: how coarse a grid would do as well as the surrogate?

From the last given frame (frame ``initial_step - 1``) of each test trajectory on the evaluation grid
(N cells), the field is reduced to ``n`` cells by cell averages (the mean of N/n consecutive
evaluation-grid values; n must divide N), solved with the equation's reference solver (its spec's
``solve``) to the remaining save times, and brought back to the N-cell evaluation grid by **periodic linear
interpolation** between coarse cell centres (centre of coarse cell j = the mean position of the
evaluation-grid points it averages). Linear rather than spectral: fields with under-resolved shocks
make a Fourier interpolant ring (Gibbs), which would charge the coarse solver an error that is the
interpolant's, not the scheme's. With n = N the round trip is the identity.

The result is scored with the same ``all_metrics`` call as every other method, and timed per
trajectory (the solver is batched over trajectories, as the surrogates are). Interpolation is not
timed (it is cheap and not the solver's work).

Note on "truth": for data made at 1024 cells and reduced to 256 (the full set), the 256-cell solver
is not the truth, only another discretisation of it; for the small set (made at 256 cells with this
very solver) the 256-cell solver reproduces the data to round-off by construction.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ups_lightning.eval.metrics import all_metrics
from ups_lightning.pdes import get_pde

__all__ = ["cell_average", "upsample_linear", "solve_on_grid", "sweep", "cheapest_meeting", "SWEEP_GRIDS"]

SWEEP_GRIDS = (32, 64, 128, 256)


def cell_average(u: np.ndarray, n: int) -> np.ndarray:
    """(..., N) -> (..., n): means of N/n consecutive values (periodic grid, n divides N)."""
    big = u.shape[-1]
    if n <= 0 or big % n:
        raise ValueError(f"cell_average: {n} cells do not divide the {big}-cell grid")
    r = big // n
    return u.reshape(*u.shape[:-1], n, r).mean(axis=-1)


def upsample_linear(u: np.ndarray, big: int) -> np.ndarray:
    """(..., n) cell averages -> (..., big) by periodic linear interpolation between coarse cell
    centres, evaluated at the fine points they were averaged from (inverse of ``cell_average``'s
    geometry; identity for n == big)."""
    n = u.shape[-1]
    if big % n:
        raise ValueError(f"upsample_linear: {n} cells do not divide the {big}-cell grid")
    r = big // n
    if r == 1:
        return np.array(u, copy=True)
    # positions in units of fine cells: fine point i at i; coarse cell j centred at j r + (r - 1) / 2
    pos = (np.arange(big) - (r - 1) / 2.0) / r          # fine points in coarse-index units
    j0 = np.floor(pos).astype(np.int64)
    w = pos - j0
    a, b = np.mod(j0, n), np.mod(j0 + 1, n)
    return u[..., a] * (1.0 - w) + u[..., b] * w


def solve_on_grid(u0: np.ndarray, n: int, pde: str, params: Dict[str, float], t_rel: np.ndarray,
                  domain_length: float) -> tuple:
    """Solve equation ``pde`` from ``u0`` (B, N, C) reduced to ``n`` cells; returns (frames
    (B, T-1, N, C) on the evaluation grid, excluding t_rel[0], wall-clock seconds of the solve)."""
    big = u0.shape[-2]
    coarse = np.moveaxis(cell_average(np.moveaxis(np.asarray(u0, dtype=np.float64), -1, -2), n), -1, -2)
    start = time.perf_counter()
    sol = get_pde(pde).solve(coarse, params, t_rel, domain_length=domain_length)
    wall = time.perf_counter() - start
    return np.moveaxis(upsample_linear(np.moveaxis(sol[:, 1:], -1, -2), big), -1, -2), wall


def sweep(u0: torch.Tensor, truth: torch.Tensor, pde: str, params: Dict[str, float], t_rel: Sequence[float],
          dx: float, domain_length: float, grids: Sequence[int] = SWEEP_GRIDS,
          log: Optional[Any] = print) -> List[Dict[str, Any]]:
    """Run the solver at each grid from ``u0`` (B, N, C) and score it against ``truth``
    (B, T, N, C) with ``all_metrics``; one dict per grid (metrics + ``grid``, ``ms_per_traj``,
    ``wall_s``). Grids that do not divide N are skipped with a note."""
    u0_np = u0.double().numpy()
    big = u0_np.shape[-2]
    t_rel = np.asarray(t_rel, dtype=np.float64)
    rows = []
    for n in grids:
        n = int(n)
        if n <= 0 or big % n or n > big:
            if log:
                log(f"solver sweep: skipping {n} cells (must divide the {big}-cell evaluation grid)")
            continue
        pred, wall = solve_on_grid(u0_np, n, pde, params, t_rel, domain_length)
        pred_t = torch.from_numpy(pred).float()
        m = all_metrics(pred_t, truth, dx=dx, domain_length=domain_length, u0=u0)
        m.update(grid=n, wall_s=wall, ms_per_traj=1000.0 * wall / len(u0_np))
        rows.append(m)
        if log:
            log(f"solver {n:4d} cells: nRMSE {m['nrmse']:.4f}  {m['ms_per_traj']:.2f} ms/traj")
    return rows


def cheapest_meeting(rows: Sequence[Dict[str, Any]], threshold: float) -> Optional[Dict[str, Any]]:
    """The solver row with the lowest wall-clock among those with nRMSE <= ``threshold`` (None when
    no grid is that accurate)."""
    ok = [r for r in rows if math.isfinite(r["nrmse"]) and r["nrmse"] <= threshold]
    return min(ok, key=lambda r: (r["ms_per_traj"], r["grid"])) if ok else None
