"""`python -m ups_lightning.bench [budget_min=10] [data=NAME] [model=dim32] [seeds=[0,1,2]] ...`
(`make bench`, `make bench BUDGET=5`).

The benchmark of benchmark.md section 4, on one split of one data file, every method scored on the
same test frames by the same code (``ups_lightning.eval.metrics.all_metrics``):

- **persistence** (u(t) = the last given frame) and the **reference solver** on 32..256 cells
  (``bench/solver_sweep.py``), and for every learned method the cheapest grid at least as accurate;
- **learned methods, trained alike** (``methods``): ours (autoencoder + operator, ``shares`` of the
  budget), PDEBench's FNO1d and U-Net1d (``bench/peers.py``). Each gets ``budget_min`` minutes of
  training wall-clock through the same Lightning trainer, timer, optimiser and schedule family, the
  same loss choice (``relative_loss``), and a learning-rate search of the same size on the
  validation split (``lr_search``: each trial trained for ``tune_budget_min`` with the first seed).
  The chosen rate is then trained with every seed in ``seeds``; when the trial budget equals the
  budget, the chosen trial is the first seed's run. Test is scored once per trained model, with and
  without the guard (the projection onto the equation's invariants, offered to every method).

Writes into ``out_dir``: ``summary.md`` (mean +- std over seeds per method and guard setting, the
winner per column in words: a method wins a column only where its gap to the next exceeds two
standard errors; the learning-rate search; persistence and solver rows), ``summary.csv`` (the
aggregated rows), ``runs.csv`` (every trained model: trial or seed, val and test figures) and
``lr_search.csv``. A model that never beat its trivial reference (persistence, or the mean field for
the autoencoder) is flagged in the log, in its records and in the summary. Settings:
``conf/bench.yaml``; numbers are printed, never asserted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ups_lightning import CONF_DIR
from ups_lightning.config import compose_config

__all__ = ["run_bench", "check_config", "compose_train_config", "CONF", "STAGE_SHARES", "METHODS"]

log = logging.getLogger("ups_lightning.bench")

CONF = CONF_DIR
STAGE_SHARES = ("autoencoder", "operator")   # our stages the benchmark trains (the plain rollout's)
METHODS = ("ours", "fno", "unet")
METRIC_KEYS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "frmse_low", "frmse_mid",
               "frmse_high", "correlation_horizon", "rmse", "brmse", "max_err", "mass_drift",
               "energy_increase", "tv_increase", "spectral_energy_error", "nrmse_pdebench")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def _num(cfg: Any, key: str, *, integer: bool = False, positive: bool = True, allow_none: bool = False,
         minimum: Optional[float] = None, where: str = "") -> Any:
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
        raise UserError(f"bench setting {where}{key}={value!r} must be {kind}"
                        f"{' or null' if allow_none else ''} (conf/bench.yaml).")
    return int(value) if integer else float(value)


def _settings(cfg: Any, name: str, cls: type) -> Any:
    """A peer's architecture settings (``fno:`` / ``unet:`` in conf/bench.yaml), checked."""
    from ups_lightning.errors import UserError

    given = dict(cfg.get(name) or {})
    unknown = set(given) - set(cls.__dataclass_fields__)
    if unknown:
        raise UserError(f"bench setting {name} has unknown key(s) {sorted(unknown)}; known: "
                        f"{sorted(cls.__dataclass_fields__)}.")
    for k in given:   # every architecture setting is a count (None: "all", where the default is None)
        _num(given, k, integer=True, allow_none=cls.__dataclass_fields__[k].default is None, where=f"{name}.")
    return cls.from_mapping(given)


def check_config(cfg: Any) -> Dict[str, Any]:
    """Validate the bench config; a bad setting is a UserError naming it. Returns checked values."""
    from ups_lightning.bench.peers import PEERS
    from ups_lightning.errors import UserError

    out: Dict[str, Any] = {}
    out["budget_min"] = _num(cfg, "budget_min")
    out["tune_budget_min"] = _num(cfg, "tune_budget_min", allow_none=True) or out["budget_min"]
    out["n_test"] = _num(cfg, "n_test", integer=True, allow_none=True)
    out["threads"] = _num(cfg, "threads", integer=True, allow_none=True)
    out["eval_batch_size"] = _num(cfg, "eval_batch_size", integer=True)
    for flag in ("skip_solver", "reuse", "relative_loss"):
        if not isinstance(cfg.get(flag), bool):
            raise UserError(f"bench setting {flag}={cfg.get(flag)!r} must be true or false.")
        out[flag] = bool(cfg.get(flag))
    methods = list(cfg.get("methods") or [])
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise UserError(f"bench setting methods={methods!r} must be a non-empty list of distinct names "
                        f"from {list(METHODS)} (e.g. methods=[ours,fno]).")
    out["methods"] = methods
    seeds = list(cfg.get("seeds") or [])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"bench setting seeds={seeds!r} must be a non-empty list of distinct integers >= 0 "
                        "(training seeds; 3 by default).")
    out["seeds"] = [int(s) for s in seeds]
    search = cfg.get("lr_search")
    if search is None or not hasattr(search, "keys") or not set(methods) <= set(search.keys()):
        raise UserError(f"bench setting lr_search must give a list of learning rates for each method in "
                        f"{methods} (e.g. lr_search.fno=[3e-4,1e-3,3e-3]).")
    grids = {}
    for m in methods:
        grid = list(search[m] or [])
        if not grid:
            raise UserError(f"bench setting lr_search.{m} must be a non-empty list of learning rates.")
        grids[m] = [_num({"lr": v}, "lr", where=f"lr_search.{m}.") for v in grid]
    if len({len(g) for g in grids.values()}) > 1:
        raise UserError("bench setting lr_search: every method gets a search of the same size (equal "
                        "tuning effort), but the lists have " + ", ".join(f"{m}: {len(g)}" for m, g in grids.items())
                        + " rates.")
    out["lr_search"] = grids
    shares = cfg.get("shares")
    if shares is None or not hasattr(shares, "keys") or set(shares.keys()) != set(STAGE_SHARES):
        raise UserError(f"bench setting shares={shares!r} must map each of {', '.join(STAGE_SHARES)} to "
                        "its fraction of budget_min (e.g. shares.autoencoder=0.375).")
    for k in STAGE_SHARES:
        _num(shares, k, where="shares.")
    total = sum(float(shares[k]) for k in STAGE_SHARES)
    if total > 1.0 + 1e-6:
        raise UserError(f"bench setting shares sum to {total:.3f}: our stages' fractions of budget_min "
                        "must add up to at most 1 (the same wall-clock as every peer gets).")
    out["shares"] = {k: float(shares[k]) for k in STAGE_SHARES}
    grids_cells = cfg.get("solver_grids")
    if grids_cells is None or not hasattr(grids_cells, "__iter__") or isinstance(grids_cells, str) \
            or len(grids_cells) == 0:
        raise UserError(f"bench setting solver_grids={grids_cells!r} must be a non-empty list of cell counts.")
    for g in grids_cells:
        if isinstance(g, bool) or not isinstance(g, int) or g < 4:
            raise UserError(f"bench setting solver_grids={list(grids_cells)}: {g!r} is not a cell count (an "
                            "integer >= 4 that divides the evaluation grid).")
    out["solver_grids"] = [int(g) for g in grids_cells]
    out["peers"] = {name: _settings(cfg, name, cls) for name, (_, cls, _) in PEERS.items()}
    if not str(cfg.get("out_dir") or "").strip():
        raise UserError("bench setting out_dir must name a directory (default outputs/bench).")
    return out


def _tag(value: float) -> str:
    return f"{value:g}".replace(".", "p").replace("-", "m")


def compose_train_config(cfg: Any, checked: Dict[str, Any], run_dir: Path, seed: int,
                         operator_lr: Optional[float] = None, budget_min: Optional[float] = None):
    """The training config of our pipeline for this bench: the bench's data and model, the
    experiment's stage settings, autoencoder + operator with max_minutes = their shares of the budget,
    the bench's loss choice. Peers train under the same config's trainer, optimiser and callbacks."""
    from omegaconf import OmegaConf

    budget = budget_min or checked["budget_min"]
    overrides = [f"experiment={cfg.experiment}", f"data={cfg.data.name}", f"model={cfg.model.name}",
                 f"run_dir={run_dir}", f"seed={seed}", "callbacks.progress_bar=none", "stage=operator",
                 f"stages.operator.relative_loss={str(checked['relative_loss']).lower()}",
                 # the peers train eager: compiling ours alone would give it more steps in the same
                 # clock than the benchmark gives them (a train_overrides entry can still turn it on)
                 "trainer.compile=false"]
    overrides += [f"stages.{k}.max_minutes={budget * checked['shares'][k]:.6g}" for k in STAGE_SHARES]
    if operator_lr is not None:
        overrides.append(f"stages.operator.lr={operator_lr:g}")
    if checked["threads"]:
        overrides.append(f"trainer.num_threads={checked['threads']}")
    overrides += list(cfg.get("train_overrides") or [])
    tcfg = compose_config("train", overrides)
    OmegaConf.set_struct(tcfg, False)
    # the bench's own data and model groups, with any dotted overrides the user gave them
    tcfg.data = OmegaConf.merge(tcfg.data, cfg.data)
    tcfg.model = OmegaConf.merge(tcfg.model, cfg.model)
    if checked["n_test"] is not None:
        tcfg.data.n_test = min(int(tcfg.data.n_test), checked["n_test"])
    tcfg.stage.run = list(STAGE_SHARES)
    return tcfg


def _fingerprint(payload: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# the context every method shares
# --------------------------------------------------------------------------------------------
class Bench:
    """The bench's data, splits, guard and settings, shared by every method's training and scoring."""

    def __init__(self, cfg: Any, checked: Dict[str, Any], say: Callable[[str], None]) -> None:
        import torch

        from ups_lightning.data.datamodule import open_run_data
        from ups_lightning.errors import UserError
        from ups_lightning.pdes import get_pde

        self.cfg, self.checked, self.say = cfg, checked, say
        self.out = Path(cfg.out_dir)
        self.base_cfg = compose_train_config(cfg, checked, self.out / "runs" / "_", seed=checked["seeds"][0])
        self.data_cfg = self.base_cfg.data
        data = open_run_data(self.data_cfg)
        if len(data.views) != 1:
            raise UserError(f"bench: data={self.data_cfg.name} holds {len(data.views)} equations; the "
                            "benchmark runs on one file of one equation (pass data=<equation>).")
        self.view = data.views[0]
        self.params = data.params[self.view.pde]
        self.spec = get_pde(self.view.pde)
        self.meta = self.view.meta
        self.n_given = int(self.data_cfg.initial_step)
        self.split = {s: torch.from_numpy(self.view.read(s)).float() for s in ("train", "val", "test")}
        if self.split["test"].shape[1] <= self.n_given:
            raise UserError(f"{self.view.path}: {self.split['test'].shape[1]} frames after reduction, but "
                            f"initial_step={self.n_given} frames are given: nothing is left to predict.")

    def score(self, pred: Any, split: str = "test") -> Dict[str, Any]:
        import torch

        from ups_lightning.eval.metrics import all_metrics, nrmse_pdebench

        fields = self.split[split]
        u0, truth = fields[:, self.n_given - 1], fields[:, self.n_given:]
        m = all_metrics(pred, truth, dx=self.meta.dx, domain_length=self.meta.domain_length, u0=u0)
        m["nrmse_pdebench"] = nrmse_pdebench(torch.cat([fields[:, :self.n_given], pred], 1), fields, self.n_given)
        return m


# --------------------------------------------------------------------------------------------
# training one model of one method: (trained handle, record)
# --------------------------------------------------------------------------------------------
def _train_peer(b: Bench, method: str, lr: float, seed: int, budget_min: float, run_dir: Path) -> Dict[str, Any]:
    """Train (or reuse) a peer through our stages' Trainer; record with val figure and learned flag."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from ups_lightning.atomic import atomic_write_json
    from ups_lightning.bench.peers import PEERS, PeerModule, TrajectoryData, count_params
    from ups_lightning.errors import UserError
    from ups_lightning.training import build_trainer

    label, _, build = PEERS[method]
    settings = b.checked["peers"][method]
    done = run_dir / "done.json"
    fp = _fingerprint({"method": method, "settings": settings.as_dict(), "lr": lr, "seed": seed,
                       "budget_min": budget_min, "relative_loss": b.checked["relative_loss"],
                       "data": OmegaConf.to_container(b.data_cfg, resolve=True),
                       "optim": OmegaConf.to_container(b.base_cfg.optim, resolve=True)})
    L.seed_everything(seed, workers=True, verbose=False)
    net = build(b.n_given, b.meta.n_channels, settings)
    module = PeerModule(net, lr, OmegaConf.to_container(b.base_cfg.optim, resolve=True),
                        b.checked["relative_loss"], t_train=settings.t_train, grad_frames=settings.grad_frames)
    if b.checked["reuse"] and done.is_file():
        record = json.loads(done.read_text())
        ckpt = (run_dir / str(record.get("best_ckpt"))).resolve()
        if record.get("fingerprint") == fp and ckpt.is_file() and run_dir.resolve() in ckpt.parents:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)   # data, never code
            module.load_state_dict(state["state_dict"])
            b.say(f"{method}: reusing {run_dir} (lr {lr:g}, seed {seed})")
            return {**record, "handle": module.net}
    shutil.rmtree(run_dir, ignore_errors=True)
    tcfg = b.base_cfg.copy()
    tcfg.stages.peer = {"max_epochs": settings.max_epochs, "max_minutes": budget_min, "lr": lr,
                        "batch_size": settings.batch_size}
    trainer = build_trainer(tcfg, "peer", run_dir)
    data = TrajectoryData(b.split["train"], b.split["val"], settings.batch_size, settings.val_batch_size)
    b.say(f"{method}: training lr {lr:g} seed {seed} for {budget_min:g} min -> {run_dir}")
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    score = trainer.checkpoint_callback.best_model_score
    best_val = float(score) if score is not None else math.nan
    if not trainer.checkpoint_callback.best_model_path or not math.isfinite(best_val):
        raise UserError(f"{method} (lr {lr:g}, seed {seed}) diverged or wrote no checkpoint in {run_dir} "
                        f"(best validation nRMSE {best_val}); nothing of it is scored.")
    best = Path(trainer.checkpoint_callback.best_model_path)
    state = torch.load(best, map_location="cpu", weights_only=True)   # data, never code
    module.load_state_dict(state["state_dict"])
    trivial = float(trainer.callback_metrics["val/nrmse_persistence"])
    record = {"method": method, "label": label, "fingerprint": fp, "lr": lr, "seed": seed,
              "budget_min": budget_min, "train_s": wall, "epochs": trainer.current_epoch,
              "optimizer_steps": trainer.global_step, "best_val_nrmse": best_val,
              "trivial_val_nrmse": trivial, "learned": best_val < trivial, "params": count_params(net),
              "best_ckpt": str(best.resolve().relative_to(run_dir.resolve())),
              "num_threads": torch.get_num_threads(), "settings": settings.as_dict()}
    if not record["learned"]:
        log.warning("%s (lr %g, seed %d) STOPPED BEFORE IT LEARNED ANYTHING: best val nRMSE %.4g does not "
                    "beat persistence's %.4g after %d epochs", method, lr, seed, best_val, trivial,
                    trainer.current_epoch)
    atomic_write_json(done, record)
    return {**record, "handle": module.net}


def _evaluate_ours(b: Bench, run_dir: Path, split: str, guard: bool) -> Dict[str, Any]:
    from ups_lightning.evaluation import evaluate

    ecfg = compose_config("evaluate", [f"run_dir={run_dir}", "ttc=off", "upto=operator", f"split={split}",
                                 f"guard.invariants={str(guard).lower()}"])
    ecfg.leaderboard = str(b.cfg.leaderboard if split == "test" else b.out / "val_leaderboard.csv")
    ecfg.html = str(b.cfg.html if split == "test" else b.out / "val_leaderboard.html")
    ecfg.batch_size = b.checked["eval_batch_size"]
    ecfg.n_show = 0 if split != "test" else ecfg.n_show
    ecfg.note = f"bench budget_min={b.checked['budget_min']:g} guard={guard}"
    if b.checked["threads"]:
        ecfg.num_threads = b.checked["threads"]
    return evaluate(ecfg)


def _train_ours(b: Bench, lr: float, seed: int, budget_min: float, run_dir: Path,
                share_autoencoder: Optional[Path] = None) -> Dict[str, Any]:
    """Train (or reuse: finished stages of the same config are skipped) autoencoder + operator; the
    learning-rate trials of one seed use the first trial's autoencoder by reference (reuse_runs),
    so they differ in the operator's learning rate alone."""
    from ups_lightning.training import run as train_run

    tcfg = compose_train_config(b.cfg, b.checked, run_dir, seed=seed, operator_lr=lr, budget_min=budget_min)
    if not b.checked["reuse"]:
        shutil.rmtree(run_dir, ignore_errors=True)
    if share_autoencoder is not None:
        tcfg.reuse_runs = [str(share_autoencoder)]
    b.say(f"ours: training autoencoder + operator (operator lr {lr:g}, seed {seed}, {budget_min:g} min) -> {run_dir}")
    records = train_run(tcfg)
    val = _evaluate_ours(b, run_dir, "val", guard=False)
    learned = all(r.get("learned") is not False for r in records.values())
    for name, r in records.items():
        if r.get("learned") is False:
            b.say(f"ours: stage {name} STOPPED BEFORE IT LEARNED ANYTHING (val {r['best_val_nrmse']:.4g} vs "
                  f"{r['trivial_metric']} {r['trivial_val_nrmse']:.4g})")
    return {"method": "ours", "label": _label(b, "ours"), "lr": lr, "seed": seed,
            "budget_min": budget_min, "train_s": sum(float(r["wall_clock_s"]) for r in records.values()),
            "best_val_nrmse": val["nrmse"], "learned": learned, "params": val["params"],
            "stage_learned": {k: r.get("learned") for k, r in records.items()},
            "epochs": {k: r.get("epochs") for k, r in records.items()}, "handle": run_dir}


def _score(b: Bench, method: str, handle: Any, guard: bool) -> Dict[str, Any]:
    """Test figures of one trained model, with or without the guard."""
    from ups_lightning.bench.peers import predict_peer

    if method == "ours":
        r = _evaluate_ours(b, handle, "test", guard)
        return {**{k: r.get(k) for k in METRIC_KEYS}, "rollout_ms_per_traj": r["rollout_ms_per_traj"],
                "leaderboard_run_id": r["run_id"]}
    project = (lambda u, given: b.spec.project(u, given)) if guard else None
    pred, wall = predict_peer(handle, b.split["test"], b.n_given, batch=b.checked["eval_batch_size"], project=project)
    m = b.score(pred)
    return {**{k: m.get(k) for k in METRIC_KEYS}, "rollout_ms_per_traj": 1000.0 * wall / len(pred)}


def _label(b: Bench, method: str) -> str:
    from ups_lightning.bench.peers import PEERS

    return f"ours ({b.cfg.model.name})" if method == "ours" else PEERS[method][0]


def _train(b: Bench, method: str, lr: float, seed: int, budget_min: float, run_dir: Path, **kw: Any) -> Dict[str, Any]:
    """One model; a model that fails (diverges: non-finite validation or weights) is recorded as
    failed (val nRMSE inf, never scored) instead of ending the benchmark: a learning rate too high
    for one method is a result of its search, not an error."""
    from ups_lightning.errors import UserError

    try:
        if method == "ours":
            return _train_ours(b, lr, seed, budget_min, run_dir, **kw)
        return _train_peer(b, method, lr, seed, budget_min, run_dir)
    except UserError as exc:
        log.warning("%s lr %g seed %d failed: %s", method, lr, seed, exc)
        return {"method": method, "label": _label(b, method), "lr": lr, "seed": seed, "budget_min": budget_min,
                "train_s": math.nan, "best_val_nrmse": math.inf, "learned": False, "failed": str(exc),
                "handle": None}


def run_method(b: Bench, method: str) -> Dict[str, List[Dict[str, Any]]]:
    """The learning-rate search on validation, then every seed at the chosen rate, each scored on
    test with and without the guard. Returns {"trials": [...], "runs": [...]} (plain dicts)."""
    from ups_lightning.errors import UserError

    ck = b.checked
    runs_dir = b.out / "runs"
    first, tune, budget = ck["seeds"][0], ck["tune_budget_min"], ck["budget_min"]
    trials = []
    for i, lr in enumerate(ck["lr_search"][method]):
        rd = runs_dir / f"{method}-budget{_tag(tune)}min-lr{_tag(lr)}-seed{first}"
        share = trials[0]["run_dir"] if method == "ours" and trials else None
        rec = _train(b, method, lr, first, tune, rd, **({"share_autoencoder": Path(share)} if share else {}))
        rec["run_dir"] = str(rd)
        trials.append(rec)
        b.say(f"{method}: lr {lr:g} -> val nRMSE {rec['best_val_nrmse']:.4f}"
              f"{'' if rec['learned'] else '  (did not beat the trivial reference)'}")
    if not any(math.isfinite(t["best_val_nrmse"]) for t in trials):
        raise UserError(f"bench: every learning rate of {method} failed ({trials[0].get('failed')}).")
    chosen = min(trials, key=lambda r: r["best_val_nrmse"] if math.isfinite(r["best_val_nrmse"]) else math.inf)
    b.say(f"{method}: chosen lr {chosen['lr']:g} on validation (val nRMSE {chosen['best_val_nrmse']:.4f})")
    runs = []
    for seed in ck["seeds"]:
        if seed == first and tune == budget:
            rec = chosen
        else:
            rd = runs_dir / f"{method}-budget{_tag(budget)}min-lr{_tag(chosen['lr'])}-seed{seed}"
            rec = _train(b, method, chosen["lr"], seed, budget, rd)
            rec["run_dir"] = str(rd)
        for guard in (False, True):
            if rec["handle"] is None:     # a failed seed: counted as failed, never scored
                runs.append({**{k: v for k, v in rec.items() if k != "handle"}, "guard": guard, "nrmse": math.nan,
                             "val_nrmse": rec["best_val_nrmse"]})
                continue
            m = _score(b, method, rec["handle"], guard)
            runs.append({**{k: v for k, v in rec.items() if k != "handle"}, "guard": guard, **m,
                         "val_nrmse": rec["best_val_nrmse"]})
            b.say(f"{method}: seed {seed} guard {'on' if guard else 'off'} -> test nRMSE {m['nrmse']:.4f}")
    for t in trials:
        t.pop("handle", None)
        t["chosen"] = t is chosen
    return {"trials": trials, "runs": runs}


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
    from ups_lightning.evaluation import git_commit
    from ups_lightning.runtime import configure_cpu

    checked = check_config(cfg)
    threads = configure_cpu(checked["threads"], "threads")
    checked["threads"] = threads            # every method and evaluation runs with the same count
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    _ensure_data(cfg, checked)
    b = Bench(cfg, checked, say)
    meta, view = b.meta, b.view
    test = b.split["test"]
    too_fine = [g for g in checked["solver_grids"] if g > meta.n_x]
    if too_fine:
        say(f"bench: solver grids {too_fine} are finer than the {meta.n_x}-cell evaluation grid: skipped")
        checked["solver_grids"] = [g for g in checked["solver_grids"] if g <= meta.n_x]
    bad = [g for g in checked["solver_grids"] if meta.n_x % g]
    if bad:
        raise UserError(f"bench setting solver_grids={checked['solver_grids']}: {bad} do not divide the "
                        f"{meta.n_x}-cell evaluation grid of {view.path}.")
    steps = test.shape[1] - b.n_given
    u0, truth = test[:, b.n_given - 1], test[:, b.n_given:]
    stated = ", ".join(f"{k}={v:g}" for k, v in b.params.items())
    say(f"bench: {view.path} ({view.pde}, {stated}; {meta.n_x} cells x {meta.n_t} frames after reduction); splits "
        f"{view.sizes()} from the {view.split_source}; frames 0..{b.n_given - 1} given, {steps} predicted; "
        f"budget {checked['budget_min']:g} min per learned method and model; seeds {checked['seeds']}; "
        f"methods {checked['methods']}; torch threads {threads}")

    fixed: List[Dict[str, Any]] = []
    persistence = u0.unsqueeze(1).expand_as(truth).clone()
    fixed.append({"method": "persistence", "kind": "baseline", **b.score(persistence), "train_s": 0.0,
                  "rollout_ms_per_traj": 0.0, "params": 0})
    solver_rows: List[Dict[str, Any]] = []
    if not cfg.skip_solver:
        t_rel = [float(t) - float(meta.t[b.n_given - 1]) for t in meta.t[b.n_given - 1:]]
        for s in sweep(u0, truth, view.pde, b.params, t_rel, meta.dx, meta.domain_length, checked["solver_grids"],
                       log=say):
            solver_rows.append(s)
            fixed.append({"method": f"solver {s['grid']} cells", "kind": "solver", **{k: s.get(k) for k in METRIC_KEYS},
                          "nrmse_pdebench": s["nrmse"] * steps / test.shape[1], "train_s": 0.0,
                          "rollout_ms_per_traj": s["ms_per_traj"], "params": 0, "solver_grid": s["grid"]})
    results = {m: run_method(b, m) for m in checked["methods"]}
    load_end = os.getloadavg()
    header = (f"# Benchmark: {Path(view.path).name}, {meta.n_x} x {meta.n_t} after reduction, "
              f"{len(test)} test trajectories ({view.split_source}), {steps} predicted frames\n\n"
              f"budget_min={checked['budget_min']:g} per learned model (learning-rate trials: "
              f"{checked['tune_budget_min']:g} min each); seeds {checked['seeds']}; git {git_commit()}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, torch threads {threads}; "
              f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
              f"{time.perf_counter() - t0:.0f} s in all")
    paths = write_bench_summary(cfg.out_dir, results, fixed, solver_rows, header=header,
                                common={"budget_min": checked["budget_min"], "n_test": len(test), "steps": steps,
                                        "data_path": str(view.path), "pde": view.pde})
    say("\n" + paths["md"].read_text())
    say(f"bench: {time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return {"results": results, "fixed": fixed, "paths": paths}
