"""PDEBench's ``init_multi`` initial-condition recipe (shared by its 1D Burgers and advection
generators; the reaction-diffusion generator rescales it into [0, 1]), seeded per trajectory."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["init_multi", "cell_centres", "INIT_MULTI_DOC"]

INIT_MULTI_DOC = ("PDEBench init_multi recipe: 2 sines, k in 1..4, amp U[0,1), phase U[0,2pi), random sign, "
                  "abs() p=0.1, tanh window p=0.1 (edges U(0.1,0.45), U(0.55,0.9), width 0.01); numpy "
                  "default_rng(seed) per trajectory")


def cell_centres(nx: int, x_left: float = 0.0, domain_length: float = 1.0) -> np.ndarray:
    """Cell centres ``x_left + (i + 0.5) dx`` (float64)."""
    dx = domain_length / nx
    return x_left + (np.arange(nx, dtype=np.float64) + 0.5) * dx


_K_MAX = 4            # wavenumbers 1..4
_N_MODES = 2          # two sines
_P_ABS = 0.1
_P_WINDOW = 0.1
_WINDOW_WIDTH = 0.01


def _one_initial_condition(seed: int, xi: np.ndarray) -> np.ndarray:
    """One PDEBench-style initial condition on fractional coordinates xi in [0, 1)."""
    rng = np.random.default_rng(int(seed))
    # Every random number is drawn unconditionally, in a fixed order, so the stream layout (and
    # hence each field) is fixed by the seed alone.
    k = rng.integers(1, _K_MAX + 1, size=_N_MODES)
    amp = rng.uniform(0.0, 1.0, size=_N_MODES)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=_N_MODES)
    do_abs = rng.uniform() < _P_ABS
    sign = 1.0 if rng.integers(0, 2) == 0 else -1.0
    do_window = rng.uniform() < _P_WINDOW
    x_l = rng.uniform(0.1, 0.45)
    x_r = rng.uniform(0.55, 0.9)

    u = np.zeros_like(xi)
    for j in range(_N_MODES):
        u += amp[j] * np.sin(2.0 * np.pi * k[j] * xi + phase[j])
    if do_abs:
        u = np.abs(u)
    u *= sign
    if do_window:
        u *= 0.5 * (np.tanh((xi - x_l) / _WINDOW_WIDTH) - np.tanh((xi - x_r) / _WINDOW_WIDTH))
    return u


def init_multi(
    n: int,
    nx: int,
    seeds: Sequence[int] | np.ndarray,
    x_left: float = 0.0,
    domain_length: float = 1.0,
) -> np.ndarray:
    """``n`` initial conditions on ``nx`` cell centres, PDEBench's ``init_multi`` recipe.

    Each: a sum of two sines ``amp_j sin(k_j 2 pi (x - x_left)/L + phase_j)`` with integer
    wavenumbers k_j drawn from 1..4, amp_j ~ U[0,1), phase_j ~ U[0, 2pi); abs() with probability
    0.1; a random sign; a tanh window (edges ~U(0.1,0.45), U(0.55,0.9) as fractions of the domain,
    width 0.01) with probability 0.1. Trajectory i uses ``np.random.default_rng(seeds[i])``.
    Returns (n, nx) float64.
    """
    seeds = np.asarray(seeds).reshape(-1)
    if seeds.shape[0] != n:
        raise ValueError(f"init_multi: got {seeds.shape[0]} seeds for n={n} trajectories")
    if n and (not np.issubdtype(seeds.dtype, np.integer) or seeds.min() < 0):
        raise ValueError("init_multi: seeds must be non-negative integers")
    if nx < 4:
        raise ValueError(f"init_multi: nx={nx} is too small (need >= 4 cells)")
    xi = (np.arange(nx, dtype=np.float64) + 0.5) / nx   # (x - x_left) / L
    out = np.empty((n, nx), dtype=np.float64)
    for i in range(n):
        out[i] = _one_initial_condition(int(seeds[i]), xi)
    return out
