"""TTC: per-sample beam search under a budget, and the Burgers physics rewards it scores with (the
burgers1d spec's ``rewards`` / ``score``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ups_lightning.errors import UserError
from ups_lightning.inference.ttc import TTCConfig, plan, ttc_step
from ups_lightning.pdes import get_pde
from ups_lightning.pdes.base import PENALTY_DOCS

BURGERS = get_pde("burgers1d")


def burgers_rewards(u_prev, u_next, nu, dx, dt):
    return BURGERS.rewards(u_prev, u_next, {"nu": nu}, dx, dt)


def burgers_score(u_prev, u_next, nu, dx, dt, weights=None):
    return BURGERS.score(u_prev, u_next, {"nu": nu}, dx, dt, weights=weights)


# ---------------------------------------------------------------------------------------------
# beam search on toys
# ---------------------------------------------------------------------------------------------
class Counter:
    """Wraps a propose function and counts model evaluations (states x k) per call."""

    def __init__(self, fn):
        self.fn, self.evals = fn, 0

    def __call__(self, states, k):
        self.evals += states.shape[0] * k
        return self.fn(states, k)


OFFSETS = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0, 7.0], dtype=torch.float64)


def offset_propose(states, k):
    """state = [value, target]; candidate j moves the value by OFFSETS[j] (deterministic toy)."""
    out = states.unsqueeze(1).repeat(1, k, 1)
    out[..., 0] += OFFSETS[:k]
    return out


def closeness(prev, cand):
    return -(cand[..., 0] - cand[..., 1]).abs()


def test_choice_is_per_sample():
    targets = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0, 7.0, 2.9, -5.0], dtype=torch.float64)
    state = torch.stack([torch.zeros_like(targets), targets], dim=1)
    nxt, info = ttc_step(state, offset_propose, closeness, TTCConfig(n_candidates=6, beam_width=1, horizon=1))
    expected = torch.tensor([0, 1, 2, 3, 4, 5, 4, 0])
    assert torch.equal(info["chosen"], expected)
    assert torch.equal(nxt[:, 0], OFFSETS[expected])
    assert torch.equal(nxt[:, 1], targets)  # the rest of each sample's state travels with it
    assert info["scores"].shape == (8, 6)
    assert torch.equal(info["evals"], torch.full((8,), 6))


def _trap_toy():
    """state = [value, phase, trap_sign]. From phase 0, candidate 0 sets value 1 ('A'), candidate 1
    sets value 2 ('B'). Step 1 pays 1 for A, 0 for B; step 2 pays 5 after B, 0 after A. Greedy takes
    A; a lookahead of 2 takes B. trap_sign = -1 swaps the roles (B is the greedy and the right one)."""

    def propose(states, k):
        out = states.unsqueeze(1).repeat(1, k, 1)
        first = states[:, 1] == 0
        vals = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=states.dtype)[:k]
        out[:, :, 0] = torch.where(first[:, None], vals[None, :], states[:, None, 0])
        out[:, :, 1] = states[:, None, 1] + 1
        return out

    def score(prev, cand):
        a = (cand[..., 0] == 1).to(prev.dtype)
        trap = cand[..., 2] > 0
        step1 = torch.where(trap, a, 1 - a)  # with the trap, A pays now ...
        step2 = torch.where(trap, 5 * (1 - a), 0 * a)  # ... B pays later
        return torch.where(cand[..., 1] == 1, step1, step2)

    return propose, score


def test_lookahead_finds_what_greedy_misses():
    propose, score = _trap_toy()
    state = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    _, greedy = ttc_step(state, propose, score, TTCConfig(n_candidates=2, beam_width=2, horizon=1))
    assert greedy["chosen"].tolist() == [0, 1, 0]
    nxt, look = ttc_step(state, propose, score, TTCConfig(n_candidates=2, beam_width=2, horizon=2))
    assert look["chosen"].tolist() == [1, 1, 1]
    assert nxt[:, 0].tolist() == [2.0, 2.0, 2.0]
    assert nxt[:, 1].tolist() == [1.0, 1.0, 1.0]  # one step committed, not the lookahead's
    assert look["path_score"].tolist() == [5.0, 1.0, 5.0]
    assert look["evals"].tolist() == [2 + 2 * 2] * 3


def test_budget_respected_and_evals_counted():
    propose, score = _trap_toy()
    state = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    B = state.shape[0]
    cases = [
        (TTCConfig(4, 2, 3, None), 4 + 2 * 2 * 4),
        (TTCConfig(4, 2, 3, 12), 12),  # horizon 3 with 2 candidates per beam: 4 + 2*2*2
        (TTCConfig(4, 2, 3, 9), 8),  # horizon kept, 1 candidate per beam: 4 + 2*2*1
        (TTCConfig(4, 2, 3, 5), 4),  # too little for any lookahead
        (TTCConfig(4, 2, 3, 2), 2),  # fewer first-step candidates
        (TTCConfig(4, 1, 3, None), 4),  # one beam: lookahead is pointless, dropped
    ]
    for cfg, expected in cases:
        c = Counter(propose)
        _, info = ttc_step(state, c, score, cfg)
        assert c.evals == B * expected, cfg
        assert info["evals"].tolist() == [expected] * B, cfg
        assert plan(cfg).evals == expected
        if cfg.budget is not None:
            assert expected <= cfg.budget


def test_plain_stochastic_step_when_one_candidate():
    def propose(states, k):
        return states.unsqueeze(1) + torch.randn(states.shape[0], k, *states.shape[1:], dtype=states.dtype)

    state = torch.randn(5, 16, dtype=torch.float64)
    torch.manual_seed(7)
    plain = propose(state, 1)[:, 0]
    torch.manual_seed(7)
    nxt, info = ttc_step(state, propose, lambda p, c: -(c - p.unsqueeze(1)).pow(2).sum(-1), TTCConfig(1, 2, 1))
    assert torch.equal(nxt, plain)
    assert info["chosen"].tolist() == [0] * 5 and info["evals"].tolist() == [1] * 5


def test_nan_scores_never_chosen_and_bad_config():
    state = torch.zeros(3, 2, dtype=torch.float64)

    def score(prev, cand):
        s = -cand[..., 0]
        return torch.where(cand[..., 0] < 0, torch.full_like(s, math.nan), s)  # the best-looking ones are NaN

    _, info = ttc_step(state, offset_propose, score, TTCConfig(n_candidates=4))
    assert info["chosen"].tolist() == [2, 2, 2]
    with pytest.raises(UserError):
        ttc_step(state, offset_propose, score, TTCConfig(n_candidates=0))
    with pytest.raises(UserError):
        ttc_step(state, offset_propose, score, TTCConfig(budget=0))


# ---------------------------------------------------------------------------------------------
# Burgers rewards on a true solution against perturbed candidates
# ---------------------------------------------------------------------------------------------
def _solve(u0: np.ndarray, nu: float, dt_save: float, n_frames: int) -> np.ndarray:
    """A small own finite-volume solver (MUSCL-minmod, LLF, midpoint RK2) on (0, 1), periodic."""
    nx = u0.shape[-1]
    dx, diff = 1.0 / nx, nu / math.pi

    def rhs(u):
        up, um = np.roll(u, -1, -1), np.roll(u, 1, -1)
        a, b = u - um, up - u
        s = np.where(a * b > 0, np.sign(a) * np.minimum(abs(a), abs(b)), 0.0)
        left, right = u + 0.5 * s, up - 0.5 * np.roll(s, -1, -1)
        speed = np.maximum(abs(left), abs(right))
        f = 0.25 * (left**2 + right**2) - 0.5 * speed * (right - left)
        return -(f - np.roll(f, 1, -1)) / dx + diff * (up - 2 * u + um) / dx**2

    out, u = [u0.copy()], u0.copy()
    for _ in range(n_frames - 1):
        t = 0.0
        while t < dt_save - 1e-14:
            h = min(0.25 * dx / max(np.abs(u).max(), 1e-8), 0.5 * dx * dx / diff, dt_save - t)
            u = u + h * rhs(u + 0.5 * h * rhs(u))
            t += h
        out.append(u.copy())
    return np.stack(out, 1)


@pytest.fixture(scope="module")
def trajectories():
    nx = 128
    x = (np.arange(nx) + 0.5) / nx
    rng = np.random.default_rng(0)
    u0 = np.stack([0.8 * np.sin(2 * np.pi * x + p) + 0.3 * np.cos(4 * np.pi * x) + 0.1 for p in rng.uniform(0, 6, 4)])
    return {nu: torch.tensor(_solve(u0, nu, 0.05, 8)) for nu in (0.01, 0.001)}


@pytest.mark.parametrize("nu", [0.01, 0.001])
def test_true_step_scores_better_than_perturbed(trajectories, nu):
    traj = trajectories[nu]
    nx = traj.shape[-1]
    g = torch.Generator().manual_seed(1)
    for k in range(traj.shape[1] - 1):  # smooth start through shock formation
        a, b = traj[:, k], traj[:, k + 1]
        mean = b.mean(-1, keepdim=True)
        cands = {
            "noise": b + 0.02 * torch.randn(b.shape, generator=g, dtype=b.dtype),
            "mass": b + 0.05,
            "energy": mean + 1.1 * (b - mean),
            "persistence": a,
        }
        true_score = burgers_score(a, b, nu, 1.0 / nx, 0.05)
        assert true_score.shape == (4,)
        for name, c in cands.items():
            s = burgers_score(a, c, nu, 1.0 / nx, 0.05)
            assert bool((true_score > s).all()), (nu, k, name, true_score, s)


def test_penalties_individually(trajectories):
    traj = trajectories[0.01]
    nx = traj.shape[-1]
    a, b = traj[:, 2], traj[:, 3]
    pen = burgers_rewards(a, b, 0.01, 1 / nx, 0.05)
    assert set(pen) == {"mass", "energy", "tv", "pde"} == set(BURGERS.penalties)
    assert set(BURGERS.penalties) <= set(PENALTY_DOCS) and "bounds" in PENALTY_DOCS
    # frames (B, X) and (B, X, 1) are the same frames
    pen3 = BURGERS.rewards(a[..., None], b[..., None], {"nu": 0.01}, 1 / nx, 0.05)
    assert all(torch.equal(pen[k], pen3[k]) for k in pen)
    assert float(pen["mass"].max()) < 1e-12 and float(pen["energy"].max()) == 0.0 and float(pen["tv"].max()) == 0.0
    assert float(pen["pde"].max()) < 0.25
    shifted = burgers_rewards(a, b + 0.05, 0.01, 1 / nx, 0.05)
    assert torch.allclose(shifted["mass"], 0.05 / a.abs().mean(-1))
    assert float(burgers_rewards(a, a, 0.01, 1 / nx, 0.05)["pde"].min()) == pytest.approx(1.0)
    hot = burgers_rewards(a, 1.2 * a, 0.01, 1 / nx, 0.05)
    assert torch.allclose(hot["energy"], torch.full((4,), 0.44, dtype=a.dtype))
    assert torch.allclose(hot["tv"], torch.full((4,), 0.2, dtype=a.dtype))
    # weights: partial override, zero switches off, unknown key refused; broadcast of one u_prev
    only_mass = burgers_score(a, b + 0.05, 0.01, 1 / nx, 0.05, weights={"energy": 0, "tv": 0, "pde": 0})
    assert torch.allclose(only_mass, -shifted["mass"])
    with pytest.raises(UserError):
        burgers_score(a, b, 0.01, 1 / nx, 0.05, weights={"momentum": 1.0})
    # a known penalty this equation lacks (bounds: Burgers has no invariant interval) is unused
    assert torch.equal(burgers_score(a, b + 0.05, 0.01, 1 / nx, 0.05, weights={"bounds": 5.0}),
                       burgers_score(a, b + 0.05, 0.01, 1 / nx, 0.05))
    # spacings that cannot come from a file are refused (the domain is no longer an argument)
    for dx, dt in ((0.0, 0.05), (1 / nx, 0.0), (-1 / nx, 0.05), (1 / nx, -0.05)):
        with pytest.raises(UserError):
            burgers_rewards(a, b, 0.01, dx, dt)
    many = burgers_score(a[:1], torch.stack([b[0], b[0] + 0.05]), 0.01, 1 / nx, 0.05)
    assert many.shape == (2,) and many[0] > many[1]
    assert float(burgers_score(a, b.float().clone().fill_(math.nan), 0.01, 1 / nx, 0.05).max()) == -math.inf
