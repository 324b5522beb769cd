"""Test-time compute: per-sample beam search over stochastic candidate steps, under a budget.

Model-agnostic: the search sees states as tensors ``(B, ...)`` and two callables,

- ``propose(states (M, ...), k) -> (M, k, ...)``: k stochastic candidate next states per state (in
  this project: operator step + k corrector samples, decoded or latent). One call costs k model
  evaluations per state; this is the unit of the budget.
- ``score(prev (M, ...), cand (M, k, ...)) -> (M, k)``: reward of each candidate step from its
  parent, higher is better (``inference/rewards.py``; a parent's candidates are scored together, so a
  reward may share work between them, e.g. one solver run per parent). Scoring is not counted as a
  model evaluation. NaN rewards count as -inf (never chosen).

Search, for every sample independently (vectorised over the batch, never one choice for all):
draw ``n0`` first-step candidates from the current state and score them; keep the ``W`` best as
beams; for each of ``H - 1`` lookahead steps, draw ``n_exp`` candidates from every beam, add their
rewards to the beam's cumulative reward and keep the ``W`` best paths; commit the *first step* of
the path with the highest cumulative reward. H = 1 is the greedy best-of-n step; n0 = 1, H = 1 is
the plain stochastic step.

Budget (model evaluations per sample per committed step) = n0 + (H - 1) * W * n_exp. When
``cfg.budget`` is smaller than the configured cost, :func:`plan` cuts, in this order:
1. the first-step candidates to ``n0 = min(n_candidates, budget)``;
2. the lookahead candidates per beam ``n_exp`` down to 1, then the horizon, until the lookahead fits
   in what is left (longest horizon first, then the most candidates for it);
3. lookahead is dropped (H = 1) when fewer than 2 beams are available (W = min(beam_width, n0)),
   because a single beam always commits the greedy first step and would waste its evaluations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from ups_lightning.errors import UserError

__all__ = ["TTCConfig", "TTCPlan", "plan", "ttc_step"]

Propose = Callable[[Tensor, int], Tensor]
Score = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TTCConfig:
    n_candidates: int = 4  # candidates drawn per beam per step
    beam_width: int = 2
    horizon: int = 1  # lookahead steps scored before committing one step
    budget: int | None = None  # max model evaluations per sample per committed step (None: unlimited)


@dataclass(frozen=True)
class TTCPlan:
    """What one committed step will actually do (after the budget)."""

    n_first: int  # candidates drawn from the current state
    beam_width: int  # beams kept between lookahead steps
    horizon: int  # 1 = no lookahead
    n_expand: int  # candidates drawn per beam per lookahead step

    @property
    def evals(self) -> int:
        return self.n_first + (self.horizon - 1) * self.beam_width * self.n_expand


def _validate(cfg: TTCConfig) -> None:
    for name in ("n_candidates", "beam_width", "horizon"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise UserError(f"ttc.{name} must be an integer >= 1, got {v!r}")
    if cfg.budget is not None and (not isinstance(cfg.budget, int) or cfg.budget < 1):
        raise UserError(f"ttc.budget must be null (unlimited) or an integer >= 1, got {cfg.budget!r}")


def plan(cfg: TTCConfig) -> TTCPlan:
    """The search actually run for ``cfg`` once the budget is applied (module doc, "Budget")."""
    _validate(cfg)
    budget = cfg.budget
    n0 = cfg.n_candidates if budget is None else min(cfg.n_candidates, budget)
    width = min(cfg.beam_width, n0)
    if cfg.horizon == 1 or width < 2:
        return TTCPlan(n0, width, 1, cfg.n_candidates)
    if budget is None:
        return TTCPlan(n0, width, cfg.horizon, cfg.n_candidates)
    left = budget - n0
    for h in range(cfg.horizon, 1, -1):
        n_exp = min(cfg.n_candidates, left // ((h - 1) * width))
        if n_exp >= 1:
            return TTCPlan(n0, width, h, n_exp)
    return TTCPlan(n0, width, 1, cfg.n_candidates)


def _pairs(prev: Tensor, cand: Tensor, score: Score) -> Tensor:
    """Score every candidate against its parent: prev (M, ...), cand (M, k, ...) -> (M, k)."""
    M, k = cand.shape[:2]
    s = torch.as_tensor(score(prev, cand), device=cand.device)
    if s.shape != (M, k):
        raise ValueError(f"score(prev {tuple(prev.shape)}, cand {tuple(cand.shape)}) returned {tuple(s.shape)}; "
                         f"expected {(M, k)}")
    return torch.nan_to_num(s.to(torch.float64), nan=-torch.inf)


def _propose(propose: Propose, states: Tensor, k: int) -> Tensor:
    out = propose(states, k)
    if out.shape[:2] != (states.shape[0], k) or out.shape[2:] != states.shape[1:]:
        raise ValueError(f"propose(states {tuple(states.shape)}, k={k}) returned {tuple(out.shape)}; "
                         f"expected {(states.shape[0], k, *states.shape[1:])}")
    return out


def ttc_step(state: Tensor, propose: Propose, score: Score, cfg: TTCConfig) -> tuple[Tensor, dict]:
    """Commit one step per sample by beam search (module doc). Returns ``(next_state (B, ...), info)``
    with info:

    - ``evals``: (B,) long, model evaluations spent per sample (the plan's cost);
    - ``chosen``: (B,) long, index of the committed candidate among the first-step candidates;
    - ``scores``: (B, n0) float64, the one-step rewards of the first-step candidates;
    - ``path_score``: (B,) float64, cumulative reward of the best path (= the chosen candidate's
      score when H = 1);
    - ``plan``: the :class:`TTCPlan` as a dict (n_first, beam_width, horizon, n_expand)."""
    p = plan(cfg)
    B = state.shape[0]
    dev = state.device
    rows = torch.arange(B, device=dev)

    first = _propose(propose, state, p.n_first)  # (B, n0, ...)
    s0 = _pairs(state, first, score)  # (B, n0)
    if p.horizon == 1:
        best_path = s0.argmax(dim=1)
        chosen, path_score = best_path, s0[rows, best_path]
    else:
        cum, idx = s0.topk(p.beam_width, dim=1)  # (B, W)
        beams = first[rows[:, None], idx]  # (B, W, ...)
        root = idx
        W = p.beam_width
        for _ in range(p.horizon - 1):
            flat = beams.reshape(B * W, *state.shape[1:])
            cand = _propose(propose, flat, p.n_expand)  # (B*W, n, ...)
            s = _pairs(flat, cand, score).reshape(B, W * p.n_expand)
            tot = cum.repeat_interleave(p.n_expand, dim=1) + s  # (B, W*n), parent-major order
            cum, pick = tot.topk(W, dim=1)
            beams = cand.reshape(B, W * p.n_expand, *state.shape[1:])[rows[:, None], pick]
            root = root.gather(1, pick // p.n_expand)
        best = cum.argmax(dim=1)
        chosen, path_score = root[rows, best], cum[rows, best]
    info = {
        "evals": torch.full((B,), p.evals, dtype=torch.long, device=dev),
        "chosen": chosen,
        "scores": s0,
        "path_score": path_score,
        "plan": asdict(p),
    }
    return first[rows, chosen], info
