"""What the same members and the same solver give *without* search: the rivals every TTC figure
stands beside (issue 21), so a search is credited only with its gain beyond the best of them.

- :func:`candidates_mean_rollout`: at every step the search's own candidates (the same proposer, the
  same number of them) are drawn from the current frame and *averaged* instead of searched. With seed
  members this is the ensemble-mean rollout (the mean of the members' guarded steps at every step).
- :func:`members_mean_rollout`: every member rolls out on its own (the plain guarded rollout) and the
  prediction is the mean of those rollouts.
- :func:`solver_hybrid_rollout`: the plain rollout with every new frame's coarse cell averages moved
  towards the coarse solve from the previous frame (the consistency reward's own solver and grid) by
  ``weight`` (1: replaced, 0: the plain rollout); the sub-cell detail of the frame is kept. The weight
  is chosen on validation (:func:`choose_weight`).
- the reward's solver alone, from the given frame, is the ``solver_<cells>`` row evaluation reports.

:func:`credited_gain` is the rule every report applies: the search's gain over the best of these.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ups_lightning.inference.candidates import Proposer
from ups_lightning.inference.rewards import coarsen
from ups_lightning.inference.rollout import Surrogate, rollout

__all__ = ["candidates_mean_rollout", "members_mean_rollout", "solver_hybrid_rollout", "choose_weight",
           "credited_gain", "BASELINES"]

# the rows evaluation adds beside a TTC row (when they apply), in this order
BASELINES = ("candidates_mean", "members_mean", "solver_hybrid")


@torch.no_grad()
def candidates_mean_rollout(proposer: Proposer, u0: Tensor, steps: int, k: int) -> Tensor:
    """(B, steps, X, C): each next frame is the mean of the ``k`` candidates the proposer draws from
    the current one (each already guarded: decoded and projected by its member)."""
    C = u0.shape[-1]
    state = torch.cat([u0, u0], dim=-1)   # the proposer's state: current frame and the given frame
    frames = []
    for _ in range(steps):
        u = proposer(state, k)[..., :C].mean(dim=1)
        state = torch.cat([u, u0], dim=-1)
        frames.append(u)
    return torch.stack(frames, dim=1)


@torch.no_grad()
def members_mean_rollout(members: Sequence[Surrogate], u0: Tensor, steps: int,
                         first: Optional[Tensor] = None) -> Tensor:
    """(B, steps, X, C): the mean of the members' own plain rollouts (``first``: the first member's
    rollout when already made, e.g. evaluation's operator row)."""
    runs = [first if first is not None else rollout(members[0], u0, steps)]
    runs += [rollout(sur, u0, steps) for sur in members[1:]]
    return torch.stack(runs).mean(dim=0)


def _refine(coarse: Tensor, n_x: int) -> Tensor:
    """(B, cells, C) -> (B, n_x, C): each cell's value on its n_x / cells points."""
    return coarse.repeat_interleave(n_x // coarse.shape[-2], dim=-2)


@torch.no_grad()
def solver_hybrid_rollout(sur: Surrogate, u0: Tensor, steps: int, solve: Callable[[Tensor], Tensor],
                          cells: int, weight: float) -> Tensor:
    """(B, steps, X, C): the plain rollout with each new frame corrected by the coarse solve from the
    previous frame, ``u + weight * refine(solve(u_prev) - coarsen(u))`` (module doc), then guarded as
    the plain rollout is (projected, re-encoded). ``solve(prev (B, X, C)) -> (B, cells, C)``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"solver hybrid: weight must lie in [0, 1], got {weight}")
    z, prev = sur.encode(u0), u0
    frames = []
    for _ in range(steps):
        u = sur.decode(sur.step(z))
        if weight > 0:
            target = solve(prev).to(u.dtype)
            u = u + weight * _refine(target - coarsen(u, cells), u.shape[-2])
        if sur.guard.invariants:
            u = sur.pde.project(u, u0)
        z, prev = sur.encode(u), u
        frames.append(u)
    return torch.stack(frames, dim=1)


def choose_weight(score: Callable[[float], float], weights: Sequence[float]) -> Tuple[float, Dict[float, float]]:
    """(the weight with the lowest score, every weight's score); ``score(weight)`` is a validation
    nRMSE. Ties go to the smaller weight (the less the solver is trusted, the closer to the model)."""
    if not weights:
        raise ValueError("choose_weight needs at least one weight")
    scores = {float(w): float(score(float(w))) for w in weights}
    finite = {w: s for w, s in scores.items() if math.isfinite(s)}
    if not finite:
        raise ValueError(f"every solver-hybrid weight diverged on validation: {scores}")
    best = min(sorted(finite), key=lambda w: finite[w])
    return best, scores


def credited_gain(search_nrmse: float, baselines: Dict[str, float]) -> Tuple[Optional[str], float]:
    """(the best baseline's name, the search's nRMSE gain beyond it): positive only when the search
    beats every baseline; a search that merely matches the best of them is credited with nothing
    (gain <= 0). With no baseline, (None, nan): nothing to credit against."""
    finite = {k: v for k, v in baselines.items() if math.isfinite(v)}
    if not finite:
        return None, math.nan
    best = min(finite, key=finite.get)
    return best, finite[best] - float(search_nrmse)
