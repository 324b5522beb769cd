"""`python -m ups_lightning.bench.ttc_headroom run_dir=DIR [members=[...]] [split=val]`: can TTC gain?

TTC beats the plain rollout only if (1) its candidates hold better next states than the operator step
and (2) its reward finds them. For one candidate set (``conf/ttc_headroom.yaml``: members, latent
perturbations or corrector draws, ``n_candidates`` per step, candidate 0 the operator step) this
measures, on the validation split by default:

- **plain**: the guarded operator rollout; **oracle**: at each step the candidate nearest the true next
  frame (reads the future: the headroom, no method). Greedy rollouts, with nRMSE and ms/traj.
- per reward (``rewards``: physics, consistency:CELLS, verifier): along the plain rollout, the rank
  correlation (Spearman, per sample over its candidates) between the reward and minus the true
  one-step error; the one-step error change when the reward picks, against keeping the operator step;
  the share of the oracle's one-step gain that recovers; and its greedy TTC rollout (the evaluation's
  own ``ttc_rollout``), timed as a whole;
- beside every reward that runs a solver, that solver on its own from the same given frame.

The verifier is trained here on the train split (``verifier_trajectories`` trajectories, the true errors
of the same candidate set along the plain rollout) and saved as ``verifier.pt`` for ``ttc.reward``.
Prints a table and writes ``ttc_headroom.json`` in the Hydra run directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import Tensor

from ups_lightning.atomic import atomic_write_json
from ups_lightning.provenance import reset_scored, scored, write_provenance
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.inference.candidates import Proposer
from ups_lightning.inference.rewards import Reward, make_reward, parse_reward, save_verifier, train_verifier
from ups_lightning.inference.rollout import Guard, ttc_rollout
from ups_lightning.inference.ttc import TTCConfig
from ups_lightning.eval.metrics import sample_nrmse
from ups_lightning.schema import setting, validate

__all__ = ["run_headroom", "candidate_errors", "rank_correlation", "Oracle"]


class Oracle(Reward):
    """Picks by the true next frame (the headroom, never a method): greedy rollouts only."""

    name = "oracle"

    def __init__(self, truth: Tensor) -> None:
        self.truth, self.k = truth, 0

    def score(self, prev: Tensor, cand: Tensor) -> Tensor:
        t = self.truth[:, self.k]
        self.k += 1
        return -torch.stack([sample_nrmse(cand[:, j], t) for j in range(cand.shape[1])], 1)


def rank_correlation(score: Tensor, err: Tensor) -> float:
    """Mean over rows of Spearman(score, -err) across each row's candidates (ties by order)."""
    def ranks(v: Tensor) -> Tensor:
        return v.argsort(1).argsort(1).double()
    a, b = ranks(score.double()), ranks(-err.double())
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    ok = den > 0
    return float(((a * b).sum(1)[ok] / den[ok]).mean()) if ok.any() else float("nan")


@torch.no_grad()
def candidate_errors(proposer: Proposer, u0: Tensor, truth: Tensor, k: int) -> tuple:
    """Along the plain rollout: (prev frames (T, B, X, C), candidates (T, B, k, X, C), their true
    one-step nRMSE (T, B, k))."""
    C = u0.shape[-1]
    state, prevs, cands, errs = torch.cat([u0, u0], -1), [], [], []
    for step in range(truth.shape[1]):
        cand = proposer(state, k)
        frames = cand[..., :C]
        prevs.append(state[..., :C])
        cands.append(frames)
        errs.append(torch.stack([sample_nrmse(frames[:, j], truth[:, step]) for j in range(k)], 1))
        state = cand[:, 0]
    return torch.stack(prevs), torch.stack(cands), torch.stack(errs)


def _rollout_row(proposer: Proposer, u0: Tensor, truth: Tensor, k: int, reward: Reward) -> Dict[str, Any]:
    start = time.perf_counter()
    pred, info = ttc_rollout(proposer, u0, truth.shape[1], TTCConfig(n_candidates=k, beam_width=1), reward)
    wall = time.perf_counter() - start
    e = torch.stack([sample_nrmse(pred[:, s], truth[:, s]) for s in range(truth.shape[1])], 1).mean(0)
    return {"nrmse": float(e.mean()), "nrmse_1": float(e[0]), "nrmse_31": float(e[-1]),
            "operator_step_kept": info["operator_step_kept"], "ms_per_traj": 1000.0 * wall / len(u0)}


@dataclass
class HeadroomSettings:
    """conf/ttc_headroom.yaml: its keys, types and ranges (ups_lightning.schema)."""

    run_dir: str = MISSING
    members: List[str] = MISSING
    split: str = setting(choices=("train", "val", "test"))
    n_candidates: int = setting(2)          # the operator step and at least one more
    perturb: float = setting(0.0)
    corrector: Optional[str] = setting(choices=("student", "teacher"))
    corrector_scale: float = setting(0.0)
    mean: bool = MISSING
    snapshots: int = setting(0)
    rewards: List[str] = MISSING
    weights: Dict[str, float] = MISSING
    verifier_trajectories: int = setting(1)
    verifier_steps: int = setting(1)
    seed: int = setting(0)
    num_threads: Optional[int] = setting(1)


def run_headroom(cfg: DictConfig) -> Dict[str, Any]:
    from ups_lightning.pdes.coarse import solve_on_grid
    from ups_lightning.evaluation import (build_proposer, build_surrogate, check_fits_model, eval_data, eval_member,
                                          file_physics, load_run, rollout_frames)

    from ups_lightning.runtime import configure_cpu

    cfg = validate(cfg, HeadroomSettings, "ttc_headroom", "conf/ttc_headroom.yaml")
    reset_scored()
    configure_cpu(cfg.num_threads, "num_threads")
    k = int(cfg.n_candidates)
    rewards = [parse_reward(r) for r in cfg.rewards]
    train_cfg, _, module = load_run(Path(cfg.run_dir))
    member = eval_member(train_cfg, None)
    views = {s: eval_data(member, None, s) for s in (cfg.split, "train")}
    for v in views.values():
        check_fits_model(v, train_cfg, module)
    view = views[cfg.split]
    physics = file_physics(view, member)
    guard = Guard(reencode=True, invariants=True)
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def proposer_for(v) -> Proposer:
        p, *_ = build_proposer(cfg, build_surrogate(train_cfg, module, v, physics, guard), physics, v, gen,
                               run_dir=Path(cfg.run_dir))
        p.check(k)
        return p

    n_given = int(train_cfg.data.initial_step)
    u0, truth = rollout_frames(view.fields, n_given)
    proposer = proposer_for(view)
    result: Dict[str, Any] = {"run_dir": str(cfg.run_dir), "members": list(cfg.members), "split": cfg.split,
                              "n": len(u0), "n_candidates": k, "perturb": float(cfg.perturb),
                              "corrector": cfg.corrector, "corrector_scale": float(cfg.corrector_scale),
                              "threads": torch.get_num_threads(), "rewards": {}}
    print(f"TTC headroom: {cfg.run_dir} + {len(cfg.members)} member(s), {cfg.split} split ({len(u0)} "
          f"trajectories), {k} candidates per step (perturb {cfg.perturb}, corrector {cfg.corrector}), "
          f"{torch.get_num_threads()} threads")

    verifier = None
    if any(name == "verifier" for name, _ in rewards):
        tv = views["train"]
        n_v = min(int(cfg.verifier_trajectories), len(tv.fields))
        tu0, ttruth = rollout_frames(tv.fields[:n_v], n_given)
        start = time.perf_counter()
        p, c, e = candidate_errors(proposer_for(tv), tu0, ttruth, k)
        verifier = train_verifier(p.unsqueeze(2).expand_as(c).reshape(-1, *c.shape[-2:]),
                                  c.reshape(-1, *c.shape[-2:]), e.reshape(-1), steps=int(cfg.verifier_steps),
                                  seed=int(cfg.seed))
        result["verifier_train_s"] = time.perf_counter() - start
        print(f"verifier: trained on {e.numel()} candidates of {n_v} train trajectories in "
              f"{result['verifier_train_s']:.0f} s")

    prev, cand, err = candidate_errors(proposer, u0, truth, k)
    oracle_gain = float((err.min(-1).values - err[..., 0]).mean())
    result["plain"] = _rollout_row(proposer, u0, truth, 1, Oracle(truth))   # one candidate: the plain rollout
    result["oracle"] = _rollout_row(proposer, u0, truth, k, Oracle(truth))
    result["oracle"]["one_step_change"] = oracle_gain
    print(f"{'reward':>16} {'spearman':>9} {'1-step chg':>11} {'share':>7} {'nRMSE':>8} {'@1':>8} {'@31':>8} "
          f"{'kept':>6} {'ms/traj':>9}")
    for name in ("plain", "oracle"):
        r = result[name]
        print(f"{name:>16} {'':>9} {r.get('one_step_change', 0.0):>+11.4f} {'':>7} {r['nrmse']:>8.4f} "
              f"{r['nrmse_1']:>8.4f} {r['nrmse_31']:>8.4f} {r['operator_step_kept']:>6.2f} {r['ms_per_traj']:>9.2f}")
    t_rel = np.asarray(view.meta.t[n_given - 1:], dtype=np.float64) - float(view.meta.t[n_given - 1])
    rows_b = torch.arange(err.shape[1])
    for (name, cells), label in zip(rewards, cfg.rewards):
        reward = make_reward(name, physics, cells=cells, verifier=verifier,
                             weights=OmegaConf.to_container(cfg.weights))
        s = torch.stack([reward(prev[t], cand[t]) for t in range(len(prev))])      # (T, B, k)
        pick = s.argmax(-1)
        change = float(torch.stack([err[t, rows_b, pick[t]] - err[t, :, 0] for t in range(len(err))]).mean())
        row = {"spearman": rank_correlation(s.flatten(0, 1), err.flatten(0, 1)), "one_step_change": change,
               "share_of_oracle": change / oracle_gain if oracle_gain < 0 else float("nan"),
               **_rollout_row(proposer, u0, truth, k, reward)}
        if reward.solver_cells:
            sol, wall = solve_on_grid(u0.double().numpy(), reward.solver_cells, physics.pde, physics.params, t_rel,
                                      physics.domain_length)
            e = torch.stack([sample_nrmse(torch.from_numpy(sol[:, t]).float(), truth[:, t])
                             for t in range(truth.shape[1])], 1)
            row["solver_alone"] = {"cells": reward.solver_cells, "nrmse": float(e.mean()),
                                   "ms_per_traj": 1000.0 * wall / len(u0)}
        result["rewards"][str(label)] = row
        print(f"{str(label):>16} {row['spearman']:>9.3f} {change:>+11.4f} {row['share_of_oracle']:>7.2f} "
              f"{row['nrmse']:>8.4f} {row['nrmse_1']:>8.4f} {row['nrmse_31']:>8.4f} "
              f"{row['operator_step_kept']:>6.2f} {row['ms_per_traj']:>9.2f}")
        if "solver_alone" in row:
            sa = row["solver_alone"]
            print(f"{'':>16} the solver alone on {sa['cells']} cells: nRMSE {sa['nrmse']:.4f}, "
                  f"{sa['ms_per_traj']:.2f} ms/traj")
    # plain, oracle, each reward's rollout and each solver alone: the rows scored on cfg.split
    scored(cfg.split, 2 + len(result["rewards"]) + sum("solver_alone" in r for r in result["rewards"].values()))
    if HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir)
        atomic_write_json(out / "ttc_headroom.json", result)
        if verifier is not None:
            save_verifier(verifier, out / "verifier.pt")
        write_provenance(out, "ttc_headroom", cfg, seeds=[int(cfg.seed)])
        print(f"wrote {out / 'ttc_headroom.json'}")
    return result


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="ttc_headroom", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_headroom(cfg)


if __name__ == "__main__":
    main()
