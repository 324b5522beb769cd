"""TTC rewards (inference/rewards.py) on cases whose answer is known, and that none reads the truth.

The exact next state must rank first; the frozen state (the previous frame again) and the exact state
with its mass shifted must rank below it, for every reward.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ups_lightning.errors import UserError
from ups_lightning.inference.rewards import ConsistencyReward, make_reward, train_verifier
from ups_lightning.inference.rollout import Physics
from ups_lightning.pdes import get_pde
from ups_lightning.eval.metrics import sample_nrmse

NX, DT = 64, 0.05
PHYSICS = Physics("burgers1d", {"nu": 0.01}, dx=1.0 / NX, dt=DT, domain_length=1.0)


def _frames(n: int, seed: int = 0) -> tuple:
    """(prev (n, X, 1), exact next (n, X, 1)) from the project's own solver on NX cells."""
    spec = PHYSICS.spec
    u0 = spec.initial_conditions(np.arange(seed, seed + n), NX)
    sol = spec.solve(u0, PHYSICS.params, [0.0, 0.3, 0.3 + DT])
    return torch.from_numpy(sol[:, 1]).float(), torch.from_numpy(sol[:, 2]).float()


def _candidates(prev: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(n, 3, X, 1): the exact next state, the frozen state, the exact state shifted by 0.3 of its std."""
    shift = 0.3 * exact.std(dim=(1, 2), keepdim=True)
    return torch.stack([exact, prev, exact + shift], dim=1)


@pytest.mark.parametrize("reward", ["physics", "consistency:64", "consistency:16", "consistency:8"])
def test_the_exact_next_state_ranks_first(reward):
    prev, exact = _frames(6)
    name, _, cells = reward.partition(":")
    r = make_reward(name, PHYSICS, cells=int(cells) if cells else None)
    s = r(prev, _candidates(prev, exact))
    assert s.shape == (6, 3) and s.dtype == torch.float64
    assert bool((s[:, 0] > s[:, 1]).all()), s      # above the frozen state
    assert bool((s[:, 0] > s[:, 2]).all()), s      # above the mass-shifted state
    if reward == "consistency:64":   # on the grid the data was made on, the exact state is the solver's
        assert torch.allclose(s[:, 0], torch.zeros(6, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(s[:, 1], -torch.ones(6, dtype=torch.float64), atol=1e-6)   # frozen: 1 by construction


def test_consistency_reward_runs_its_solver_once_per_parent_and_refuses_bad_grids(monkeypatch):
    prev, exact = _frames(3)
    r = ConsistencyReward(PHYSICS, 16)
    calls = []
    real = r.solve
    monkeypatch.setattr(r, "solve", lambda p: calls.append(p.shape) or real(p))
    r(prev, _candidates(prev, exact))
    assert calls == [(3, NX, 1)] and r.solver_cells == 16
    with pytest.raises(UserError, match=r"ttc.reward.cells=24: .*divide the 64-cell"):
        ConsistencyReward(PHYSICS, 24)(prev, _candidates(prev, exact))
    with pytest.raises(UserError, match="ttc.reward.cells=None"):
        make_reward("consistency", PHYSICS, cells=None)
    with pytest.raises(UserError, match="ttc.reward.name='truth'"):
        make_reward("truth", PHYSICS)
    # a candidate that diverged is never chosen
    bad = _candidates(prev, exact)
    bad[:, 2] = float("nan")
    assert bool(torch.isinf(r(prev, bad)[:, 2]).all())


def test_a_verifier_trained_on_known_errors_ranks_the_exact_state_first():
    spec = PHYSICS.spec
    prev, exact = _frames(48, seed=0)
    g = torch.Generator().manual_seed(0)
    # train examples: the exact next state, moved towards the frozen one, shifted, or noised by varying amounts
    cands, errs, prevs = [], [], []
    for a in (0.0, 0.1, 0.3, 0.6, 1.0):
        for kind in ("towards_prev", "shift", "noise"):
            if kind == "towards_prev":
                c = exact + a * (prev - exact)
            elif kind == "shift":
                c = exact + a * 0.5 * exact.std(dim=(1, 2), keepdim=True)
            else:
                c = exact + a * 0.2 * torch.randn(exact.shape, generator=g)
            cands.append(c)
            prevs.append(prev)
            errs.append(sample_nrmse(c, exact))
    net = train_verifier(torch.cat(prevs), torch.cat(cands), torch.cat(errs), steps=150, seed=0)
    r = make_reward("verifier", PHYSICS, verifier=net)
    p2, e2 = _frames(8, seed=100)     # held-out initial conditions
    s = r(p2, _candidates(p2, e2))
    assert bool((s[:, 0] > s[:, 1]).all()) and bool((s[:, 0] > s[:, 2]).all()), s
    with pytest.raises(UserError, match="needs a trained verifier"):
        make_reward("verifier", PHYSICS)
    assert spec.name == "burgers1d"


def test_a_saved_verifier_loads_as_weights_and_bad_files_are_one_error(tmp_path):
    from ups_lightning.inference.rewards import Verifier, load_verifier, save_verifier

    net = Verifier(1, 0.1, 0.5).eval()
    save_verifier(net, tmp_path / "verifier.pt")
    back = load_verifier(str(tmp_path / "verifier.pt"))
    prev, cand = torch.randn(2, NX, 1), torch.randn(2, NX, 1)
    torch.testing.assert_close(back(prev, cand), net(prev, cand))
    with pytest.raises(UserError, match=r"ttc.reward.verifier=.*missing.pt: no such file"):
        load_verifier(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"ttc.reward.verifier=.*junk.pt: not a verifier this version can load"):
        load_verifier(str(tmp_path / "junk.pt"))


def test_candidate_settings_that_cannot_work_are_one_error_naming_the_setting():
    from ups_lightning.inference.candidates import Proposer

    with pytest.raises(UserError, match="ttc.candidates.mean=true needs at least 2 members"):
        Proposer([object()], mean=True)
    with pytest.raises(UserError, match="ttc.candidates: perturb"):
        Proposer([object()], perturb=-1.0)
    two = Proposer([object(), object()], mean=True)
    with pytest.raises(UserError, match="ttc.n_candidates=2: .*n_candidates >= 3"):
        two.check(2)


def test_no_reward_reads_the_truth(smoke_run, tmp_path):
    """TTC's frames are the same whatever the frames it is scored against: the future of the scored
    file replaced by noise changes the score, never the search."""
    from ups_lightning.evaluation import evaluate
    from tests.conftest import eval_cfg

    cfg, _ = smoke_run
    src = Path(cfg.data.path)
    noisy = tmp_path / src.name
    shutil.copy(src, noisy)
    n_given = int(cfg.data.initial_step)
    with h5py.File(noisy, "r+") as f:
        key = "tensor" if "tensor" in f else next(iter(f))
        data = f[key][...]
        data[:, n_given:] = np.random.default_rng(0).normal(size=data[:, n_given:].shape).astype(data.dtype)
        f[key][...] = data
    rows = []
    for path in (src, noisy):
        rows.append(evaluate(eval_cfg(Path(cfg.run_dir), tmp_path, "ttc=default", "ttc.n_candidates=3", "corrector_rows=true",
                                      f"data.path={path}", "split=test", "n_show=3")))
    a, b = (np.load(Path(r["artifacts"]) / "samples.npz") for r in rows)
    np.testing.assert_array_equal(a["pred"], b["pred"])          # the search chose the same frames
    assert not np.array_equal(a["true"], b["true"]) and rows[0]["nrmse"] != rows[1]["nrmse"]
