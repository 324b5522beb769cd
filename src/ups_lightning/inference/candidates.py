"""TTC candidates: the next frames a search chooses between, proposed from a physical frame.

The search state is the guarded physical frame (every candidate is decoded, projected onto the
invariants the given frame fixes, and re-encoded by whichever member steps from it next), so members
with different autoencoders can propose for the same state. Candidate ``i`` of ``k`` comes from member
``i % n_members``, draw ``i // n_members``:

- draw 0: the member's own operator step (candidate 0 is the first member's: the plain rollout);
- draw >= 1: that step moved by latent noise of scale ``perturb`` (in normalised latent units), or
  by the stochastic corrector's residual sample scaled by ``corrector_scale`` when ``corrector`` is set.

With ``mean``, the last candidate is instead the mean of the members' operator steps (the ensemble
mean, projected like the others): no model evaluation of its own.

Members are independently trained pipelines (other seeds of the same configuration): an operator
ensemble. Their parameters count towards the search's model size (``n_params``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ups_lightning.errors import UserError

__all__ = ["Proposer"]


class Proposer:
    """``propose(states (M, X, 2C), k) -> (M, k, X, 2C)``: a state is the current frame and the last
    given frame (channels concatenated), so the guard's projection travels with every beam."""

    def __init__(self, members: Sequence, perturb: float = 0.0, corrector: Optional[str] = None,
                 corrector_scale: float = 1.0, mean: bool = False,
                 generator: Optional[torch.Generator] = None) -> None:
        if not members:
            raise ValueError("Proposer needs at least one member")
        if perturb < 0 or corrector_scale < 0:
            raise UserError(f"ttc.candidates: perturb ({perturb}) and corrector_scale ({corrector_scale}) "
                            "must be >= 0.")
        for m in members:
            if corrector is not None and corrector not in m.correctors:
                raise UserError(f"ttc.candidates.corrector={corrector}: a member has "
                                f"{list(m.correctors) or 'no'} corrector stage(s); train them with stage=all "
                                "or use candidates that need no corrector (members, perturb).")
        self.members: List = list(members)
        self.perturb, self.corrector, self.corrector_scale = float(perturb), corrector, float(corrector_scale)
        self.mean = bool(mean)
        if self.mean and len(members) < 2:
            raise UserError("ttc.candidates.mean=true needs at least 2 members (ttc.candidates.members).")
        self.generator = generator

    @property
    def stochastic(self) -> bool:
        return self.perturb > 0 or self.corrector is not None

    def check(self, k: int) -> None:
        if self.mean and k < len(self.members) + 1:
            raise UserError(f"ttc.n_candidates={k}: with ttc.candidates.mean=true the search needs every member's "
                            f"step and the mean, n_candidates >= {len(self.members) + 1}.")
        if k > len(self.members) + self.mean and not self.stochastic:
            raise UserError(f"ttc.n_candidates={k} but only {len(self.members)} member(s) and no stochastic "
                            "draws: the extra candidates would repeat the operator steps. Set "
                            "ttc.candidates.perturb > 0, a corrector, more members, or fewer candidates.")

    @torch.no_grad()
    def _draws(self, sur, u: Tensor, given: Tensor, n: int) -> Tensor:
        """n candidate frames of one member from frames u (M, X, C): (M, n, X, C)."""
        zp = sur.step(sur.encode(u))
        z = zp.unsqueeze(1).repeat(1, n, *([1] * (zp.dim() - 1)))
        if n > 1:
            extra = z[:, 1:].reshape(-1, *zp.shape[1:])
            if self.corrector is not None:
                extra = extra + self.corrector_scale * (sur.correct(extra, self.corrector, self.generator) - extra)
            elif self.perturb > 0:
                extra = extra + self.perturb * torch.randn(extra.shape, generator=self.generator)
            z[:, 1:] = extra.reshape(zp.shape[0], n - 1, *zp.shape[1:])
        frames = sur.decode(z.reshape(-1, *zp.shape[1:]))
        rep = given.unsqueeze(1).expand(-1, n, *given.shape[1:]).reshape(-1, *given.shape[1:])
        if sur.guard.invariants:
            frames = sur.pde.project(frames, rep)
        return frames.reshape(u.shape[0], n, *u.shape[1:])

    def __call__(self, states: Tensor, k: int) -> Tensor:
        C = states.shape[-1] // 2
        u, given = states[..., :C], states[..., C:]
        n = len(self.members)
        out = torch.empty(states.shape[0], k, *u.shape[1:], dtype=u.dtype)
        drawn = k - 1 if self.mean else k
        for j, sur in enumerate(self.members):
            idx = list(range(j, drawn, n))
            if idx:
                out[:, idx] = self._draws(sur, u, given, len(idx)).to(u.dtype)
        if self.mean:   # the members' operator steps are candidates 0..n-1; each is already projected
            out[:, -1] = out[:, :n].mean(dim=1)
        return torch.cat([out, given.unsqueeze(1).expand(-1, k, *given.shape[1:])], dim=-1)
