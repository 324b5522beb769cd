"""TTC rewards: how good is each candidate next state, judged from what a rollout may see.

A reward sees the previous (decoded, guarded) frame, the candidate frames, and the equation with its
parameters from the file: never the truth. ``reward(prev (M, X, C), cand (M, k, X, C)) -> (M, k)``,
higher is better, non-finite candidates -inf. Rewards (``make_reward``):

- ``physics``: the equation spec's penalties of the step (mass, energy, tv, pde residual; its ``score``).
  Cheap, but at this frame stride (tens of solver steps per frame) they do not rank next states by
  accuracy (README "Test-time search").
- ``consistency``: integrate the PDE across the whole frame interval from the previous frame with the
  project's own reference solver (its CFL-stable sub-steps) on a grid of ``cells`` cells (the frame's
  cell averages; ``cells`` divides the evaluation grid), and score each candidate by the relative RMS
  distance of its cell averages to that solution. One solve per parent state, shared by its
  candidates. It runs a solver, so that solver on its own (same grid, same sub-steps, from the same
  given frame) is reported beside every TTC figure that uses it (``solver_cells``).
- ``verifier``: a small network trained on the train split to predict a candidate's log one-step
  error from (previous frame, candidate) (:class:`Verifier`, trained by ``bench.ttc_headroom`` and
  ``study``), the verifier models of LLM test-time search.

Lookahead (a candidate judged by the short rollout it leads to) is the search's ``horizon``
(inference/ttc.py): any reward summed along the best path of H steps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ups_lightning.atomic import atomic_torch_save
from ups_lightning.errors import UserError, command

__all__ = ["Reward", "PhysicsReward", "ConsistencyReward", "VerifierReward", "Verifier", "make_reward", "usable_rewards",
           "REWARDS", "train_verifier", "save_verifier", "load_verifier", "parse_reward"]

REWARDS = ("physics", "consistency", "verifier")


def _finite(r: Tensor) -> Tensor:
    return torch.nan_to_num(r.to(torch.float64), nan=-math.inf, posinf=-math.inf, neginf=-math.inf)


class Reward:
    """Base: ``__call__(prev, cand) -> (M, k)`` (module doc). ``solver_cells``: the grid of the
    solver it runs (None: none), for the fairness row."""

    name = ""
    solver_cells: Optional[int] = None

    def __call__(self, prev: Tensor, cand: Tensor) -> Tensor:
        if cand.dim() != prev.dim() + 1 or cand.shape[0] != prev.shape[0] or cand.shape[2:] != prev.shape[1:]:
            raise ValueError(f"{self.name} reward: prev (M, X, C) and cand (M, k, X, C), got "
                             f"{tuple(prev.shape)} and {tuple(cand.shape)}")
        return _finite(self.score(prev, cand))

    def score(self, prev: Tensor, cand: Tensor) -> Tensor:
        raise NotImplementedError


class PhysicsReward(Reward):
    """The spec's penalties (``PDE.score``) of each step prev -> candidate."""

    name = "physics"

    def __init__(self, physics, weights=None) -> None:
        self.physics, self.weights = physics, weights

    def score(self, prev: Tensor, cand: Tensor) -> Tensor:
        M, k = cand.shape[:2]
        p = self.physics
        rep = prev.unsqueeze(1).expand_as(cand).reshape(M * k, *prev.shape[1:])
        s = p.spec.score(rep, cand.reshape(M * k, *cand.shape[2:]), p.params, p.dx, p.dt, weights=self.weights)
        return s.reshape(M, k)


def coarsen(u: Tensor, cells: int) -> Tensor:
    """(..., X, C) -> (..., cells, C): means of X / cells consecutive cells (periodic grid)."""
    X = u.shape[-2]
    if cells < 3 or X % cells:
        raise UserError(f"ttc.reward.cells={cells}: the consistency reward's grid must divide the "
                        f"{X}-cell evaluation grid and have at least 3 cells (e.g. {X // 8 or X}).")
    return u.reshape(*u.shape[:-2], cells, X // cells, u.shape[-1]).mean(-2)


class ConsistencyReward(Reward):
    """-RMS(coarse candidate - solver) / RMS(solver - coarse prev): the solver's frame step from the
    previous frame on ``cells`` cells (module doc). 0 for a candidate the solver agrees with; 1 for
    the frozen state."""

    name = "consistency"

    def __init__(self, physics, cells: int) -> None:
        self.physics, self.cells = physics, int(cells)
        self.solver_cells = self.cells

    def solve(self, prev: Tensor) -> Tensor:
        """The solver's next frame on the coarse grid from prev (M, X, C): (M, cells, C)."""
        p = self.physics
        coarse = coarsen(prev.double(), self.cells).numpy()
        sol = p.spec.solve(coarse, p.params, np.array([0.0, p.dt]), domain_length=p.domain_length)[:, 1]
        return torch.from_numpy(np.ascontiguousarray(sol))

    def score(self, prev: Tensor, cand: Tensor) -> Tensor:
        if not torch.isfinite(prev).all():   # a parent that diverged: nothing to integrate
            return torch.full(cand.shape[:2], -math.inf, dtype=torch.float64)
        target = self.solve(prev).unsqueeze(1)                       # (M, 1, cells, C)
        c = coarsen(cand.double(), self.cells)
        scale = (target[:, 0] - coarsen(prev.double(), self.cells)).pow(2).mean((-2, -1)).sqrt()
        dist = (c - target).pow(2).mean((-2, -1)).sqrt()
        return -dist / (scale.unsqueeze(1) + 1e-12)


class Verifier(nn.Module):
    """(prev, candidate) frames (M, X, C) -> predicted log one-step nRMSE (M,). Inputs normalised by
    the field statistics it was trained with; channels: prev, candidate, candidate - prev."""

    def __init__(self, channels: int, field_mean: float, field_std: float, width: int = 32) -> None:
        super().__init__()
        self.register_buffer("stats", torch.tensor([float(field_mean), float(field_std)]))
        c = 3 * channels
        self.net = nn.Sequential(
            nn.Conv1d(c, width, 5, padding=2, padding_mode="circular"), nn.GELU(),
            nn.Conv1d(width, width, 5, padding=2, padding_mode="circular", stride=2), nn.GELU(),
            nn.Conv1d(width, width, 5, padding=2, padding_mode="circular", stride=2), nn.GELU())
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, prev: Tensor, cand: Tensor) -> Tensor:
        m, s = self.stats
        p, c = (prev - m) / s, (cand - m) / s
        h = self.net(torch.cat([p, c, (c - p) * 10.0], dim=-1).movedim(-1, 1))
        return self.out(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))[:, 0]


class VerifierReward(Reward):
    """-(the verifier's predicted log error)."""

    name = "verifier"

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier.eval()

    @torch.no_grad()
    def score(self, prev: Tensor, cand: Tensor) -> Tensor:
        M, k = cand.shape[:2]
        rep = prev.unsqueeze(1).expand_as(cand).reshape(M * k, *prev.shape[1:]).float()
        return -self.verifier(rep, cand.reshape(M * k, *cand.shape[2:]).float()).reshape(M, k)


def train_verifier(prev: Tensor, cand: Tensor, err: Tensor, steps: int = 400, lr: float = 2e-3,
                   seed: int = 0, log: Optional[Callable[[str], None]] = None) -> Verifier:
    """Fit a :class:`Verifier` on train-split examples: prev (N, X, C), cand (N, X, C) and their true
    one-step nRMSE err (N,) (the truth of the train split; never of the split it will score)."""
    if len(prev) < 2:
        raise UserError("the verifier needs train-split examples (none were collected).")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Verifier(prev.shape[-1], float(prev.mean()), float(prev.std()) + 1e-6)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    target = err.clamp_min(1e-6).log().float()
    batch = min(256, len(prev))
    for step in range(steps):
        idx = torch.randint(len(prev), (batch,), generator=g)
        loss = (net(prev[idx].float(), cand[idx].float()) - target[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 100 == 0:
            log(f"verifier: step {step + 1}/{steps}, loss {float(loss):.4f}")
    return net.eval()


def parse_reward(spec: str) -> tuple:
    """'physics' | 'verifier' | 'consistency:32' -> (name, cells)."""
    name, _, cells = str(spec).partition(":")
    if name == "consistency":
        try:
            return name, int(cells)
        except ValueError:
            raise UserError(f"rewards: {spec!r}: write the consistency reward as consistency:CELLS "
                            "(e.g. consistency:32).") from None
    return name, None


def load_verifier(path: str) -> Verifier:
    """A verifier saved by ``save_verifier`` (weights only: loading never runs code)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = Verifier(int(blob["channels"]), 0.0, 1.0, width=int(blob["width"]))
        net.load_state_dict(blob["state_dict"])
    except FileNotFoundError:
        raise UserError(f"ttc.reward.verifier={path}: no such file (bench.ttc_headroom and the study write "
                        "verifier.pt).") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"ttc.reward.verifier={path}: not a verifier this version can load ({type(exc).__name__}: "
                        f"{exc}). Retrain it with {command('ups_lightning.bench.ttc_headroom')}.") from None
    return net.eval()


def save_verifier(net: Verifier, path) -> None:
    """The verifier's sizes and weights (no code), atomically."""
    atomic_torch_save({"channels": net.net[0].in_channels // 3, "width": net.net[0].out_channels,
                       "state_dict": net.state_dict()}, path)


def usable_rewards(spec) -> tuple:
    """The rewards that can score candidates of equation ``spec``: the consistency reward (a 1D coarse
    solve from the previous frame) and the verifier (a 1D network) need a 1D equation whose frames hold
    its whole state; the physics penalties fit every equation."""
    return REWARDS if spec.spatial_dims == 1 and spec.frames_hold_state else ("physics",)


def make_reward(name: str, physics, cells: Optional[int] = None, weights=None,
                verifier: Optional[Verifier] = None) -> Reward:
    """The reward called ``name`` (module doc); a clear error for a bad name or a missing piece."""
    if name == "physics":
        return PhysicsReward(physics, weights)
    spec = physics.spec
    if name in REWARDS and name not in usable_rewards(spec):
        why = ("its frames do not hold the whole state its solver evolves" if not spec.frames_hold_state
               else f"it is {spec.spatial_dims}D and this reward's grid and network are 1D")
        raise UserError(f"ttc.reward.name={name} cannot score {spec.name} candidates: {why}. Use "
                        f"ttc.reward.name=physics (the equation's penalties: {', '.join(spec.penalties)}).")
    if name == "consistency":
        if not isinstance(cells, int) or isinstance(cells, bool):
            raise UserError(f"ttc.reward.cells={cells!r}: the consistency reward needs the number of cells "
                            "of its solver's grid (an integer dividing the evaluation grid, e.g. 32).")
        return ConsistencyReward(physics, cells)
    if name == "verifier":
        if verifier is None:
            raise UserError("ttc.reward.name=verifier needs a trained verifier; it is trained on the train "
                            f"split by `{command('ups_lightning.bench.ttc_headroom')}` and by the study.")
        return VerifierReward(verifier)
    raise UserError(f"ttc.reward.name={name!r}: the rewards are {', '.join(REWARDS)}.")
