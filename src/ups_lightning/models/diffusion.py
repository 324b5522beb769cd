"""Stages 3-4: a conditional generative model of the operator residual and its consistency student.

The residual ``r = z_{t+1} - operator(z_t)`` (normalised by the caller to O(1) by a scalar std) is
modelled given the operator prediction ``z_pred = operator(z_t)`` and ``cond``.

:class:`ResidualFlow` - flow matching with the linear (rectified-flow) path. Noise ``e ~ N(0, I)``,
``tau ~ U(0, 1)``, ``x_tau = (1 - tau) e + tau r``; the network regresses the velocity
``v = r - e``. Sampling integrates ``dx/dtau = v(x, tau)`` from tau = 0 (pure noise) to tau = 1
(data) in K Euler (or Heun) steps; different noise gives different, distinct samples.

:class:`ConsistencyStudent` - ``f(x_tau, tau) = c_skip(tau) x_tau + c_out(tau) F(x_tau, tau, ...)``
with ``c_skip = 1`` and ``c_out = 1 - tau``: ``f(x, 1) = x`` exactly (the consistency boundary
condition at the data end), and ``F`` plays the role of an average velocity, so a student copied from
the teacher (:meth:`ConsistencyStudent.init_from_teacher`) starts as the teacher's one-Euler-step
sampler. Sampling: 1 step ``f(e, 0)``; k steps re-noise the estimate to intermediate taus and predict
again (Song et al. 2023, multistep consistency sampling).

:func:`consistency_distillation_loss` - consistency distillation (Song et al. 2023) along the
teacher's probability-flow ODE on the grid ``tau_n = n / n_grid``: ``x_n = (1 - tau_n) e + tau_n r``,
``x_{n+1} = teacher.ode_step(x_n, tau_n, tau_{n+1})``,
``loss = mse(student(x_n, tau_n), target_student(x_{n+1}, tau_{n+1}).detach())``. The only anchor is
the boundary condition ``f(x, 1) = x`` (reached at n + 1 = n_grid): nothing pulls the residual
towards zero; the student learns the teacher's map noise -> sample.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ups_lightning.models.layers import (
    ConditionEmbedding,
    FinalLayer,
    TimestepEmbedding,
    TransformerBlock,
)

TauLike = Union[float, Tensor]


def _tau_batch(tau: TauLike, B: int, ref: Tensor) -> Tensor:
    """A flow time as a (B,) tensor on ``ref``'s device (float32)."""
    t = torch.as_tensor(tau, dtype=torch.float32, device=ref.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"tau must be a scalar or shape ({B},), got {tuple(t.shape)}.")
    return t


def _randn(shape: Sequence[int], ref: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if generator is not None and generator.device != ref.device:
        # CPU generator with CUDA tensors: draw on the generator's device and move
        return torch.randn(shape, generator=generator, device=generator.device, dtype=ref.dtype).to(ref.device)
    return torch.randn(shape, generator=generator, device=ref.device, dtype=ref.dtype)


def _rand(n: int, ref: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if generator is not None and generator.device != ref.device:
        return torch.rand(n, generator=generator, device=generator.device).to(ref.device)
    return torch.rand(n, generator=generator, device=ref.device)


class TokenVelocityNet(nn.Module):
    """Transformer on tokens ``concat[x_tau, z_pred]`` with AdaLN-Zero on ``emb(tau) + emb(cond)``.

    ``(x_tau (B, N, D), tau (B,), z_pred (B, N, D), cond (B, cond_dim)) -> (B, N, D)``; the output
    head is zero-initialised. ``width`` (default ``dim``) is the internal token width.
    """

    def __init__(
        self,
        dim: int,
        n_tokens: int,
        depth: int = 3,
        heads: int = 4,
        hidden: Optional[int] = None,
        cond_dim: int = 2,
        width: Optional[int] = None,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        width = dim if width is None else width
        if width % heads != 0:
            raise ValueError(f"flow backbone: width={width} must be divisible by heads={heads}.")
        hidden = 2 * width if hidden is None else hidden
        self.dim, self.n_tokens, self.width, self.cond_dim = dim, n_tokens, width, cond_dim
        self.in_proj = nn.Linear(2 * dim, width)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        self.tau_embed = TimestepEmbedding(width)
        self.cond_embed = ConditionEmbedding(cond_dim, width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, hidden, cond_dim=width, backend=attn_backend) for _ in range(depth))
        self.final = FinalLayer(width, dim, width)

    def forward(self, x: Tensor, tau: Tensor, z_pred: Tensor, cond: Tensor) -> Tensor:
        if x.shape != z_pred.shape or x.dim() != 3 or x.shape[1:] != (self.n_tokens, self.dim):
            raise ValueError(f"flow backbone: x_tau and z_pred must both be (B, {self.n_tokens}, {self.dim}), "
                             f"got {tuple(x.shape)} and {tuple(z_pred.shape)}.")
        c = self.tau_embed(tau) + self.cond_embed(cond)
        h = self.in_proj(torch.cat([x, z_pred], dim=-1)) + self.pos
        for blk in self.blocks:
            h = blk(h, c)
        return self.final(h, c)


class _ResidualModel(nn.Module):
    """The token network shared by the flow teacher and the consistency student: residual tokens,
    conditioned on the operator's prediction z_pred, tau and cond. Both have the same keys (`net.*`),
    so a student can start from its teacher's weights."""

    def __init__(
        self,
        dim: int,
        n_tokens: int,
        depth: int = 3,
        heads: int = 4,
        hidden: Optional[int] = None,
        cond_dim: int = 2,
        width: Optional[int] = None,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.dim, self.n_tokens = dim, n_tokens
        self.config = dict(dim=dim, n_tokens=n_tokens, depth=depth, heads=heads, hidden=hidden,
                           cond_dim=cond_dim, width=width, attn_backend=attn_backend)
        self.net = TokenVelocityNet(dim, n_tokens, depth, heads, hidden, cond_dim, width, attn_backend)


class ResidualFlow(_ResidualModel):
    """Conditional flow matching model of the residual r given z_pred and cond (see module doc)."""

    def velocity(self, x_tau: Tensor, tau: TauLike, z_pred: Tensor, cond: Tensor) -> Tensor:
        return self.net(x_tau, _tau_batch(tau, x_tau.shape[0], x_tau), z_pred, cond)

    def loss(self, r: Tensor, z_pred: Tensor, cond: Tensor,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """Flow-matching loss: mse(v(x_tau, tau), r - e) with e ~ N(0, I), tau ~ U(0, 1)."""
        B = r.shape[0]
        e = _randn(r.shape, r, generator)
        tau = _rand(B, r, generator)
        t = tau.view(B, 1, 1).to(r.dtype)
        x_tau = (1 - t) * e + t * r
        return F.mse_loss(self.velocity(x_tau, tau, z_pred, cond), r - e)

    def ode_step(self, x: Tensor, tau: TauLike, tau_next: TauLike, z_pred: Tensor, cond: Tensor,
                 method: str = "euler") -> Tensor:
        """One step of dx/dtau = v from tau to tau_next (scalars or (B,)); Euler (1 evaluation) or
        Heun (2 evaluations)."""
        B = x.shape[0]
        t0 = _tau_batch(tau, B, x)
        t1 = _tau_batch(tau_next, B, x)
        h = (t1 - t0).view(B, 1, 1).to(x.dtype)
        v0 = self.velocity(x, t0, z_pred, cond)
        if method == "euler":
            return x + h * v0
        if method == "heun":
            x1 = x + h * v0
            v1 = self.velocity(x1, t1, z_pred, cond)
            return x + 0.5 * h * (v0 + v1)
        raise ValueError(f"ode_step: method must be 'euler' or 'heun', got {method!r}.")

    @torch.no_grad()
    def sample(self, z_pred: Tensor, cond: Tensor, steps: int = 16, noise: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, method: str = "euler") -> Tensor:
        """Integrate from noise (tau=0) to a residual sample (tau=1) in ``steps`` uniform steps.
        Model evaluations: ``steps`` (Euler) or ``2 * steps`` (Heun)."""
        if steps < 1:
            raise ValueError(f"sample: steps must be >= 1, got {steps}.")
        x = _randn(z_pred.shape, z_pred, generator) if noise is None else noise.to(z_pred)
        taus = torch.linspace(0.0, 1.0, steps + 1).tolist()
        for a, b in zip(taus[:-1], taus[1:]):
            x = self.ode_step(x, a, b, z_pred, cond, method=method)
        return x


class ConsistencyStudent(_ResidualModel):
    """Consistency model f(x_tau, tau | z_pred, cond) -> clean residual, f(x, 1) = x exactly."""

    @staticmethod
    def c_skip(tau: Tensor) -> Tensor:
        return torch.ones_like(tau)

    @staticmethod
    def c_out(tau: Tensor) -> Tensor:
        return 1.0 - tau

    @classmethod
    def from_teacher(cls, teacher: ResidualFlow) -> "ConsistencyStudent":
        """A student with the teacher's backbone sizes and weights (starts as its 1-step Euler sampler)."""
        return cls(**teacher.config).init_from_teacher(teacher)

    def init_from_teacher(self, teacher: ResidualFlow) -> "ConsistencyStudent":
        """Copy the teacher's backbone weights (same sizes required)."""
        self.net.load_state_dict(teacher.net.state_dict())
        return self

    def forward(self, x_tau: Tensor, tau: TauLike, z_pred: Tensor, cond: Tensor) -> Tensor:
        B = x_tau.shape[0]
        t = _tau_batch(tau, B, x_tau)
        tv = t.view(B, 1, 1).to(x_tau.dtype)
        return self.c_skip(tv) * x_tau + self.c_out(tv) * self.net(x_tau, t, z_pred, cond)

    @torch.no_grad()
    def sample(self, z_pred: Tensor, cond: Tensor, steps: int = 1, noise: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None,
               taus: Optional[Sequence[float]] = None) -> Tensor:
        """``steps`` consistency evaluations: r = f(e, 0), then for each intermediate tau_k
        (default ``k / steps``) re-noise ``x = (1 - tau_k) e_k + tau_k r`` with fresh noise e_k
        (from ``generator``) and predict again. ``noise`` is the initial noise e."""
        if steps < 1:
            raise ValueError(f"sample: steps must be >= 1, got {steps}.")
        taus = [k / steps for k in range(1, steps)] if taus is None else list(taus)
        if len(taus) != steps - 1 or any(not 0.0 < t < 1.0 for t in taus):
            raise ValueError(f"sample: need {steps - 1} intermediate taus in (0, 1), got {taus}.")
        e = _randn(z_pred.shape, z_pred, generator) if noise is None else noise.to(z_pred)
        r = self(e, 0.0, z_pred, cond)
        for t in taus:
            e = _randn(z_pred.shape, z_pred, generator)
            r = self((1 - t) * e + t * r, t, z_pred, cond)
        return r


def consistency_distillation_loss(
    student: ConsistencyStudent,
    target_student: ConsistencyStudent,
    teacher: ResidualFlow,
    r: Tensor,
    z_pred: Tensor,
    cond: Tensor,
    n_grid: int = 16,
    generator: Optional[torch.Generator] = None,
    teacher_method: str = "euler",
) -> Tensor:
    """Consistency distillation along the teacher's ODE (see module doc). ``target_student`` is the
    caller's EMA copy of ``student`` (it may be ``student`` itself); teacher and target get no grad."""
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}.")
    B = r.shape[0]
    e = _randn(r.shape, r, generator)
    if generator is not None and generator.device != r.device:
        n = torch.randint(0, n_grid, (B,), generator=generator, device=generator.device).to(r.device)
    else:
        n = torch.randint(0, n_grid, (B,), generator=generator, device=r.device)
    tau_n = n.float() / n_grid
    tau_m = (n + 1).float() / n_grid
    t = tau_n.view(B, 1, 1).to(r.dtype)
    x_n = (1 - t) * e + t * r
    with torch.no_grad():
        x_m = teacher.ode_step(x_n, tau_n, tau_m, z_pred, cond, method=teacher_method)
        target = target_student(x_m, tau_m, z_pred, cond)
    return F.mse_loss(student(x_n, tau_n, z_pred, cond), target.detach())


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, parameter by parameter (buffers copied)."""
    for pt, ps in zip(target.parameters(), source.parameters()):
        pt.lerp_(ps, 1.0 - decay)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)
