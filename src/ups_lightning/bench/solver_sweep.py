"""The reference solver at equal accuracy: how coarse a grid would do as well as the surrogate?

From the last given frame (frame ``initial_step - 1``) of each test trajectory on the evaluation grid
(N cells), the reference solver runs on ``n`` cells to the remaining save times and is brought back
to the N-cell grid (``pdes.coarse.solve_on_grid``: cell averages down, periodic linear interpolation
up; see there why linear).

The result is scored with the same ``all_metrics`` call as every other method, and timed per
trajectory (the solver is batched over trajectories, as the surrogates are). Interpolation is not
timed (it is cheap and not the solver's work).

Note on "truth": for data made at 1024 cells and reduced to 256 (the full set), the 256-cell solver
is not the truth, only another discretisation of it; for the small set (made at 256 cells with this
very solver) the 256-cell solver reproduces the data to round-off by construction.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ups_lightning.eval.metrics import all_metrics
from ups_lightning.pdes.coarse import solve_on_grid

__all__ = ["sweep", "cheapest_meeting", "SWEEP_GRIDS"]

SWEEP_GRIDS = (32, 64, 128, 256)


def sweep(u0: torch.Tensor, truth: torch.Tensor, pde: str, params: Dict[str, float], t_rel: Sequence[float],
          dx: float, domain_length: float, grids: Sequence[int] = SWEEP_GRIDS,
          log: Optional[Any] = print, solve_length: Optional[float] = None,
          u_given: Optional[torch.Tensor] = None) -> List[Dict[str, Any]]:
    """Run the solver at each grid from ``u0`` (B, N, C), or (B, N, N', C) in 2D, over ``t_rel`` and
    score its last ``truth.shape[1]`` frames against ``truth`` (B, T, *space, C) with ``all_metrics``;
    one dict per grid (metrics + ``grid``, ``ms_per_traj``, ``wall_s``). Grids that do not divide the
    evaluation grid are skipped with a note. ``solve_length``: the domain the solver integrates on,
    where the file's frames follow another than its coordinates' (pdes.fit). ``u_given``: the last
    given frame, for the metrics' reference, when ``u0`` is an earlier one (a solve from frame 0)."""
    u0_np = u0.double().numpy()
    space = u0_np.shape[1:-1]
    t_rel = np.asarray(t_rel, dtype=np.float64)
    rows = []
    for n in grids:
        n = int(n)
        if n <= 0 or any(big % n or n > big for big in space):
            if log:
                log(f"solver sweep: skipping {n} cells (must divide the {' x '.join(map(str, space))}-cell "
                    f"evaluation grid)")
            continue
        pred, wall = solve_on_grid(u0_np, n, pde, params, t_rel, solve_length or domain_length)
        pred_t = torch.from_numpy(pred[:, pred.shape[1] - truth.shape[1]:]).float()
        m = all_metrics(pred_t, truth, dx=dx, domain_length=domain_length, u0=u0 if u_given is None else u_given)
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
