"""The rivals of every TTC row (inference/baselines.py), each on a case with a known answer, and the
rule that credits a search only with its gain beyond the best of them."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from ups_lightning.artifacts import load_stage
from ups_lightning.inference import baselines as bl
from ups_lightning.inference.candidates import Proposer
from ups_lightning.inference.rewards import coarsen, make_reward
from ups_lightning.inference.rollout import Guard, Physics, Surrogate, rollout


@pytest.fixture(scope="module")
def trained(smoke_run):
    """(surrogate of the smoke run, a second member with perturbed operator weights, physics, given
    frames u0, the next true frames) on the smoke file's test rows."""
    from ups_lightning.data.datamodule import open_run_data, unit_coords

    cfg, records = smoke_run
    module = load_stage(cfg.run_dir, "operator", records["operator"])
    data = open_run_data(cfg.data)
    physics = Physics("burgers1d", data.params["burgers1d"], data.meta.dx, data.meta.dt, data.meta.domain_length)
    cond = module.contract.conditioning("burgers1d", data.params["burgers1d"], data.meta.dt)
    guard = Guard(reencode=True, invariants=True)
    sur = Surrogate(module, unit_coords(data), cond, guard=guard, pde=physics.spec)
    other = copy.deepcopy(module)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.operator.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sur2 = Surrogate(other, unit_coords(data), cond, guard=guard, pde=physics.spec)
    fields = torch.from_numpy(data.read("test")[:4]).float()
    n_given = int(cfg.data.initial_step)
    return sur, sur2, physics, fields[:, n_given - 1], fields[:, n_given:]


def test_one_members_candidates_averaged_is_its_plain_rollout(trained):
    sur, _, _, u0, _ = trained
    torch.testing.assert_close(bl.candidates_mean_rollout(Proposer([sur]), u0, 3, k=1), rollout(sur, u0, 3))


def test_candidates_mean_is_the_mean_of_the_members_steps(trained):
    sur, sur2, _, u0, _ = trained
    one = bl.candidates_mean_rollout(Proposer([sur, sur2]), u0, 2, k=2)
    a, b = rollout(sur, u0, 1), rollout(sur2, u0, 1)
    assert not torch.allclose(a, b)   # the members differ, so the mean is a new frame
    torch.testing.assert_close(one[:, :1], (a + b) / 2)
    # the second step starts from the mean frame, not from either member's own state
    start = one[:, 0]
    torch.testing.assert_close(one[:, 1:2], (rollout(sur, start, 1) + rollout(sur2, start, 1)) / 2,
                               rtol=1e-4, atol=1e-5)


def test_members_mean_is_the_mean_of_their_rollouts(trained):
    sur, sur2, _, u0, _ = trained
    torch.testing.assert_close(bl.members_mean_rollout([sur, sur], u0, 3), rollout(sur, u0, 3))
    both = bl.members_mean_rollout([sur, sur2], u0, 3)
    torch.testing.assert_close(both, (rollout(sur, u0, 3) + rollout(sur2, u0, 3)) / 2)
    # the first member's rollout, when given, is used as it is
    first = rollout(sur, u0, 3)
    torch.testing.assert_close(bl.members_mean_rollout([sur, sur2], u0, 3, first=first), both)


def test_solver_hybrid_between_the_plain_rollout_and_the_coarse_solve(trained):
    sur, _, physics, u0, truth = trained
    reward = make_reward("consistency", physics, cells=8)
    plain = rollout(sur, u0, 3)
    torch.testing.assert_close(bl.solver_hybrid_rollout(sur, u0, 3, reward.solve, 8, 0.0), plain)
    # weight 1, no projection after it: each frame's cell averages are the solve from the previous frame
    unprojected = Surrogate(sur.m, sur.x, sur.cond, guard=Guard(reencode=True), pde=physics.spec)
    full = bl.solver_hybrid_rollout(unprojected, u0, 2, reward.solve, 8, 1.0)
    torch.testing.assert_close(coarsen(full[:, 0], 8), reward.solve(u0).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(coarsen(full[:, 1], 8), reward.solve(full[:, 0]).float(), rtol=1e-4, atol=1e-5)
    # ... and with an oracle for a solver, the frames' coarse averages are the truth's
    frames = iter(truth.unbind(1))
    oracle = bl.solver_hybrid_rollout(unprojected, u0, 3, lambda prev: coarsen(next(frames), 8), 8, 1.0)
    torch.testing.assert_close(coarsen(oracle, 8), coarsen(truth[:, :3], 8), rtol=1e-4, atol=1e-5)
    # half way: the cell averages move half of the way
    half = bl.solver_hybrid_rollout(unprojected, u0, 1, reward.solve, 8, 0.5)
    raw = sur.decode(sur.step(sur.encode(u0)))
    torch.testing.assert_close(coarsen(half[:, 0], 8), (coarsen(raw, 8) + reward.solve(u0).float()) / 2,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        bl.solver_hybrid_rollout(sur, u0, 1, reward.solve, 8, 1.5)


def test_choose_weight_takes_the_best_on_its_scores():
    scores = {0.25: 0.3, 0.5: 0.2, 0.75: 0.2, 1.0: math.nan}
    best, seen = bl.choose_weight(scores.__getitem__, list(scores))
    assert best == 0.5 and set(seen) == set(scores)     # ties go to the smaller weight; NaN never wins
    with pytest.raises(ValueError, match="diverged"):
        bl.choose_weight(lambda w: math.nan, [0.5, 1.0])


def test_a_search_that_only_matches_the_best_baseline_is_not_credited():
    rivals = {"candidates_mean": 0.20, "members_mean": 0.18, "solver_32": 0.25}
    best, gain = bl.credited_gain(0.18, rivals)
    assert best == "members_mean" and gain == pytest.approx(0.0) and not gain > 0
    best, gain = bl.credited_gain(0.19, rivals)
    assert best == "members_mean" and gain < 0
    best, gain = bl.credited_gain(0.15, {**rivals, "solver_hybrid": math.nan})
    assert best == "members_mean" and gain == pytest.approx(0.03)
    assert bl.credited_gain(0.1, {})[0] is None
