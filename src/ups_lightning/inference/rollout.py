"""Autoregressive rollouts in latent space, decoded to physical fields.

The rollout sees only the last given frame: it encodes it once, then steps on its own outputs (no
teacher forcing), decoding every predicted state on the evaluation grid. Modes:

- operator only (deterministic);
- operator + stochastic corrector (diffusion teacher or distilled student) every `every` steps;
- an ensemble of such stochastic rollouts (members batched together);
- TTC: per-sample beam search over candidate next frames (operator ensembles, latent perturbations,
  corrector samples) scored by rewards that see only the frames and the equation (``ttc_rollout``).

Every mode can guard its states (`Guard`): decode each new state, optionally project it onto the
equation's invariants that the given frame fixes (its spec's ``project``: the mean for conservation
laws, the invariant interval for a maximum principle), and re-encode it, so the next step starts
from a state on the autoencoder's manifold. The guard uses nothing but the given frame.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ups_lightning.inference.candidates import Proposer
from ups_lightning.inference.rewards import Reward
from ups_lightning.inference.ttc import TTCConfig, plan, ttc_step
from ups_lightning.pdes import PDE, get_pde

log = logging.getLogger("ups_lightning.rollout")


@dataclass(frozen=True)
class Physics:
    """What the guard and the rewards need from the evaluated file: its equation and parameters, and
    dx, dt, the domain length after reduction."""

    pde: str
    params: Dict[str, float]
    dx: float
    dt: float
    domain_length: float

    @property
    def spec(self) -> PDE:
        return get_pde(self.pde)


@dataclass(frozen=True)
class Guard:
    """Projections applied to every rolled-out state (module doc). Both off: the raw latent rollout."""

    reencode: bool = False      # decode -> encode each step (back onto the autoencoder's manifold)
    invariants: bool = False    # project each decoded frame onto the equation's invariants, re-encode

    @property
    def active(self) -> bool:
        return self.reencode or self.invariants


class Surrogate:
    """A trained pipeline (the last finished stage's module) seen as encode / step / correct / decode,
    on the grid and with the conditioning of the data being evaluated. ``fields``: the evaluated
    equation's field count when it has fewer than the model's channels (a masked layout,
    ``DataContract``): frames go in and come out with its fields alone, the absent channels filled
    with their mean (normalised 0) on the way in and dropped on the way out."""

    def __init__(self, module: Any, x: Tensor, cond: Tensor, teacher_steps: int = 16,
                 student_steps: int = 1, guard: Guard = Guard(), pde: Optional[PDE] = None,
                 fields: Optional[int] = None) -> None:
        self.m = module.eval()
        self.x = x.to(torch.float32)
        self.cond = cond.to(torch.float32)
        self.teacher_steps, self.student_steps = teacher_steps, student_steps
        self.guard = guard
        channels = int(module.field_mean.numel())
        self.fields = None if fields is None or int(fields) == channels else int(fields)
        if guard.invariants and pde is None:
            raise ValueError("Guard(invariants=True) needs the equation's spec (pde=)")
        self.pde = pde
        self._plan = None   # the decoder's plan of the grid x, made at the first decode
        self._conditioning: dict = {}   # the operator's prepared conditioning per batch size

    def with_module(self, module: Any) -> "Surrogate":
        """Another module (e.g. an operator snapshot of the same run) on the same grid, conditioning,
        sampler steps and guard."""
        return Surrogate(module, self.x, self.cond, self.teacher_steps, self.student_steps, self.guard, self.pde,
                         self.fields)

    @property
    def correctors(self) -> Tuple[str, ...]:
        names = []
        if hasattr(self.m, "flow"):
            names.append("teacher")
        if hasattr(self.m, "student"):
            names.append("student")
        return tuple(names)

    def _cond(self, n: int) -> Tensor:
        return self.cond.expand(n, -1)

    @torch.no_grad()
    def encode(self, u: Tensor) -> Tensor:
        """Physical frames (B, X, C) -> normalised latents (B, N, D)."""
        n = u.shape[-1]
        un = (u - self.m.field_mean[:n]) / self.m.field_std[:n]
        if self.fields is not None:    # absent channels at their mean
            un = torch.cat([un, un.new_zeros(*un.shape[:-1], self.m.field_mean.numel() - n)], dim=-1)
        z = self.m.autoencoder.encode(un, self.x)
        return (z - self.m.latent_mean) / self.m.latent_std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, N, D) -> physical frames (B, X, C) on the evaluation grid, through
        the decoder's plan of that grid (made once: the weights do not change during inference)."""
        decoder = self.m.autoencoder.decoder
        zl = z * self.m.latent_std + self.m.latent_mean
        if decoder.fast_decode and decoder.shares_queries(self.x):
            if self._plan is None:
                self._plan = decoder.plan(self.x)
            un = decoder.decode_planned(zl, self._plan)
        else:
            un = self.m.autoencoder.decode(zl, self.x)
        u = un * self.m.field_std + self.m.field_mean
        return u if self.fields is None else u[..., : self.fields]

    @torch.no_grad()
    def step(self, z: Tensor) -> Tensor:
        n = z.shape[0]
        if n not in self._conditioning:   # the same for every step of a rollout of n states
            self._conditioning[n] = self.m.operator.condition(self._cond(n))
        return self.m.operator(z, self._conditioning[n])

    @torch.no_grad()
    def settle(self, z: Tensor, given: Tensor) -> Tuple[Tensor, Tensor]:
        """A new state and its decoded frame, after the guard: `given` (B, X, C) is the last given
        frame. Returns (state to step from next, frame to report)."""
        u = self.decode(z)
        if not self.guard.active:
            return z, u
        if self.guard.invariants:
            u = self.pde.project(u, given)
        return self.encode(u), u

    @torch.no_grad()
    def correct(self, z_pred: Tensor, corrector: str, generator: Optional[torch.Generator] = None) -> Tensor:
        """One stochastic corrected state: z_pred + r_std * (a residual sample)."""
        cond = self._cond(z_pred.shape[0])
        if corrector == "teacher":
            r = self.m.flow.sample(z_pred, cond, steps=self.teacher_steps, generator=generator)
        elif corrector == "student":
            r = self.m.student.sample(z_pred, cond, steps=self.student_steps, generator=generator)
        else:
            raise ValueError(f"corrector {corrector!r} is not available; this run has {self.correctors}")
        return z_pred + self.m.r_std * r


@torch.no_grad()
def rollout(sur: Surrogate, u0: Tensor, steps: int, corrector: Optional[str] = None, every: int = 1,
            generator: Optional[torch.Generator] = None) -> Tensor:
    """Roll `steps` frames forward from the physical frame u0 (B, X, C); returns (B, steps, X, C).
    With a corrector, every `every`-th step is corrected by one stochastic residual sample."""
    z = sur.encode(u0)
    frames = []
    for k in range(1, steps + 1):
        z = sur.step(z)
        if corrector is not None and k % every == 0:
            z = sur.correct(z, corrector, generator)
        z, u = sur.settle(z, u0)
        frames.append(u)
    return torch.stack(frames, dim=1)


@torch.no_grad()
def ensemble_rollout(sur: Surrogate, u0: Tensor, steps: int, members: int, corrector: str, every: int = 1,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """`members` stochastic rollouts, batched together; returns (M, B, steps, X, C)."""
    B = u0.shape[0]
    big = u0.unsqueeze(0).expand(members, *u0.shape).reshape(members * B, *u0.shape[1:])
    out = rollout(sur, big, steps, corrector=corrector, every=every, generator=generator)
    return out.reshape(members, B, *out.shape[1:])


@torch.no_grad()
def ttc_rollout(proposer: Proposer, u0: Tensor, steps: int, cfg: TTCConfig, reward: Reward,
                on_step: Optional[Callable[[], None]] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """TTC rollout from the physical frames u0 (B, X, C): at each step a per-sample beam search
    (inference/ttc.py) over the proposer's candidate frames (inference/candidates.py; candidate 0 is
    the plain guarded operator step), scored by ``reward`` (inference/rewards.py) from the frames
    alone. Returns the frames (B, steps, X, C) and the search's cost (model evaluations per sample per
    step) and how often it kept candidate 0. ``on_step``: called after every step (a progress bar)."""
    C = u0.shape[-1]
    proposer.check(plan(cfg).n_first)

    def score(prev: Tensor, cand: Tensor) -> Tensor:
        return reward(prev[..., :C], cand[..., :C])

    state = torch.cat([u0, u0], dim=-1)   # (current frame, the given frame the guard projects onto)
    frames, evals, kept = [], [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        state, info = ttc_step(state, proposer, score, cfg)
        frames.append(state[..., :C])
        evals.append(info["evals"].double().mean())
        kept.append((info["chosen"] == 0).double().mean())
        if on_step is not None:
            on_step()
        if step % 10 == 0 or step == steps:   # the search is the slow mode: say where it is
            log.info("TTC: step %d/%d of %d trajectories after %.1f s", step, steps, len(u0),
                     time.perf_counter() - start)
    return torch.stack(frames, dim=1), {"evals_per_step": _mean(evals), "operator_step_kept": _mean(kept)}


def _mean(values: list) -> float:
    return float(torch.stack(values).mean()) if values else math.nan
