"""`python -m ups_lightning.bench [budget_min=10] [data=NAME] [model=dim32] [seeds=[0,1,2]] ...`
(`make bench`, `make bench BUDGET=5`, `make bench-curves`).

The benchmark of docs/BENCHMARK.md section 4, on one split of one data file, every method scored on
the same test frames by the same code (``ups_lightning.eval.metrics.all_metrics``):

- **persistence** (u(t) = the last given frame) and the **reference solver** on 32..256 cells
  (``bench/solver_sweep.py``), and for every learned method the cheapest grid at least as accurate;
- **learned methods** (``methods``): ours (autoencoder + operator, ``shares`` of the budget),
  PDEBench's FNO1d and U-Net1d (``bench/peers.py``), each peer under its authors' recipe and ours
  (``recipes``). **One clock**: ``budget_min`` minutes of wall-clock per model for everything a
  method needs before it can predict (ours: both stages' preparation, the latent cache included,
  and fits; validation runs inside every method's clock). **Equal tuning**: the successive-halving
  search of ``bench/search.py`` on the validation split, the same number of trials per method and
  recipe, its last rung at the full budget, widened until the pick is interior. The chosen recipe
  and rate are trained with every seed in ``seeds``; the **guard** (the projection onto the
  equation's invariants; for ours also the re-encoding of each state) is chosen per method on
  validation, scored both ways; test is scored once per model, with the chosen setting.
- **Learning curves** (``curve_budgets``): test nRMSE against the budget for ours and the peer best
  on validation, beside the published PDEBench figures of the equation's spec (``PDE.published``).

Writes into ``out_dir``: ``summary.md`` (mean +- std over seeds per method, the winner per column in
words: a method wins a column only where its gap to the next exceeds two standard errors; the
search; persistence and solver rows; the published figures), ``summary.csv``, ``runs.csv`` (every
scored model), ``lr_search.csv`` (every trial), with curves ``curves.csv`` and ``curves.png``, and
``provenance.json`` (the command, commit, settings and how many times each split was scored).
A model that never beat its trivial reference (persistence, or the mean field for the autoencoder)
is flagged in the log, in its records and in the summary. Settings: ``conf/bench.yaml``; numbers
are printed, never asserted. Finished models of the same settings are reused, so a long benchmark
completes across sittings.

Here: the run (search, seeds, guard, test, curves). Beside it: settings.py (the checked settings),
context.py (the data, splits and scoring every method shares), models.py (one model of one method),
search.py, curves.py, report.py, peers.py / fno.py / unet.py, solver_sweep.py.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ups_lightning.bench import models as M     # through the module: tests stand in for its training
from ups_lightning.bench.context import Bench, compose_train_config
from ups_lightning.bench.models import Models, choose_guard
from ups_lightning.bench.settings import CONF, METHODS, METRIC_KEYS, STAGE_SHARES, check_config

__all__ = ["run_bench", "check_config", "compose_train_config", "choose_guard", "CONF", "STAGE_SHARES", "METHODS"]

log = logging.getLogger("ups_lightning.bench")


def run_methods(b: Bench) -> Dict[str, Dict[str, Any]]:
    """The search on validation (bench/search.py) for every method at once (so every method and
    recipe gets the same number of trials), then every seed at the chosen recipe and rate, the guard
    chosen per method on validation, and each model scored on test once, with the chosen setting.
    Returns per method {"trials": [...], "runs": [...], "chosen": {...}} (plain dicts)."""
    from ups_lightning.bench.search import Trial, search
    from ups_lightning.errors import UserError

    ck = b.checked
    first, budget = ck["seeds"][0], ck["budget_min"]
    train = Models(b)

    def trial(method: str, recipe: str, lr: float, fraction: float):
        rec = train(method, recipe, lr, first, budget * fraction)
        b.say(f"{method} ({recipe}): lr {lr:g} at {budget * fraction:g} min -> val nRMSE {rec['best_val_nrmse']:.4f}"
              f"{'' if rec['learned'] else '  (did not beat the trivial reference)'}")
        return rec["best_val_nrmse"], {"record": rec}

    searched = [m for m in ck["methods"] if m not in ck["given"]]
    found = search({m: (ck["lr_default"][m], ck["recipes"][m]) for m in searched}, ck["search"], trial, b.say) \
        if searched else {}
    results: Dict[str, Dict[str, Any]] = {}
    for method in ck["methods"]:
        if method in ck["given"]:        # an earlier run's choice on validation: no search here
            g = ck["given"][method]
            found[method] = {"trials": [], "interior": {}, "first_rung_trials": {},
                             "chosen": Trial(method, g["recipe"], g["lr"], 0, 0, 1.0, 0.0)}
            b.say(f"{method}: search skipped: given {g['recipe']} lr {g['lr']:g}")
        got = found[method]
        chosen = got["chosen"]
        if not math.isfinite(chosen.val):
            raise UserError(f"bench: every learning rate and recipe of {method} failed "
                            f"({got['trials'][0].extra['record'].get('failed')}).")
        recs = [train(method, chosen.recipe, chosen.lr, seed, budget) for seed in ck["seeds"]]
        val = [M._val_both_ways(b, r) for r in recs]
        given_guard = ck["given"].get(method, {}).get("guard")
        guard = choose_guard(val) if given_guard is None else given_guard
        b.say(f"{method}: {chosen.recipe} lr {chosen.lr:g}; guard {'on' if guard else 'off'} on validation "
              f"(mean val nRMSE off {_mean([v[False] for v in val]):.4f}, on {_mean([v[True] for v in val]):.4f})")
        runs = []
        for rec, v in zip(recs, val):
            row = {k: x for k, x in rec.items() if k != "handle"}
            row.update(guard=guard, val_nrmse=v[guard], val_nrmse_guard_off=v[False], val_nrmse_guard_on=v[True])
            if rec["handle"] is None:     # a failed seed: counted as failed, never scored
                runs.append({**row, "nrmse": math.nan})
                continue
            m = M._score(b, method, rec["handle"], guard)
            runs.append({**row, **m})
            b.say(f"{method}: seed {rec['seed']} guard {'on' if guard else 'off'} -> test nRMSE {m['nrmse']:.4f}")
        trials = []
        for t in got["trials"]:
            rec = t.extra["record"]
            trials.append({**{k: x for k, x in rec.items() if k not in ("handle",)}, "rung": t.rung,
                           "fraction": t.fraction, "chosen": t is chosen})
        results[method] = {"trials": trials, "runs": runs,
                           "chosen": {"recipe": chosen.recipe, "lr": chosen.lr, "guard": guard,
                                      "given": method in ck["given"],
                                      "interior": got["interior"], "first_rung_trials": got["first_rung_trials"],
                                      "val_nrmse": _mean([r["val_nrmse"] for r in runs])}}
    b.trainer = train
    return results


def _mean(values: Sequence[float]) -> float:
    from ups_lightning.bench.report import mean_std

    return mean_std(values)[0]


def run_curves(b: Bench, results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Test nRMSE against the training budget (``curve_budgets``) for ours and the peer best on
    validation at ``budget_min``, each at its chosen recipe, rate and guard (chosen at budget_min),
    with ``curve_seeds`` (the budget_min point has every seed of the main table). Finished models are
    reused, so the curves complete across sittings."""
    ck = b.checked
    peers = [m for m in results if m != "ours"]
    best_peer = min(peers, key=lambda m: results[m]["chosen"]["val_nrmse"]) if peers else None
    rows = []
    for method in [m for m in ("ours", best_peer) if m in results]:
        c = results[method]["chosen"]
        for budget in ck["curve_budgets"]:
            if abs(budget - ck["budget_min"]) < 1e-9:
                runs = results[method]["runs"]
            else:
                runs = []
                for seed in ck["curve_seeds"]:
                    rec = b.trainer(method, c["recipe"], c["lr"], seed, budget)
                    m = M._score(b, method, rec["handle"], c["guard"]) if rec["handle"] is not None else {"nrmse": math.nan}
                    runs.append({**{k: x for k, x in rec.items() if k != "handle"}, **m})
            for r in runs:
                rows.append({"method": method, "label": r["label"], "recipe": c["recipe"], "lr": c["lr"],
                             "guard": c["guard"], "budget_min": budget, "seed": r["seed"], "nrmse": r.get("nrmse"),
                             "nrmse_pdebench": r.get("nrmse_pdebench"),
                             "train_s": r.get("train_s"), "learned": r.get("learned")})
                b.say(f"curve: {method} at {budget:g} min seed {r['seed']} -> test nRMSE {r.get('nrmse', math.nan):.4f}")
    return rows


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def _ensure_data(cfg: Any, checked: Dict[str, Any]) -> None:
    """`make bench` from nothing: the data config's own file is generated when missing (a file the
    user named with data.path= is never made up: training's rule, given the command's overrides)."""
    from ups_lightning.training import command_overrides, ensure_data

    ensure_data(compose_train_config(cfg, checked, Path(cfg.out_dir) / "runs" / "_", seed=0), command_overrides())


def run_bench(cfg: Any, say=print) -> Dict[str, Any]:
    import torch

    from ups_lightning.bench.report import add_equal_accuracy, write_bench_summary
    from ups_lightning.bench.solver_sweep import sweep
    from ups_lightning.errors import UserError
    from ups_lightning.provenance import git_commit, reset_scored, scored, write_provenance
    from ups_lightning.runtime import configure_cpu

    checked = check_config(cfg)
    reset_scored()      # this run's scorings only (provenance.json): none with curves_only
    if checked["curves_only"]:
        return _curves_only(cfg, checked, say)
    threads = configure_cpu(checked["threads"], "threads")
    checked["threads"] = threads            # every method and evaluation runs with the same count
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    _ensure_data(cfg, checked)
    b = Bench(cfg, checked, say)
    meta, view = b.meta, b.view
    test = b.split["test"]
    cells = min(meta.spatial_shape)          # per axis (the 2D grids are square)
    grid = " x ".join(map(str, meta.spatial_shape))
    too_fine = [g for g in checked["solver_grids"] if g > cells]
    if too_fine:
        say(f"bench: solver grids {too_fine} are finer than the {grid}-cell evaluation grid: skipped")
        checked["solver_grids"] = [g for g in checked["solver_grids"] if g <= cells]
    bad = [g for g in checked["solver_grids"] if any(n % g for n in meta.spatial_shape)]
    if bad:
        raise UserError(f"bench setting solver_grids={checked['solver_grids']}: {bad} do not divide the "
                        f"{grid}-cell evaluation grid of {view.path}.")
    steps = test.shape[1] - b.n_given
    u0, truth = test[:, b.n_given - 1], test[:, b.n_given:]
    stated = ", ".join(f"{k}={v:g}" for k, v in b.params.items())
    say(f"bench: {view.path} ({view.pde}, {stated}; {grid} cells x {meta.n_t} frames after reduction); splits "
        f"{view.sizes()} from the {view.split_source}; frames 0..{b.n_given - 1} given, {steps} predicted; "
        f"budget {checked['budget_min']:g} min per learned method and model; seeds {checked['seeds']}; "
        f"methods {checked['methods']}; torch threads {threads}")

    fixed: List[Dict[str, Any]] = []
    fixed.append({"method": "persistence", "kind": "baseline", **b.score(b.persistence("test")), "train_s": 0.0,
                  "rollout_ms_per_traj": 0.0, "params": 0})
    solver_rows: List[Dict[str, Any]] = []
    if not cfg.skip_solver:
        from ups_lightning.pdes.fit import fit_domain

        start = b.n_given - 1 if b.spec.frames_hold_state else 0   # from a whole state (evaluation's rule)
        t_rel = [float(t) - float(meta.t[start]) for t in meta.t[start:]]
        fit = fit_domain(b.spec, b.params, b.split["train"][:4].numpy(), meta.dt, meta.domain_length,
                         str(view.path), k=max(0, b.n_given - 2))
        for s in sweep(test[:, start], truth, view.pde, b.params, t_rel, meta.dx, meta.domain_length,
                       checked["solver_grids"], log=say, solve_length=fit.domain_length, u_given=u0):
            solver_rows.append(s)
            fixed.append({"method": f"solver {s['grid']} cells", "kind": "solver", **{k: s.get(k) for k in METRIC_KEYS},
                          "nrmse_pdebench": s["nrmse"] * steps / test.shape[1], "train_s": 0.0,
                          "rollout_ms_per_traj": s["ms_per_traj"], "params": 0, "solver_grid": s["grid"]})
        scored("test", len(solver_rows))
    results = run_methods(b)
    curves = run_curves(b, results) if checked["curve_budgets"] else []
    load_end = os.getloadavg()
    header = (f"# Benchmark: {Path(view.path).name}, {grid} x {meta.n_t} after reduction, "
              f"{len(test)} test trajectories ({view.split_source}), {steps} predicted frames\n\n"
              f"budget_min={checked['budget_min']:g} per learned model (one clock: everything before it "
              f"can predict); search rungs {list(checked['search'].rungs)} of it; seeds {checked['seeds']}; "
              f"git {git_commit()}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, torch threads {threads}; "
              f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
              f"{time.perf_counter() - t0:.0f} s in all")
    published = [p for p in b.spec.published if p.applies(b.params)]
    common = {"budget_min": checked["budget_min"], "n_test": len(test), "steps": steps,
              "data_path": str(view.path), "pde": view.pde}
    notes: List[str] = []
    if curves:
        curves = [{**r, "source": "this run"} for r in curves]
    if checked["curves_from"]:     # earlier sittings' points join this run's (bench/curves.py)
        from ups_lightning.bench.curves import CURVE_COLUMNS, merge_curves

        own = curves or [{**{k: r.get(k) for k in CURVE_COLUMNS}, "source": "this run"}
                         for res in results.values() for r in res["runs"]]
        curves, notes = merge_curves(own, {"data_file": Path(str(view.path)).name, "n_test": len(test),
                                           "steps": steps}, checked["curves_from"])
    paths = write_bench_summary(cfg.out_dir, results, fixed, solver_rows, header=header, common=common,
                                curves=curves, published=published)
    if curves:
        from ups_lightning.bench.curves import write_curves

        paths.update(write_curves(cfg.out_dir, curves, published, notes, header=f"# Learning curves: {header[2:]}"))
    paths["provenance"] = write_provenance(cfg.out_dir, "bench", cfg, seeds=checked["seeds"],
                                           curve_seeds=checked["curve_seeds"], seconds=round(time.perf_counter() - t0))
    say("\n" + paths["md"].read_text())
    say(f"bench: {time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return {"results": results, "fixed": fixed, "curves": curves, "paths": paths}


def _curves_only(cfg: Any, checked: Dict[str, Any], say=print) -> Dict[str, Any]:
    """``curves_only=true``: merge the learning curves of ``curves_from`` (bench/curves.py) into
    out_dir, with the published figures of the data config's equation; nothing is trained."""
    from ups_lightning.bench.curves import merge_curves, write_curves
    from ups_lightning.provenance import git_commit, write_provenance
    from ups_lightning.pdes import get_pde

    rows, notes = merge_curves([], None, checked["curves_from"])
    params = dict(cfg.data.get("params") or {})
    published = [p for p in get_pde(cfg.data.pde).published if p.applies(params)]
    header = (f"# Learning curves: data={cfg.data.name}, merged from {len(checked['curves_from'])} sitting(s) by "
              f"`curves_only=true` at git {git_commit()}, {time.strftime('%Y-%m-%d %H:%M')}")
    paths = write_curves(cfg.out_dir, rows, published, notes, header=header)
    paths["provenance"] = write_provenance(cfg.out_dir, "bench (curves_only)", cfg, merged_from=checked["curves_from"])
    say("\n" + paths["curves_md"].read_text())
    say(f"bench: wrote {', '.join(str(p) for p in paths.values())}")
    return {"curves": rows, "paths": paths}
