"""Autoregressive rollouts in latent space, decoded to physical fields.

The rollout sees only the last given frame: it encodes it once, then steps on its own outputs (no
teacher forcing), decoding every predicted state on the evaluation grid. Modes:

- operator only (deterministic);
- operator + stochastic corrector (diffusion teacher or distilled student) every `every` steps;
- an ensemble of such stochastic rollouts (members batched together);
- TTC: per-sample beam search over corrector candidates scored by Burgers physics rewards.

Every mode can guard its states (`Guard`): decode each new state, optionally restore the mass of the
given frame (periodic Burgers conserves the mean of u exactly), and re-encode it, so the next step
starts from a state on the autoencoder's manifold. The guard uses nothing but the given frame.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ups_lightning.inference.rewards import burgers_score
from ups_lightning.inference.ttc import TTCConfig, ttc_step

log = logging.getLogger("ups_lightning.rollout")


@dataclass(frozen=True)
class Physics:
    """What the rewards need from the evaluated file: nu, and dx, dt, domain length after reduction."""

    nu: float
    dx: float
    dt: float
    domain_length: float


@dataclass(frozen=True)
class Guard:
    """Projections applied to every rolled-out state (module doc). Both off: the raw latent rollout."""

    reencode: bool = False        # decode -> encode each step (back onto the autoencoder's manifold)
    conserve_mass: bool = False   # shift each decoded frame to the given frame's mean, then re-encode

    @property
    def active(self) -> bool:
        return self.reencode or self.conserve_mass


def restore_mass(u: Tensor, mass: Tensor) -> Tensor:
    """Frames (B, ..., X, C) shifted so their mean over x is `mass` (broadcastable, mean over x of
    the given frame): the guard's mass-preserving projection."""
    return u - u.mean(dim=-2, keepdim=True) + mass


class Surrogate:
    """A trained pipeline (the last finished stage's module) seen as encode / step / correct / decode,
    on the grid and with the conditioning of the data being evaluated."""

    def __init__(self, module: Any, x: Tensor, cond: Tensor, teacher_steps: int = 16,
                 student_steps: int = 1, guard: Guard = Guard()) -> None:
        self.m = module.eval()
        self.x = x.to(torch.float32)
        self.cond = cond.to(torch.float32)
        self.teacher_steps, self.student_steps = teacher_steps, student_steps
        self.guard = guard

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
        un = (u - self.m.field_mean) / self.m.field_std
        z = self.m.autoencoder.encode(un, self.x)
        return (z - self.m.latent_mean) / self.m.latent_std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, N, D) -> physical frames (B, X, C) on the evaluation grid."""
        un = self.m.autoencoder.decode(z * self.m.latent_std + self.m.latent_mean, self.x)
        return un * self.m.field_std + self.m.field_mean

    @torch.no_grad()
    def step(self, z: Tensor) -> Tensor:
        return self.m.operator(z, self._cond(z.shape[0]))

    @torch.no_grad()
    def settle(self, z: Tensor, mass: Tensor) -> Tuple[Tensor, Tensor]:
        """A new state and its decoded frame, after the guard: `mass` (B, 1, C) is the mean over x
        of the given frame. Returns (state to step from next, frame to report)."""
        u = self.decode(z)
        if not self.guard.active:
            return z, u
        if self.guard.conserve_mass:
            u = restore_mass(u, mass)
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
    z, mass = sur.encode(u0), u0.mean(dim=1, keepdim=True)
    frames = []
    for k in range(1, steps + 1):
        z = sur.step(z)
        if corrector is not None and k % every == 0:
            z = sur.correct(z, corrector, generator)
        z, u = sur.settle(z, mass)
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
def ttc_rollout(sur: Surrogate, u0: Tensor, steps: int, corrector: str, cfg: TTCConfig, physics: Physics,
                weights: Optional[Dict[str, float]] = None, include_operator: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """TTC rollout: at each step, beam search per sample over corrector candidates, scored by the
    Burgers rewards of the decoded states. With `include_operator`, the uncorrected operator step
    (a zero residual) is one of the candidates, so the search can also decline to correct.
    Returns the frames (B, steps, X, C) and the search's cost (model evaluations per sample per step)."""

    def propose(states: Tensor, k: int) -> Tensor:
        z_pred = sur.step(states)
        rep = z_pred.unsqueeze(1).expand(-1, k, *z_pred.shape[1:]).reshape(-1, *z_pred.shape[1:])
        cand = sur.correct(rep, corrector, generator).reshape(states.shape[0], k, *states.shape[1:])
        if include_operator:
            cand[:, 0] = z_pred
        return cand

    def score(prev: Tensor, nxt: Tensor) -> Tensor:
        u_prev, u_next = sur.decode(prev)[..., 0], sur.decode(nxt)[..., 0]
        return burgers_score(u_prev, u_next, physics.nu, physics.dx, physics.dt, physics.domain_length,
                             weights=weights)

    z, mass = sur.encode(u0), u0.mean(dim=1, keepdim=True)
    frames, evals = [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        z, info = ttc_step(z, propose, score, cfg)
        z, u = sur.settle(z, mass)
        frames.append(u)
        evals.append(info["evals"].double().mean())
        if step % 10 == 0 or step == steps:   # the search is the slow mode: say where it is
            log.info("TTC: step %d/%d of %d trajectories after %.1f s", step, steps, len(u0),
                     time.perf_counter() - start)
    mean_evals = float(torch.stack(evals).mean()) if evals else math.nan
    return torch.stack(frames, dim=1), {"evals_per_step": mean_evals}
