"""Analytic physics rewards for 1D viscous Burgers, used to score TTC candidates.

PDE (ARCHITECTURE.md): u_t + (u^2/2)_x = (nu/pi) u_xx on a periodic domain. Fields are physical
(decoded, de-normalised), one frame per sample, shape (B, X) (or (B, X, 1)); ``nu`` is the file's
``Nu`` attribute, ``dx`` and ``dt`` the physical spacings between the two frames (after reduction).

Penalties, each (B,), >= 0, 0 for a perfect step:

- ``mass``:   |mean_x u_next - mean_x u_prev| / (mean_x |u_prev| + eps)      (mass is conserved)
- ``energy``: max(E_next - E_prev, 0) / (E_prev + eps), E = mean_x u^2 / 2    (energy only dissipates)
- ``tv``:     max(TV_next - TV_prev, 0) / (TV_prev + eps), periodic TV = sum_i |u_{i+1} - u_i|
- ``pde``:    the residual of the PDE discretised with the trapezoidal (Crank-Nicolson) rule in time,
              r = (u_next - u_prev)/dt - (R(u_prev) + R(u_next))/2, where the spatial operator
              R(u) = -(F_{i+1/2} - F_{i-1/2})/dx + (nu/pi) (u_{i+1} - 2 u_i + u_{i-1})/dx^2 uses the
              local Lax-Friedrichs flux F of f(u) = u^2/2 on a MUSCL (minmod-limited) reconstruction:
              conservative, so a constant mass shift shows in the u_t term only. Penalty =
              RMS_x(r) / (RMS_x(u_t) + RMS_x((R(u_prev) + R(u_next))/2) + eps), which lies in [0, 1] by
              the triangle inequality: 0 when the time derivative balances the spatial operator, 1 for a
              frozen field (u_next = u_prev) that should move. The frames a model steps are several
              solver steps apart (dt_save = 0.05 while the CFL step is ~1e-3), so the true solution does
              not score 0, least of all across a moving shock (0.1-0.5 at nu = 0.001, 256 cells, against
              0.03-0.05 while smooth); it scores lower than wrong candidates, which is what TTC needs.
              (The trapezoidal form was measured against a time-centred one, R((u_prev + u_next)/2): it
              gives the true solution across shocks a clearly smaller residual.)

``domain_length`` is accepted for the scale of the problem and checked against ``dx``; the
penalties are dimensionless (means over x, so they do not depend on it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ups_lightning.errors import UserError

__all__ = ["PENALTIES", "DEFAULT_WEIGHTS", "burgers_rewards", "burgers_score"]

PENALTIES = ("mass", "energy", "tv", "pde")
DEFAULT_WEIGHTS: dict[str, float] = {"mass": 1.0, "energy": 1.0, "tv": 1.0, "pde": 1.0}
_EPS = 1e-12


def _frame(u: Tensor, name: str) -> Tensor:
    if u.dim() == 3 and u.shape[-1] == 1:
        u = u[..., 0]
    if u.dim() != 2:
        raise ValueError(f"{name}: expected a frame (batch, x) or (batch, x, 1), got shape {tuple(u.shape)}")
    return u


def _minmod(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(a * b > 0, torch.sign(a) * torch.minimum(a.abs(), b.abs()), torch.zeros_like(a))


def _llf_flux_divergence(u: Tensor, dx: float) -> Tensor:
    """(F_{i+1/2} - F_{i-1/2}) / dx for f(u) = u^2/2, periodic, MUSCL-minmod + local Lax-Friedrichs."""
    up, um = torch.roll(u, -1, dims=-1), torch.roll(u, 1, dims=-1)
    slope = _minmod(u - um, up - u)
    left = u + 0.5 * slope  # state left of interface i+1/2
    right = up - 0.5 * torch.roll(slope, -1, dims=-1)  # state right of interface i+1/2
    a = torch.maximum(left.abs(), right.abs())
    flux = 0.25 * (left * left + right * right) - 0.5 * a * (right - left)
    return (flux - torch.roll(flux, 1, dims=-1)) / dx


def _spatial_operator(u: Tensor, nu: float, dx: float) -> Tensor:
    """R(u) = -(u^2/2)_x + (nu/pi) u_xx, conservative finite-volume form, periodic."""
    lap = (torch.roll(u, -1, dims=-1) - 2.0 * u + torch.roll(u, 1, dims=-1)) / (dx * dx)
    return -_llf_flux_divergence(u, dx) + (nu / math.pi) * lap


def _rms(v: Tensor) -> Tensor:
    return v.pow(2).mean(dim=-1).sqrt()


def burgers_rewards(u_prev: Tensor, u_next: Tensor, nu: float, dx: float, dt: float,
                    domain_length: float = 1.0) -> dict[str, Tensor]:
    """Physics penalties of the step u_prev -> u_next (module doc), each (B,), lower is better.

    ``u_prev`` may have batch 1 (broadcast against the candidates) or the batch of ``u_next``."""
    if not (dx > 0 and dt > 0 and nu >= 0 and domain_length > 0):
        raise UserError(f"burgers_rewards: need dx > 0, dt > 0, nu >= 0 and domain_length > 0; got "
                        f"dx={dx}, dt={dt}, nu={nu}, domain_length={domain_length}")
    up = _frame(u_prev, "u_prev")
    un = _frame(u_next, "u_next")
    nx = un.shape[-1]
    if up.shape[-1] != nx:
        raise ValueError(f"u_prev has {up.shape[-1]} cells, u_next {nx}")
    if not math.isclose(nx * dx, domain_length, rel_tol=1e-3):
        raise UserError(f"burgers_rewards: {nx} cells of dx={dx} span {nx * dx}, not the domain length "
                        f"{domain_length}; dx and the domain must come from the same (reduced) file")
    dtype = torch.promote_types(un.dtype, torch.float32)
    up, un = up.to(dtype), un.to(dtype)
    up = up.expand_as(un)

    mass = (un.mean(-1) - up.mean(-1)).abs() / (up.abs().mean(-1) + _EPS)
    e_prev, e_next = 0.5 * up.pow(2).mean(-1), 0.5 * un.pow(2).mean(-1)
    energy = torch.clamp(e_next - e_prev, min=0.0) / (e_prev + _EPS)
    tv_prev = (torch.roll(up, -1, -1) - up).abs().sum(-1)
    tv_next = (torch.roll(un, -1, -1) - un).abs().sum(-1)
    tv = torch.clamp(tv_next - tv_prev, min=0.0) / (tv_prev + _EPS)

    ut = (un - up) / dt
    rbar = 0.5 * (_spatial_operator(up, nu, dx) + _spatial_operator(un, nu, dx))
    pde = _rms(ut - rbar) / (_rms(ut) + _rms(rbar) + _EPS)

    out = {"mass": mass, "energy": energy, "tv": tv, "pde": pde}
    # a non-finite candidate is the worst possible candidate, never a NaN that sorts unpredictably
    return {k: torch.nan_to_num(v, nan=math.inf) for k, v in out.items()}


def burgers_score(u_prev: Tensor, u_next: Tensor, nu: float, dx: float, dt: float,
                  domain_length: float = 1.0, weights: dict[str, float] | None = None) -> Tensor:
    """TTC reward (B,), higher is better: -(sum_k w_k * penalty_k) over the penalties of
    :func:`burgers_rewards`; ``weights`` defaults to 1 for each of mass, energy, tv, pde, and a
    partial dict overrides only the keys it names (0 switches a penalty off)."""
    w = dict(DEFAULT_WEIGHTS)
    if weights:
        unknown = sorted(set(weights) - set(PENALTIES))
        if unknown:
            raise UserError(f"burgers_score: unknown reward weight(s) {unknown}; the Burgers rewards are "
                            f"{list(PENALTIES)}")
        w.update({k: float(v) for k, v in weights.items()})
    pen = burgers_rewards(u_prev, u_next, nu, dx, dt, domain_length)
    total = sum(w[k] * pen[k] for k in PENALTIES if w[k] != 0.0)
    if not isinstance(total, Tensor):  # all weights zero
        total = torch.zeros_like(pen["mass"])
    return -total
