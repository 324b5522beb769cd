"""`python -m ups_lightning.bench [budget_min=10] [data=NAME] [model=dim32] ...`
(`make bench`).

The benchmark suite of benchmark.md section 4, on one split of one data file, every method scored on
the same test frames by the same code (``ups_lightning.eval.metrics.all_metrics``, as
``ups_lightning.evaluate`` scores our model):

- **persistence**: u(t) = u(frame initial_step - 1);
- **FNO**: PDEBench's FNO1d from `neuraloperator`, trained autoregressively as PDEBench does for
  ``budget_min`` minutes of wall-clock (``bench/fno.py``);
- **ours (plain) / ours (TTC)**: our pipeline trained through every stage with the same total
  wall-clock split across stages (``shares``), then ``ups_lightning.evaluate`` with ``ttc=off`` and
  ``ttc=default``, appending both rows to the normal leaderboard;
- **solver at 32..256 cells**: the reference solver from the last given frame on coarser grids
  (``bench/solver_sweep.py``), and for every learned method the cheapest grid that is at least as
  accurate, with the wall-clock ratio.

Writes ``<out_dir>/summary.csv`` and ``<out_dir>/summary.md`` and prints the table. Numbers are
printed, never asserted. Settings: ``conf/bench.yaml``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ups_lightning import CONF_DIR
from ups_lightning.atomic import atomic_torch_save

__all__ = ["run_bench", "check_config", "compose_train_config", "CONF", "STAGE_SHARES"]

log = logging.getLogger("ups_lightning.bench")

CONF = CONF_DIR
STAGE_SHARES = ("autoencoder", "operator", "diffusion", "distill")
METRIC_KEYS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "frmse_low", "frmse_mid",
               "frmse_high", "correlation_horizon", "rmse", "brmse", "max_err", "mass_drift",
               "energy_increase", "tv_increase", "spectral_energy_error")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def _compose(name: str, overrides: Sequence[str]):
    """Compose a config of this project's conf/ (inside a running Hydra app or not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _num(cfg: Any, key: str, *, integer: bool = False, positive: bool = True, allow_none: bool = False,
         minimum: Optional[float] = None) -> Any:
    from ups_lightning.errors import UserError

    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key)
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer and isinstance(value, float):
        ok = value.is_integer()
    if ok and not math.isfinite(float(value)):
        ok = False
    if ok and positive and value <= 0:
        ok = False
    if ok and minimum is not None and value < minimum:
        ok = False
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        if minimum is not None:
            kind = f"{'an integer' if integer else 'a number'} >= {minimum}"
        raise UserError(f"bench setting {key}={value!r} must be {kind}"
                        f"{' or null' if allow_none else ''} (conf/bench.yaml).")
    return int(value) if integer else float(value)


def check_config(cfg: Any) -> Dict[str, Any]:
    """Validate the bench config; a bad setting is a UserError naming it. Returns checked values."""
    from ups_lightning.bench.fno import FNOSettings
    from ups_lightning.errors import UserError

    out: Dict[str, Any] = {}
    out["budget_min"] = _num(cfg, "budget_min")
    out["n_test"] = _num(cfg, "n_test", integer=True, allow_none=True)
    out["threads"] = _num(cfg, "threads", integer=True, allow_none=True)
    out["eval_batch_size"] = _num(cfg, "eval_batch_size", integer=True)
    for flag in ("skip_ours", "skip_fno", "skip_solver", "reuse"):
        if not isinstance(cfg.get(flag), bool):
            raise UserError(f"bench setting {flag}={cfg.get(flag)!r} must be true or false.")
    shares = cfg.get("shares")
    if shares is None or not hasattr(shares, "keys") or set(shares.keys()) != set(STAGE_SHARES):
        raise UserError(f"bench setting shares={shares!r} must map each of {', '.join(STAGE_SHARES)} to "
                        "its fraction of budget_min (e.g. shares.autoencoder=0.35).")
    for k in STAGE_SHARES:
        _num(shares, k)
    total = sum(float(shares[k]) for k in STAGE_SHARES)
    if total > 1.0 + 1e-6:
        raise UserError(f"bench setting shares sum to {total:.3f}: the stages' fractions of budget_min "
                        "must add up to at most 1 (the same wall-clock as the FNO gets).")
    out["shares"] = {k: float(shares[k]) for k in STAGE_SHARES}
    grids = cfg.get("solver_grids")
    if grids is None or not hasattr(grids, "__iter__") or isinstance(grids, str) or len(grids) == 0:
        raise UserError(f"bench setting solver_grids={grids!r} must be a non-empty list of cell counts.")
    for g in grids:
        if isinstance(g, bool) or not isinstance(g, int) or g < 4:
            raise UserError(f"bench setting solver_grids={list(grids)}: {g!r} is not a cell count (an "
                            "integer >= 4 that divides the evaluation grid).")
    out["solver_grids"] = [int(g) for g in grids]
    fno = cfg.get("fno") or {}
    unknown = set(fno.keys()) - set(FNOSettings.__dataclass_fields__)
    if unknown:
        raise UserError(f"bench setting fno has unknown key(s) {sorted(unknown)}; known: "
                        f"{sorted(FNOSettings.__dataclass_fields__)}.")
    for k in ("modes", "width", "n_layers", "projection", "batch_size", "scheduler_step", "max_epochs",
              "val_batch_size"):
        if k in fno:
            _num(fno, k, integer=True)
    for k in ("lr", "scheduler_gamma"):
        if k in fno:
            _num(fno, k)
    if "weight_decay" in fno:
        _num(fno, "weight_decay", positive=False, minimum=0.0)
    if fno.get("t_train") is not None:
        _num(fno, "t_train", integer=True)
    out["fno"] = FNOSettings.from_mapping(dict(fno))
    if not str(cfg.get("out_dir") or "").strip():
        raise UserError("bench setting out_dir must name a directory (default outputs/bench).")
    if out["threads"] is not None and out["threads"] < 1:
        raise UserError(f"bench setting threads={out['threads']} must be >= 1 or null.")
    return out


def _tag(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def ours_run_dir(cfg: Any) -> Path:
    return (Path(cfg.out_dir) / "runs" /
            f"{cfg.data.name}-{cfg.model.name}-budget{_tag(float(cfg.budget_min))}min-seed{cfg.seed}")


def compose_train_config(cfg: Any, checked: Dict[str, Any], run_dir: Optional[Path] = None):
    """The training config of our pipeline for this bench: the bench's data and model, the
    experiment's stage settings, each stage's max_minutes = its share of budget_min."""
    from omegaconf import OmegaConf

    run_dir = run_dir or ours_run_dir(cfg)
    budget = checked["budget_min"]
    overrides = [f"experiment={cfg.experiment}", f"data={cfg.data.name}", f"model={cfg.model.name}",
                 f"run_dir={run_dir}", f"seed={cfg.seed}", "callbacks.progress_bar=none"]
    overrides += [f"stages.{k}.max_minutes={budget * checked['shares'][k]:.6g}" for k in STAGE_SHARES]
    if checked["threads"]:
        overrides.append(f"trainer.num_threads={checked['threads']}")
    overrides += list(cfg.get("train_overrides") or [])
    tcfg = _compose("train", overrides)
    OmegaConf.set_struct(tcfg, False)
    # the bench's own data and model groups, with any dotted overrides the user gave them
    tcfg.data = OmegaConf.merge(tcfg.data, cfg.data)
    tcfg.model = OmegaConf.merge(tcfg.model, cfg.model)
    if checked["n_test"] is not None:
        tcfg.data.n_test = min(int(tcfg.data.n_test), checked["n_test"])
    return tcfg


# --------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------
def _metric_row(method: str, kind: str, m: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    row = {"method": method, "kind": kind, **{k: m.get(k) for k in METRIC_KEYS}}
    row.update(extra)
    return row


def _fingerprint(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_fno(cfg: Any, checked: Dict[str, Any], view: Any, data_cfg: Any, test: Any, say=print) -> Dict[str, Any]:
    """Train (or reuse) the FNO peer and score its rollout on the test frames."""
    import torch
    from omegaconf import OmegaConf

    from ups_lightning.bench.fno import build_fno, predict_test, seed_all, train_fno
    from ups_lightning.errors import UserError
    from ups_lightning.eval.metrics import all_metrics, nrmse_pdebench

    settings = checked["fno"]
    meta = view.meta
    k = int(data_cfg.initial_step)
    if settings.modes > meta.n_x // 2 + 1:
        raise UserError(f"bench setting fno.modes={settings.modes} exceeds the {meta.n_x // 2 + 1} Fourier "
                        f"modes of the {meta.n_x}-cell grid.")
    data_dict = OmegaConf.to_container(data_cfg, resolve=True)
    for key in ("batch_size", "num_workers", "n_test"):
        data_dict.pop(key, None)
    fp = _fingerprint({"settings": settings.as_dict(), "data": data_dict, "budget_min": checked["budget_min"],
                       "seed": int(cfg.seed), "threads": checked["threads"]})
    fdir = Path(cfg.out_dir) / "fno" / fp
    ckpt = fdir / "fno.pt"
    seed_all(int(cfg.seed))
    model = build_fno(k, meta.n_channels, settings)
    if checked["reuse"] and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # data, never code
        model.load_state_dict(saved["state_dict"])
        record = saved["record"]
        say(f"fno: reusing {ckpt} (trained {record['train_s']:.0f} s, {record['epochs']} epochs)")
    else:
        train = torch.from_numpy(view.read("train")).float()
        val = torch.from_numpy(view.read("val")).float()
        say(f"fno: training on {len(train)} trajectories for {checked['budget_min']:g} min "
            f"(validation: {len(val)})")
        record = train_fno(model, train, val, settings, budget_s=60.0 * checked["budget_min"],
                           seed=int(cfg.seed), log=say)
        fdir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"state_dict": model.state_dict(), "record": record}, ckpt)
        (fdir / "record.json").write_text(json.dumps(record, indent=2, default=str))
    n_given = k
    u0, truth = test[:, n_given - 1], test[:, n_given:]
    pred, wall = predict_test(model, test, n_given, batch=checked["eval_batch_size"])
    m = all_metrics(pred, truth, dx=meta.dx, domain_length=meta.domain_length, u0=u0)
    full = torch.cat([test[:, :n_given], pred], dim=1)
    return _metric_row(
        "FNO (neuralop, PDEBench FNO1d)", "surrogate", m, train_s=record["train_s"],
        rollout_ms_per_traj=1000.0 * wall / len(test), params=record["params"],
        nrmse_pdebench=nrmse_pdebench(full, test, n_given), fno_epochs=record["epochs"],
        fno_best_epoch=record["best_epoch"], fno_val_nrmse=record["best_val_nrmse"],
        fno_stopped_by=record["stopped_by"], checkpoint=str(ckpt))


def run_ours(cfg: Any, checked: Dict[str, Any], train_cfg: Any, say=print) -> List[Dict[str, Any]]:
    """Train our pipeline through every stage within the budget, evaluate plainly and with TTC."""
    from ups_lightning.evaluation import evaluate
    from ups_lightning.training import run as train_run

    say(f"ours: training every stage in {train_cfg.run_dir} ("
        + ", ".join(f"{k} {train_cfg.stages[k].max_minutes:g} min" for k in STAGE_SHARES) + ")")
    start = time.perf_counter()
    records = train_run(train_cfg)
    wall = time.perf_counter() - start
    stage_s = {k: float(r["wall_clock_s"]) for k, r in records.items()}
    rows = []
    for ttc, label in (("off", "ours (plain)"), ("default", "ours (TTC)")):
        ecfg = _compose("evaluate", [f"run_dir={train_cfg.run_dir}", f"ttc={ttc}"])
        ecfg.leaderboard = str(cfg.leaderboard)
        ecfg.html = str(cfg.html)
        ecfg.seed = int(cfg.seed)
        ecfg.batch_size = checked["eval_batch_size"]
        ecfg.note = f"bench budget_min={checked['budget_min']:g}"
        say(f"ours: evaluate ttc={ttc}")
        r = evaluate(ecfg)
        rows.append(_metric_row(
            label, "surrogate", r, train_s=sum(stage_s.values()), train_wall_s=wall,
            rollout_ms_per_traj=r["rollout_ms_per_traj"], params=r["params"],
            nrmse_pdebench=r.get("nrmse_pdebench"), leaderboard_run_id=r["run_id"],
            leaderboard_label=r.get("label"), run_dir=str(train_cfg.run_dir),
            **{f"train_s_{k}": v for k, v in stage_s.items()},
            **({"ttc_evals_per_step": r.get("ttc_evals_per_step")} if ttc != "off" else {})))
    return rows


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def run_bench(cfg: Any, say=print) -> Dict[str, Any]:
    import torch

    from ups_lightning.bench.report import add_equal_accuracy, write_summary
    from ups_lightning.bench.solver_sweep import sweep
    from ups_lightning.data.datamodule import open_run_data
    from ups_lightning.errors import UserError
    from ups_lightning.eval.metrics import all_metrics, nrmse_pdebench
    from ups_lightning.evaluation import git_commit

    checked = check_config(cfg)
    checked["reuse"] = bool(cfg.reuse)
    if checked["threads"]:
        torch.set_num_threads(checked["threads"])
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    run_dir = ours_run_dir(cfg)
    if not checked["reuse"]:
        run_dir = run_dir.with_name(run_dir.name + time.strftime("-%Y%m%d-%H%M%S"))
    train_cfg = compose_train_config(cfg, checked, run_dir)
    data_cfg = train_cfg.data
    data = open_run_data(data_cfg)
    if len(data.views) != 1:
        raise UserError(f"bench: data={data_cfg.name} holds {len(data.views)} equations; the benchmark runs "
                        "on one file of one equation (pass data=<equation>).")
    view, params = data.views[0], data.params[data.views[0].pde]
    meta = view.meta
    n_given = int(data_cfg.initial_step)
    test = torch.from_numpy(view.read("test")).float()
    if test.shape[1] <= n_given:
        raise UserError(f"{view.path}: {test.shape[1]} frames after reduction, but initial_step={n_given} "
                        "frames are given: nothing is left to predict.")
    too_fine = [g for g in checked["solver_grids"] if g > meta.n_x]
    if too_fine:
        say(f"bench: solver grids {too_fine} are finer than the {meta.n_x}-cell evaluation grid: skipped")
        checked["solver_grids"] = [g for g in checked["solver_grids"] if g <= meta.n_x]
    bad = [g for g in checked["solver_grids"] if meta.n_x % g]
    if bad:
        raise UserError(f"bench setting solver_grids={checked['solver_grids']}: {bad} do not divide the "
                        f"{meta.n_x}-cell evaluation grid of {view.path}.")
    steps = test.shape[1] - n_given
    u0, truth = test[:, n_given - 1], test[:, n_given:]
    common = {"budget_min": checked["budget_min"], "n_test": len(test), "steps": steps, "data_path": str(view.path),
              "pde": view.pde}
    stated = ", ".join(f"{k}={v:g}" for k, v in params.items())
    say(f"bench: {view.path} ({view.pde}, {stated}; {meta.n_x} cells x {meta.n_t} frames after reduction); splits "
        f"{view.sizes()} from the {view.split_source}; frames 0..{n_given - 1} given, {steps} predicted; "
        f"budget {checked['budget_min']:g} min per learned method; torch threads {torch.get_num_threads()}")

    rows: List[Dict[str, Any]] = []
    persistence = u0.unsqueeze(1).expand_as(truth).clone()
    m = all_metrics(persistence, truth, dx=meta.dx, domain_length=meta.domain_length, u0=u0)
    rows.append(_metric_row("persistence", "baseline", m, train_s=0.0, rollout_ms_per_traj=0.0, params=0,
                            nrmse_pdebench=nrmse_pdebench(torch.cat([test[:, :n_given], persistence], 1),
                                                          test, n_given)))
    solver_rows: List[Dict[str, Any]] = []
    if not cfg.skip_solver:
        t_rel = [float(t) - float(meta.t[n_given - 1]) for t in meta.t[n_given - 1:]]
        for s in sweep(u0, truth, view.pde, params, t_rel, meta.dx, meta.domain_length, checked["solver_grids"],
                       log=say):
            solver_rows.append(s)
            # PDEBench's figure: the given frames count with zero error, so it is nRMSE * steps / T
            rows.append(_metric_row(f"solver {s['grid']} cells", "solver", s, train_s=0.0,
                                    rollout_ms_per_traj=s["ms_per_traj"], params=0, solver_grid=s["grid"],
                                    nrmse_pdebench=s["nrmse"] * steps / test.shape[1]))
    if not cfg.skip_fno:
        rows.append(run_fno(cfg, checked, view, data_cfg, test, say=say))
    if not cfg.skip_ours:
        rows.extend(run_ours(cfg, checked, train_cfg, say=say))
    add_equal_accuracy(rows, solver_rows)
    for r in rows:
        r.update(common)
    # surrogates first, then the peers
    order = {"surrogate": 0, "baseline": 1, "solver": 2}
    rows.sort(key=lambda r: order.get(r["kind"], 3))
    load_end = os.getloadavg()
    header = (f"# Benchmark: {Path(view.path).name}, {meta.n_x} x {meta.n_t} after reduction, "
              f"{len(test)} test trajectories, {steps} predicted frames\n\n"
              f"budget_min={checked['budget_min']:g} per learned method; git {git_commit()}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, torch threads "
              f"{torch.get_num_threads()}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    notes = [
        "nRMSE and every metric: physical space, frames "
        f"{n_given}..{n_given + steps - 1} rolled out from frames 0..{n_given - 1} without teacher forcing, "
        "scored by ups_lightning.eval.metrics.all_metrics (as ups_lightning.evaluate does).",
        "train s: FNO = its training loop incl. validation; ours = sum of the four stages' fit wall-clock "
        "(each stage capped at its share of budget_min; latent-cache building is outside the caps, see "
        "train_wall_s in summary.csv).",
        "params: FNO counts each complex weight once (numel, as PDEBench prints it); ours counts the "
        "networks the rollout uses (autoencoder + operator, + the corrector for TTC).",
        "solver rows: reference solver from the last given frame on N cells (cell averages of the "
        "evaluation grid), periodic linear interpolation back to it; 'solver at equal nRMSE' is the "
        "cheapest grid at least as accurate as the method, 'solver ms / method ms' the wall-clock ratio "
        "(> 1: the surrogate is faster at equal accuracy).",
        "rollout ms/traj: batched over the test set, wall-clock / trajectories.",
    ]
    paths = write_summary(cfg.out_dir, rows, header=header, notes=notes)
    text = paths["md"].read_text()
    say("\n" + text)
    say(f"bench: {time.perf_counter() - t0:.0f} s; wrote {paths['csv']} and {paths['md']}")
    return {"rows": rows, "paths": paths, "train_cfg": train_cfg}
