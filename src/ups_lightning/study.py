"""`python -m ups_lightning.study [budget_min=2.5] [sizes=[dim8,...]] [seeds=[0,1,2]]` (`make study`):
how far can test-time search stand in for model capacity?

A capacity sweep (``sizes``, each trained ``len(seeds)`` times with the same per-model budget:
autoencoder + operator, the plain rollout's stages, ``protocol``'s data and settings), each size
evaluated plain and with TTC at each search budget of ``budgets`` (candidates per step). TTC's candidates
are the operator steps of ``b`` of the size's seeds (an operator ensemble, candidate 0 the first seed's
step; inference/candidates.py), chosen per sample per step by a reward (inference/rewards.py).

Fairness (README "Test-time search"):
- for each size and budget the reward is chosen on the validation split (lowest val nRMSE of
  ``rewards``); the test split is scored once, with that reward;
- plain figures are the mean +- std over the seeds; a TTC model counts the parameters of all its members;
- cost is wall-clock per trajectory of the whole rollout or search, batched (``eval_batch_size``);
- a reward that runs a solver has that solver on its own (same grid, from the same given frame)
  reported beside it in the table and on the cost plot.

Trained models of the same settings are reused (finished stages are skipped), so a second run only
re-evaluates. Writes ``study.csv``, ``study.json``, ``study.md`` and ``study.png`` (nRMSE against parameters and against ms per
trajectory: one curve plain, one per TTC budget) into ``out_dir``.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ups_lightning.atomic import atomic_write_json, atomic_write_text
from ups_lightning.config import compose_config
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.tables import format_cell, write_csv

log = logging.getLogger("ups_lightning.study")


def check_config(cfg: DictConfig) -> None:
    def fail(key: str, want: str) -> None:
        raise UserError(f"study setting {key}={OmegaConf.select(cfg, key)!r}: expected {want} (conf/study.yaml).")

    if not isinstance(cfg.budget_min, (int, float)) or isinstance(cfg.budget_min, bool) or not cfg.budget_min > 0:
        fail("budget_min", "minutes > 0 per trained model (autoencoder + operator)")
    if not cfg.sizes or not all(isinstance(s, str) for s in cfg.sizes):
        fail("sizes", "a list of conf/model options, e.g. [dim8, dim16, dim32, dim64]")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or not all(isinstance(s, int) for s in cfg.seeds):
        fail("seeds", "a list of distinct integer training seeds, e.g. [0, 1, 2]")
    if not cfg.budgets or not all(isinstance(b, int) and 2 <= b <= len(cfg.seeds) for b in cfg.budgets):
        fail("budgets", f"search budgets (candidates per step), integers in [2, {len(cfg.seeds)}] (one operator "
                        "step per seed)")
    if not cfg.rewards:
        fail("rewards", "a list of rewards, e.g. [physics, 'consistency:32']")
    from ups_lightning.inference.rewards import REWARDS, parse_reward

    for r in cfg.rewards:
        name, _ = parse_reward(r)
        if name not in REWARDS or name == "verifier":
            fail("rewards", "physics or consistency:CELLS entries (the verifier is measured by bench.ttc_headroom)")


def _train(cfg: DictConfig, size: str, seed: int, out: Path) -> tuple:
    """(run directory, whether every stage beat its trivial reference) of one size and seed."""
    from ups_lightning.training import run as train

    run_dir = out / "runs" / f"{size}-seed{seed}"
    budget = float(cfg.budget_min)
    tcfg = compose_config("train", [f"experiment={cfg.protocol}", f"model={size}", f"seed={seed}",
                                    "stage=autoencoder_operator", f"run_dir={run_dir}", "callbacks.progress_bar=none",
                                    *[f"stages.{k}.max_minutes={budget * v:.6g}" for k, v in cfg.shares.items()],
                                    *cfg.train_overrides])
    records = train(tcfg)
    return run_dir, all(r.get("learned") is not False for r in records.values())


class _Size:
    """One size's trained seeds as surrogates on the val and test splits (each run loaded once, each
    split read once: the seeds share the protocol's data)."""

    def __init__(self, run_dirs: List[Path], n_test: Any) -> None:
        from ups_lightning.evaluation import (build_surrogate, check_fits_model, eval_data, eval_member,
                                              file_physics, load_run, rollout_frames)
        from ups_lightning.inference.rollout import Guard

        runs = [load_run(rd) for rd in run_dirs]
        train_cfg, _, module = runs[0]
        self.params = sum(p.numel() for part in ("autoencoder", "operator") for p in getattr(module, part).parameters())
        member = eval_member(train_cfg, None)
        n_given = int(train_cfg.data.initial_step)
        guard = Guard(reencode=True, invariants=True)
        self.splits: Dict[str, Any] = {}
        for split in ("val", "test"):
            view = eval_data(member, None, split)
            physics = file_physics(view, member)
            surs = []
            for cfg_k, _, module_k in runs:
                check_fits_model(view, cfg_k, module_k)
                surs.append(build_surrogate(cfg_k, module_k, view, physics, guard))
            fields = view.fields if n_test is None or split == "val" else view.fields[: int(n_test)]
            u0, truth = rollout_frames(fields, n_given)
            t = np.asarray(view.meta.t, dtype=np.float64)
            self.splits[split] = dict(surs=surs, u0=u0, truth=truth, physics=physics, t_rel=t[n_given - 1:] - t[n_given - 1])


def _score(pred: torch.Tensor, s: Dict[str, Any]) -> float:
    from ups_lightning.eval.metrics import all_metrics

    p = s["physics"]
    return float(all_metrics(pred, s["truth"], dx=p.dx, domain_length=p.domain_length, u0=s["u0"])["nrmse"])


def _batched(fn, u0: torch.Tensor, batch: int) -> tuple:
    start = time.perf_counter()
    out = torch.cat([fn(u0[i : i + batch]) for i in range(0, len(u0), batch)])
    return out, 1000.0 * (time.perf_counter() - start) / len(u0)


def _plain(s: Dict[str, Any], k: int, batch: int) -> tuple:
    from ups_lightning.inference.rollout import rollout

    pred, ms = _batched(lambda u: rollout(s["surs"][k], u, s["truth"].shape[1]), s["u0"], batch)
    return _score(pred, s), ms


def _ttc(s: Dict[str, Any], b: int, reward_spec: str, batch: int) -> tuple:
    from ups_lightning.inference.candidates import Proposer
    from ups_lightning.inference.rewards import make_reward, parse_reward
    from ups_lightning.inference.rollout import ttc_rollout
    from ups_lightning.inference.ttc import TTCConfig

    name, cells = parse_reward(reward_spec)
    reward = make_reward(name, s["physics"], cells=cells)
    proposer = Proposer(s["surs"][:b])
    pred, ms = _batched(lambda u: ttc_rollout(proposer, u, s["truth"].shape[1], TTCConfig(n_candidates=b, beam_width=1),
                                              reward)[0], s["u0"], batch)
    return _score(pred, s), ms, reward.solver_cells


def _solver_alone(s: Dict[str, Any], cells: int) -> tuple:
    from ups_lightning.bench.solver_sweep import solve_on_grid

    p = s["physics"]
    sol, wall = solve_on_grid(s["u0"].double().numpy(), cells, p.pde, p.params, s["t_rel"], p.domain_length)
    return _score(torch.from_numpy(sol).float(), s), 1000.0 * wall / len(s["u0"])


def run_study(cfg: DictConfig) -> Dict[str, Any]:
    check_config(cfg)
    from ups_lightning.runtime import configure_cpu

    threads = configure_cpu(cfg.threads, "threads")   # the idle cores now, as training picks them
    out = Path(cfg.out_dir)
    start = time.time()
    rows: List[Dict[str, Any]] = []
    solver_rows: Dict[int, Dict[str, Any]] = {}
    batch = int(cfg.eval_batch_size)
    for size in cfg.sizes:
        runs, learned = [], 0
        for seed in cfg.seeds:
            log.info("study: training %s seed %d (%g min), %.0f s into the study", size, seed, cfg.budget_min,
                     time.time() - start)
            run_dir, ok = _train(cfg, size, int(seed), out)
            runs.append(run_dir)
            learned += ok
        torch.set_num_threads(threads)   # training may have changed it; every figure is timed alike
        sz = _Size(runs, cfg.n_test)
        plain = [_plain(sz.splits["test"], k, batch) for k in range(len(runs))]
        val_plain = [_plain(sz.splits["val"], k, batch)[0] for k in range(len(runs))]
        errs = [p[0] for p in plain]
        rows.append({"size": size, "method": "plain", "budget": 1, "params": sz.params,
                     "nrmse": float(np.mean(errs)), "nrmse_std": float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0,
                     "val_nrmse": float(np.mean(val_plain)), "ms_per_traj": float(np.mean([p[1] for p in plain])),
                     "reward": "", "seeds": len(errs), "learned": learned})
        rows_plain = rows[-1]
        log.info("study: %s plain test nRMSE %.4f +- %.4f", size, rows_plain["nrmse"], rows_plain["nrmse_std"])
        for b in cfg.budgets:
            val = {r: _ttc(sz.splits["val"], b, r, batch)[0] for r in cfg.rewards}   # choose on validation ...
            chosen = min(val, key=lambda r: val[r] if math.isfinite(val[r]) else math.inf)
            err, ms, cells = _ttc(sz.splits["test"], b, chosen, batch)               # ... score test once
            rows.append({"size": size, "method": f"ttc-{b}", "budget": b, "params": b * sz.params, "nrmse": err,
                         "gain": 1.0 - err / rows_plain["nrmse"], "cost_ratio": ms / rows_plain["ms_per_traj"],
                         "nrmse_std": math.nan, "val_nrmse": val[chosen], "ms_per_traj": ms, "reward": chosen,
                         "val_by_reward": {r: round(v, 4) for r, v in val.items()}, "seeds": b})
            log.info("study: %s TTC-%d (%s, chosen on val) test nRMSE %.4f, %.1f ms/traj", size, b, chosen, err, ms)
            if cells and cells not in solver_rows:
                e, ms_s = _solver_alone(sz.splits["test"], cells)
                solver_rows[cells] = {"size": f"solver {cells} cells", "method": "solver", "budget": 0, "params": 0,
                                      "nrmse": e, "nrmse_std": math.nan, "val_nrmse": math.nan, "ms_per_traj": ms_s,
                                      "reward": "", "seeds": 0}
    rows.extend(solver_rows[c] for c in sorted(solver_rows))
    summary = {"rows": rows, "seconds": time.time() - start}
    _write(out, cfg, summary)
    return summary


def _f4(v: Any) -> str:
    return format_cell(v, "{:.4f}")


COLUMNS = ("size", "method", "params", "nrmse", "nrmse_std", "val_nrmse", "ms_per_traj", "gain", "cost_ratio",
           "reward", "seeds", "learned")


def _write(out: Path, cfg: DictConfig, s: Dict[str, Any]) -> None:
    from ups_lightning.evaluation import git_commit

    out.mkdir(parents=True, exist_ok=True)
    rows = s["rows"]
    write_csv(out / "study.csv", [{k: r.get(k) for k in COLUMNS} for r in rows], COLUMNS)
    atomic_write_json(out / "study.json", {"settings": OmegaConf.to_container(cfg), **s})
    lines = [f"# Capacity x TTC study: {cfg.protocol}, {cfg.budget_min:g} min per model (autoencoder + operator), "
             f"seeds {list(cfg.seeds)}; git {git_commit()}; {time.strftime('%Y-%m-%d %H:%M')}; "
             f"{torch.get_num_threads()} torch threads; {s['seconds']:.0f} s in all", "",
             "Test split. plain: mean +- std over the seeds. ttc-b: the search over b seeds' operator steps, its "
             "reward chosen on the validation split (val nRMSE of every reward in the last column). solver: the "
             "reward's solver on its own, from the same given frame. seeds learned: seeds whose autoencoder and "
             "operator both beat their trivial references (the mean field; persistence).", "",
             "| size | method | params | nRMSE | below plain | val nRMSE | ms/traj | × plain cost | reward | val nRMSE by reward | seeds learned |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        pm = _f4(r["nrmse"]) + (f" ± {_f4(r['nrmse_std'])}" if math.isfinite(r["nrmse_std"]) else "")
        by = ", ".join(f"{k} {v}" for k, v in r.get("val_by_reward", {}).items())
        gain = f"{100 * r['gain']:.0f}%" if "gain" in r else ""
        ratio = f"{r['cost_ratio']:.2f}" if "cost_ratio" in r else ""
        lines.append(f"| {r['size']} | {r['method']} | {r['params']:,} | {pm} | {gain} | {_f4(r['val_nrmse'])} | "
                     f"{r['ms_per_traj']:.2f} | {ratio} | {r['reward']} | {by} | "
                     f"{str(r['learned']) + ' of ' + str(r['seeds']) if 'learned' in r else ''} |")
    lines += ["", _verdict(rows), "", "![nRMSE against parameters and inference cost](study.png)", ""]
    atomic_write_text(out / "study.md", "\n".join(lines))
    _plot(out / "study.png", rows)
    print("\n".join(lines))


def _verdict(rows: List[Dict[str, Any]]) -> str:
    """Does a smaller model with search beat a larger plain one at no more inference cost? Only
    plain sizes whose every seed learned are compared (an untrained large model proves nothing)."""
    plain = [r for r in rows if r["method"] == "plain"]
    learned = [p for p in plain if p.get("learned") == p["seeds"]]
    skipped = [p["size"] for p in plain if p not in learned]
    note = (f" Not compared: {', '.join(skipped)} plain, where some seeds did not beat their trivial reference "
            "in the budget (raise budget_min)." if skipped else "")
    found = []
    for t in (r for r in rows if r["method"].startswith("ttc")):
        for p in learned:
            if (p["params"] > t["params"] / t["budget"] and t["ms_per_traj"] <= p["ms_per_traj"]
                    and t["nrmse"] < p["nrmse"] - 2 * p["nrmse_std"]):
                found.append(f"{t['size']} {t['method']} ({_f4(t['nrmse'])}, {t['ms_per_traj']:.1f} ms) beats "
                             f"{p['size']} plain ({_f4(p['nrmse'])} ± {_f4(p['nrmse_std'])}, {p['ms_per_traj']:.1f} ms)")
    if not found:
        return ("**Verdict:** no smaller model with search beats a larger plain model that learned, at equal or "
                "lower inference cost, by more than two standard deviations of the plain seeds." + note)
    return "**Verdict:** search stands in for capacity here: " + "; ".join(found) + "." + note


def _plot(path: Path, rows: List[Dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows if r["method"] != "solver"}, key=lambda m: (m != "plain", m))
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        for ax, xk in zip(axes, ("params", "ms_per_traj")):
            ys = [r["nrmse"] for r in rs]
            err = [r["nrmse_std"] if math.isfinite(r["nrmse_std"]) else 0.0 for r in rs]
            ax.errorbar([r[xk] for r in rs], ys, yerr=err, marker="o", capsize=3,
                        label="plain" if m == "plain" else f"TTC, {m.split('-')[1]} candidates")
            for r in rs:
                ax.annotate(r["size"], (r[xk], r["nrmse"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in (r for r in rows if r["method"] == "solver"):
        axes[1].scatter([r["ms_per_traj"]], [r["nrmse"]], marker="x", color="k")
        axes[1].annotate(r["size"], (r["ms_per_traj"], r["nrmse"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for ax, xl in zip(axes, ("parameters (all members)", "inference ms per trajectory")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("test nRMSE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Can test-time search stand in for capacity?")
    fig.tight_layout()
    from ups_lightning.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="study", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_study(cfg)


if __name__ == "__main__":
    main()
