"""`python -m ups_lightning.bench.ttc_headroom run_dir=DIR [split=val]`: why TTC gains or not.

TTC can beat the plain rollout only if (1) its candidates contain better next states than the
operator step and (2) its physics score finds them. This measures both on a trained run, under the
evaluation's guard, on the validation split by default:

- **plain**: the guarded operator rollout;
- **TTC score**: at each step the candidate with the best score of the equation's rewards (TTC's
  score, the spec's ``score`` with default weights; greedy, beam 1);
- **oracle**: the candidate nearest the true next frame (reads the future: the headroom, no method);
- per penalty of the equation (e.g. mass, energy, tv, pde): along the plain rollout, the mean change of the one-step nRMSE
  when that penalty alone picks the candidate, against keeping the operator step (< 0: it helps).

Prints a table and writes ``ttc_headroom.json`` in the Hydra run directory. Settings:
``conf/ttc_headroom.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor

from ups_lightning.atomic import atomic_write_json
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.inference.rollout import Guard, Physics, Surrogate
from ups_lightning.lit.common import sample_nrmse


@torch.no_grad()
def headroom(sur: Surrogate, u0: Tensor, truth: Tensor, corrector: str, n_candidates: int, scale: float,
             physics: Physics, generator: torch.Generator) -> Dict[str, Any]:
    """The three rollouts and the per-penalty picks of the module doc, for one candidate scale."""
    spec, rate = physics.spec, dict(params=physics.params, dx=physics.dx, dt=physics.dt)
    steps, rows = truth.shape[1], torch.arange(u0.shape[0])

    def candidates(z: Tensor) -> tuple:
        z_pred = sur.step(z)
        rep = z_pred.repeat_interleave(n_candidates, dim=0)
        cand = rep + scale * (sur.correct(rep, corrector, generator) - rep)
        cand = cand.reshape(u0.shape[0], n_candidates, *z_pred.shape[1:])
        cand[:, 0] = z_pred
        frames = torch.stack([sur.decode(cand[:, j]) for j in range(n_candidates)], dim=1)
        return cand, frames

    def errors(frames: Tensor, k: int) -> Tensor:
        """(B, K) nRMSE of each candidate's frame as the guard reports it (projected onto the
        invariants) against the truth. (The physics score sees the candidates as decoded, as
        ``ttc_rollout`` scores them.)"""
        shown = [spec.project(frames[:, j], u0) if sur.guard.invariants else frames[:, j]
                 for j in range(n_candidates)]
        return torch.stack([sample_nrmse(shown[j], truth[:, k]) for j in range(n_candidates)], 1)

    def run(pick: Callable[[Tensor, Tensor, int], Tensor]) -> Dict[str, Any]:
        z, u_prev, errs, kept = sur.encode(u0), u0, [], []
        for k in range(steps):
            cand, frames = candidates(z)
            idx = pick(u_prev, frames, k)
            kept.append((idx == 0).double().mean())
            z, u_prev = sur.settle(cand[rows, idx], u0)
            errs.append(sample_nrmse(u_prev, truth[:, k]))
        e = torch.stack(errs, dim=1).mean(0)
        return {"nrmse": float(e.mean()), "nrmse_1": float(e[0]), "nrmse_31": float(e[-1]),
                "operator_step_kept": float(torch.stack(kept).mean())}

    def by_score(u_prev: Tensor, frames: Tensor, k: int) -> Tensor:
        s = torch.stack([spec.score(u_prev, frames[:, j], **rate) for j in range(n_candidates)], 1)
        return s.argmax(1)

    def by_truth(u_prev: Tensor, frames: Tensor, k: int) -> Tensor:
        return errors(frames, k).argmin(1)

    out = {"plain": run(lambda u, f, k: torch.zeros(len(u), dtype=torch.long)),
           "ttc_score": run(by_score), "oracle": run(by_truth)}

    # each penalty alone, along the plain rollout: does its pick beat the operator step?
    change = {p: [] for p in spec.penalties}
    z = sur.encode(u0)
    u_prev = u0
    for k in range(steps):
        cand, frames = candidates(z)
        err = errors(frames, k)
        pens = [spec.rewards(u_prev, frames[:, j], **rate) for j in range(n_candidates)]
        for p in spec.penalties:
            idx = torch.stack([pen[p] for pen in pens], 1).argmin(1)
            change[p].append(float((err[rows, idx] - err[:, 0]).mean()))
        z, u_prev = sur.settle(cand[:, 0], u0)
    out["penalty_pick_change"] = {p: sum(v) / len(v) for p, v in change.items()}
    return out


def run_headroom(cfg: DictConfig) -> Dict[str, Any]:
    from ups_lightning.evaluation import (build_surrogate, check_fits_model, eval_data, eval_member, file_physics,
                                       load_run, rollout_frames)

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if int(cfg.n_candidates) < 2:
        raise UserError(f"n_candidates={cfg.n_candidates}: the search needs the operator step and at least "
                        "one corrector candidate (n_candidates >= 2).")
    train_cfg, _, module = load_run(Path(cfg.run_dir))
    member = eval_member(train_cfg, None)
    view = eval_data(member, None, cfg.split)
    check_fits_model(view, train_cfg, module)
    physics = file_physics(view, member)
    sur = build_surrogate(train_cfg, module, view, physics, Guard(reencode=True, invariants=True))
    if cfg.corrector not in sur.correctors:
        raise UserError(f"corrector={cfg.corrector}: {cfg.run_dir} has {list(sur.correctors) or 'no'} "
                        "corrector stage(s); train them with stage=all.")
    u0, truth = rollout_frames(view.fields, int(train_cfg.data.initial_step))
    result: Dict[str, Any] = {"run_dir": str(cfg.run_dir), "split": cfg.split, "corrector": cfg.corrector,
                              "n_candidates": int(cfg.n_candidates), "n": len(u0), "scales": {}}
    gen = torch.Generator().manual_seed(int(cfg.seed))
    print(f"TTC headroom: {cfg.run_dir}, {cfg.split} split ({len(u0)} trajectories), {cfg.corrector} corrector, "
          f"{cfg.n_candidates} candidates per step (candidate 0: the operator step), guarded rollouts")
    print(f"{'scale':>6} {'rollout':>10} {'nRMSE':>8} {'@1':>8} {'@31':>8} {'operator kept':>14}")
    for scale in cfg.scales:
        r = headroom(sur, u0, truth, cfg.corrector, int(cfg.n_candidates), float(scale), physics, gen)
        result["scales"][str(scale)] = r
        for name in ("plain", "ttc_score", "oracle"):
            m = r[name]
            print(f"{float(scale):>6g} {name:>10} {m['nrmse']:>8.4f} {m['nrmse_1']:>8.4f} {m['nrmse_31']:>8.4f} "
                  f"{m['operator_step_kept']:>14.2f}")
        print("       one-step nRMSE change when one penalty picks (vs the operator step): " + ", ".join(
            f"{p} {v:+.4f}" for p, v in r["penalty_pick_change"].items()))
    if HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir) / "ttc_headroom.json"
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return result


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="ttc_headroom", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_headroom(cfg)


if __name__ == "__main__":
    main()
