"""Which equation a file follows, checked on the file itself before the reference solver is used on
it (evaluation's solver rows and solver hybrid, the consistency reward, the guard's physics).

From a few rows, one frame interval is integrated by the spec's solver from frame ``k`` (the callers
take the last interval between given frames, so the check reads no frame a rollout may not) under each
domain the spec knows for such a file (``PDE.domain_forms``: the file's own coordinates, and e.g.
a released layout whose stored coordinates are not the ones its data was solved on), and compared
with frame ``k + 1``. A spec whose frames do not hold its whole state (``frames_hold_state``) can only
start at frame 0, so it is integrated from there through every given frame to frame ``k + 1``: over
the first interval alone a file reduced from a finer grid misses the coarse solver by its
discretisation (the dam break's edge, made at 128 cells and read at 64: 0.40 of the change over one
interval, 0.12 over nine), not by another equation. The miss is measured against the frames' own
change, |solve - u_end| / |u_end - u_start| (persistence scores 1). The form with the smallest miss is used if it fits
(miss <= ``FITS``); if none fits, the solver-based parts are refused with a message naming the misses.
Torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import numpy as np

from ups_lightning.errors import UserError, command

__all__ = ["FITS", "DomainFit", "fit_domain"]

#: the largest miss (relative to the frames' own change over the interval) a form may have and fit.
#: A wrong domain scales the solver's speeds by the ratio of lengths, a miss of the order of the
#: change itself (0.4-1 measured on the released layout); the right one misses by the solver's own
#: error on the file's grid (below 0.1 on every data config under conf/data, tests/test_pde_fit.py).
FITS = 0.25


@dataclass
class DomainFit:
    label: str                   # the form used (PDE.domain_forms)
    domain_length: float
    misses: Dict[str, float] = field(default_factory=dict)   # every form tried -> its miss

    def describe(self) -> str:
        return "; ".join(f"{k}: {v:.3g}" for k, v in self.misses.items())


def _miss(spec, params: Mapping[str, float], rows: np.ndarray, dt: float, length: float, start: int, end: int) -> float:
    u0, u1 = rows[:, start].astype(np.float64), rows[:, end].astype(np.float64)
    sol = spec.solve(u0, params, np.array([0.0, (end - start) * dt]), domain_length=length)[:, 1]
    change = float(np.sqrt(np.mean((u1 - u0) ** 2)))
    if not np.isfinite(sol).all():
        return math.inf
    return float(np.sqrt(np.mean((sol - u1) ** 2))) / max(change, 1e-12)


def fit_domain(spec, params: Mapping[str, float], rows: np.ndarray, dt: float, file_length: float,
               where: str, k: int = 0) -> DomainFit:
    """The domain the file's frames ``rows`` (n, T, *space, C) follow under ``spec``'s solver; a
    UserError naming ``where`` (the file) when no form the spec knows fits."""
    if rows.shape[0] == 0 or rows.shape[1] < k + 2:
        raise UserError(f"{where}: no two consecutive frames to check the equation on.")
    # a later frame is not a state the solver can start from: from frame 0 through the given frames
    start = k if spec.frames_hold_state else 0
    forms: List[Tuple[str, float]] = spec.domain_forms(file_length)
    misses = {label: _miss(spec, params, rows, dt, length, start, k + 1) for label, length in forms}
    label = min(misses, key=misses.get)
    fit = DomainFit(label, dict(forms)[label], misses)
    if not misses[label] <= FITS:
        stated = ", ".join(f"{p}={v:g}" for p, v in params.items())
        raise UserError(
            f"{where} does not follow {spec.title} ({spec.equation}; {stated}) in any form this project knows: "
            f"{rows.shape[0]} of its rows integrated by the reference solver from frame {start} miss "
            f"frame {k + 1} by {fit.describe()} (relative to the frames' own change; a fit is <= {FITS}). The "
            "solver rows, the solver hybrid and the consistency reward would score against another equation. "
            f"Check the file's equation and parameters ({command('ups_lightning.data.inspect')} FILE) and data.params.")
    return fit
