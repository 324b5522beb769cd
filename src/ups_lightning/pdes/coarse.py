"""The reference solver on a coarser grid than the evaluation grid, and back: shared by the
benchmark's solver sweep (bench/solver_sweep.py), evaluation's solver rows and the study's solver
hybrid. Torch-free.

A field on the N-cell evaluation grid is reduced to ``n`` cells by cell averages (the mean of N/n
consecutive values; n must divide N), solved with the equation's reference solver (its spec's
``solve``), and brought back by **periodic linear interpolation** between coarse cell centres
(centre of coarse cell j = the mean position of the evaluation-grid points it averages). Linear
rather than spectral: fields with under-resolved shocks make a Fourier interpolant ring (Gibbs),
which would charge the coarse solver an error that is the interpolant's, not the scheme's. With
n = N the round trip is the identity.

2D fields (B, X, Y, C) go the same way along both axes (n x n cells), brought back by bilinear
interpolation that holds the edge values beyond the outer coarse centres (the 2D equations here are
not periodic: Neumann or outflow walls).
"""
from __future__ import annotations

import time
from typing import Dict

import numpy as np

from ups_lightning.pdes import get_pde

__all__ = ["cell_average", "upsample_linear", "solve_on_grid"]


def cell_average(u: np.ndarray, n: int) -> np.ndarray:
    """(..., N) -> (..., n): means of N/n consecutive values (periodic grid, n divides N)."""
    big = u.shape[-1]
    if n <= 0 or big % n:
        raise ValueError(f"cell_average: {n} cells do not divide the {big}-cell grid")
    r = big // n
    return u.reshape(*u.shape[:-1], n, r).mean(axis=-1)


def upsample_linear(u: np.ndarray, big: int, periodic: bool = True) -> np.ndarray:
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
    if not periodic:     # beyond the outer coarse centres: their values (no wrap across the walls)
        pos = np.clip(pos, 0.0, n - 1.0)
    j0 = np.floor(pos).astype(np.int64)
    w = pos - j0
    a, b = np.mod(j0, n), np.mod(j0 + 1, n)
    return u[..., a] * (1.0 - w) + u[..., b] * w


def solve_on_grid(u0: np.ndarray, n: int, pde: str, params: Dict[str, float], t_rel: np.ndarray,
                  domain_length: float) -> tuple:
    """Solve equation ``pde`` from ``u0`` (B, N, C), or (B, N, N', C) in 2D, reduced to ``n`` cells
    per axis; returns (frames (B, T-1, N[, N'], C) on the evaluation grid, excluding t_rel[0],
    wall-clock seconds of the solve)."""
    spec = get_pde(pde)
    u = np.asarray(u0, dtype=np.float64)
    axes = list(range(1, u.ndim - 1))          # the spatial axes of (B, *space, C)
    coarse = u
    for a in axes:
        coarse = np.moveaxis(cell_average(np.moveaxis(coarse, a, -1), n), -1, a)
    start = time.perf_counter()
    sol = spec.solve(coarse, params, t_rel, domain_length=domain_length)[:, 1:]
    wall = time.perf_counter() - start
    periodic = spec.boundary == "periodic"
    for a in axes:                             # (B, T, *space, C): space starts at axis 2
        sol = np.moveaxis(upsample_linear(np.moveaxis(sol, a + 1, -1), u.shape[a], periodic), -1, a + 1)
    return sol, wall
