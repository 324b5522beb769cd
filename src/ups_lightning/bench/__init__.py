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
scored model), ``lr_search.csv`` (every trial), and with curves ``curves.csv`` and ``curves.png``.
A model that never beat its trivial reference (persistence, or the mean field for the autoencoder)
is flagged in the log, in its records and in the summary. Settings: ``conf/bench.yaml``; numbers
are printed, never asserted. Finished models of the same settings are reused, so a long benchmark
completes across sittings.
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
from ups_lightning.config import compose_config, model_overrides

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


def _seeds(cfg: Any, key: str) -> List[int]:
    from ups_lightning.errors import UserError

    seeds = list(cfg.get(key) or [])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"bench setting {key}={seeds!r} must be a non-empty list of distinct integers >= 0 "
                        "(training seeds).")
    return [int(s) for s in seeds]


def _search_settings(given: Any):
    """``search:`` of conf/bench.yaml as bench.search.SearchSettings, checked."""
    from ups_lightning.bench.search import SearchSettings
    from ups_lightning.errors import UserError

    given = dict(given or {})
    known = set(SearchSettings.__dataclass_fields__)
    if set(given) != known:
        raise UserError(f"bench setting search must give exactly {sorted(known)}; got {sorted(given)}.")
    rates = _num(given, "rates", integer=True, where="search.")
    widen = _num(given, "widen", integer=True, positive=False, minimum=0, where="search.")
    keep = _num(given, "keep", integer=True, where="search.")
    step = _num(given, "step", where="search.")
    if step <= 1.0:
        raise UserError(f"bench setting search.step={step:g} must be > 1 (the ratio between neighbouring rates).")
    rungs = given["rungs"]
    ok = rungs is not None and not isinstance(rungs, str) and hasattr(rungs, "__iter__") and len(rungs) > 0
    vals = [_num({"rung": r}, "rung", where="search.rungs.") for r in rungs] if ok else []
    if not ok or any(b <= a for a, b in zip(vals, vals[1:])) or abs(vals[-1] - 1.0) > 1e-9 or vals[0] <= 0:
        raise UserError(f"bench setting search.rungs={rungs!r} must be increasing fractions of budget_min in "
                        "(0, 1] ending at 1 (the last rung trains at the budget itself), e.g. [0.25, 1.0].")
    return SearchSettings(rates=rates, step=step, widen=widen, rungs=tuple(vals), keep=keep)


def _given_choices(given: Any, out: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``given:`` of conf/bench.yaml: per method, a recipe, rate and optionally guard that an
    earlier run chose on validation (its search is then skipped), checked."""
    from ups_lightning.errors import UserError

    choices = {}
    for method, g in dict(given or {}).items():
        g = dict(g or {})
        if method not in out["methods"]:
            raise UserError(f"bench setting given.{method}: {method!r} is not among methods={out['methods']}.")
        if set(g) - {"recipe", "lr", "guard"} or not {"recipe", "lr"} <= set(g):
            raise UserError(f"bench setting given.{method}={g!r} must give recipe and lr (and optionally guard: "
                            "true/false), e.g. given.fno={recipe: pdebench, lr: 0.00316}.")
        if g["recipe"] not in out["recipes"][method]:
            raise UserError(f"bench setting given.{method}.recipe={g['recipe']!r} must be one of "
                            f"recipes.{method}={out['recipes'][method]}.")
        guard = g.get("guard")
        if guard is not None and not isinstance(guard, bool):
            raise UserError(f"bench setting given.{method}.guard={guard!r} must be true, false or absent "
                            "(absent: chosen on validation).")
        choices[method] = {"recipe": str(g["recipe"]), "lr": _num(g, "lr", where=f"given.{method}."),
                           "guard": guard}
    return choices


def check_config(cfg: Any) -> Dict[str, Any]:
    """Validate the bench config; a bad setting is a UserError naming it. Returns checked values."""
    from ups_lightning.bench.peers import PEERS, RECIPES
    from ups_lightning.errors import UserError

    out: Dict[str, Any] = {}
    out["budget_min"] = _num(cfg, "budget_min")
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
    out["seeds"] = _seeds(cfg, "seeds")
    out["curve_seeds"] = _seeds(cfg, "curve_seeds")
    curve = cfg.get("curve_budgets")
    if curve is None or isinstance(curve, str) or not hasattr(curve, "__iter__"):
        raise UserError(f"bench setting curve_budgets={curve!r} must be a list of budgets in minutes "
                        "(e.g. curve_budgets=[2.5,5,10,20,40]; [] for none).")
    out["curve_budgets"] = sorted({_num({"budget": v}, "budget", where="curve_budgets.") for v in curve})
    out["lr_default"], out["recipes"] = {}, {}
    for m in methods:
        out["lr_default"][m] = _num(cfg.get("lr_default") or {}, m, where="lr_default.")
        recipes = list((cfg.get("recipes") or {}).get(m) or [])
        allowed = ["project"] if m == "ours" else list(RECIPES)
        if not recipes or len(set(recipes)) != len(recipes) or any(r not in allowed for r in recipes):
            raise UserError(f"bench setting recipes.{m}={recipes!r} must be a non-empty list of distinct "
                            f"recipes from {allowed} (bench/peers.py).")
        out["recipes"][m] = recipes
    out["search"] = _search_settings(cfg.get("search"))
    out["given"] = _given_choices(cfg.get("given"), out)
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
    overrides = [f"experiment={cfg.experiment}", f"data={cfg.data.name}", *model_overrides(cfg.model.name),
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
        self.trainer: Any = None     # the Models that trained this bench's models (run_methods)
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
def _run_name(method: str, recipe: str, budget_min: float, lr: float, seed: int) -> str:
    return f"{method}-{recipe}-budget{_tag(budget_min)}min-lr{_tag(lr)}-seed{seed}"


def _train_peer(b: Bench, method: str, recipe: str, lr: float, seed: int, budget_min: float,
                run_dir: Path) -> Dict[str, Any]:
    """Train (or reuse) a peer through our stages' Trainer under ``recipe`` (bench/peers.py);
    record with val figure and learned flag. The PDEBench recipe trains without EMA or clipping."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from ups_lightning.atomic import atomic_write_json
    from ups_lightning.bench.peers import PEERS, PeerModule, TrajectoryData, count_params
    from ups_lightning.errors import UserError
    from ups_lightning.training import build_trainer

    label, _, build = PEERS[method]
    settings = b.checked["peers"][method]
    tcfg = b.base_cfg.copy()
    if recipe == "pdebench":
        tcfg.optim.ema.enabled = False
        tcfg.optim.grad_clip = None
    optim = OmegaConf.to_container(tcfg.optim, resolve=True)
    done = run_dir / "done.json"
    fp = _fingerprint({"method": method, "recipe": recipe, "settings": settings.as_dict(), "lr": lr,
                       "seed": seed, "budget_min": budget_min, "relative_loss": b.checked["relative_loss"],
                       "data": OmegaConf.to_container(b.data_cfg, resolve=True), "optim": optim})
    L.seed_everything(seed, workers=True, verbose=False)
    net = build(b.n_given, b.meta.n_channels, settings)
    module = PeerModule(net, lr, optim, b.checked["relative_loss"], t_train=settings.t_train,
                        grad_frames=settings.grad_frames, recipe=recipe)
    if b.checked["reuse"] and done.is_file():
        record = json.loads(done.read_text())
        ckpt = (run_dir / str(record.get("best_ckpt"))).resolve()
        if record.get("fingerprint") == fp and ckpt.is_file() and run_dir.resolve() in ckpt.parents:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)   # data, never code
            module.load_state_dict(state["state_dict"])
            b.say(f"{method}: reusing {run_dir} ({recipe}, lr {lr:g}, seed {seed})")
            return {**record, "handle": module.net}
    shutil.rmtree(run_dir, ignore_errors=True)
    tcfg.stages.peer = {"max_epochs": settings.max_epochs, "max_minutes": budget_min, "lr": lr,
                        "batch_size": settings.batch_size}
    trainer = build_trainer(tcfg, "peer", run_dir)
    data = TrajectoryData(b.split["train"], b.split["val"], settings.batch_size, settings.val_batch_size)
    b.say(f"{method}: training ({recipe}) lr {lr:g} seed {seed} for {budget_min:g} min -> {run_dir}")
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    score = trainer.checkpoint_callback.best_model_score
    best_val = float(score) if score is not None else math.nan
    if not trainer.checkpoint_callback.best_model_path or not math.isfinite(best_val):
        raise UserError(f"{method} ({recipe}, lr {lr:g}, seed {seed}) diverged or wrote no checkpoint in "
                        f"{run_dir} (best validation nRMSE {best_val}); nothing of it is scored.")
    best = Path(trainer.checkpoint_callback.best_model_path)
    state = torch.load(best, map_location="cpu", weights_only=True)   # data, never code
    module.load_state_dict(state["state_dict"])
    trivial = float(trainer.callback_metrics["val/nrmse_persistence"])
    record = {"method": method, "label": label, "recipe": recipe, "fingerprint": fp, "lr": lr, "seed": seed,
              "budget_min": budget_min, "train_s": wall, "epochs": trainer.current_epoch,
              "optimizer_steps": trainer.global_step, "best_val_nrmse": best_val,
              "trivial_val_nrmse": trivial, "learned": best_val < trivial, "params": count_params(net),
              "best_ckpt": str(best.resolve().relative_to(run_dir.resolve())),
              "num_threads": torch.get_num_threads(), "settings": settings.as_dict()}
    if not record["learned"]:
        log.warning("%s (%s, lr %g, seed %d) STOPPED BEFORE IT LEARNED ANYTHING: best val nRMSE %.4g does not "
                    "beat persistence's %.4g after %d epochs (%d optimizer steps in %.0f s)", method, recipe, lr,
                    seed, best_val, trivial, trainer.current_epoch, trainer.global_step, wall)
    atomic_write_json(done, record)
    return {**record, "handle": module.net}


#: our rollout's guard settings: "no guard" neither projects nor re-encodes (a pure latent rollout
#: decoded for scoring); "guard" re-encodes every decoded, projected state
OURS_GUARD = {False: ("guard.reencode=false", "guard.invariants=false"),
              True: ("guard.reencode=true", "guard.invariants=true")}


def _evaluate_ours(b: Bench, run_dir: Path, split: str, guard: bool) -> Dict[str, Any]:
    from ups_lightning.evaluation import evaluate

    ecfg = compose_config("evaluate", [f"run_dir={run_dir}", "ttc=off", "upto=operator", f"split={split}",
                                       *OURS_GUARD[guard]])
    ecfg.leaderboard = str(b.cfg.leaderboard if split == "test" else b.out / "val_leaderboard.csv")
    ecfg.html = str(b.cfg.html if split == "test" else b.out / "val_leaderboard.html")
    ecfg.batch_size = b.checked["eval_batch_size"]
    ecfg.n_show = 0 if split != "test" else ecfg.n_show
    ecfg.note = f"bench budget_min={b.checked['budget_min']:g} guard={guard}"
    if b.checked["threads"]:
        ecfg.num_threads = b.checked["threads"]
    return evaluate(ecfg)


def _train_ours(b: Bench, recipe: str, lr: float, seed: int, budget_min: float, run_dir: Path,
                share_autoencoder: Optional[Path] = None) -> Dict[str, Any]:
    """Train (or reuse: finished stages of the same config are skipped) autoencoder + operator; the
    learning-rate trials of one seed and budget use the first trial's autoencoder by reference
    (reuse_runs), so they differ in the operator's learning rate alone. ``train_s`` is everything
    before ours can predict: both stages' preparation (the latent cache) and fits."""
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
    return {"method": "ours", "label": _label(b, "ours"), "recipe": recipe, "lr": lr, "seed": seed,
            "budget_min": budget_min,
            "train_s": sum(float(r["wall_clock_s"]) + float(r.get("prep_s") or 0.0) for r in records.values()),
            "best_val_nrmse": val["nrmse"], "learned": learned, "params": val["params"],
            "stage_learned": {k: r.get("learned") for k, r in records.items()},
            "epochs": {k: r.get("epochs") for k, r in records.items()}, "handle": run_dir}


def _score(b: Bench, method: str, handle: Any, guard: bool, split: str = "test") -> Dict[str, Any]:
    """One trained model's figures on ``split``, with or without the guard."""
    from ups_lightning.bench.peers import predict_peer

    if method == "ours":
        r = _evaluate_ours(b, handle, split, guard)
        return {**{k: r.get(k) for k in METRIC_KEYS}, "rollout_ms_per_traj": r["rollout_ms_per_traj"],
                "leaderboard_run_id": r["run_id"]}
    project = (lambda u, given: b.spec.project(u, given)) if guard else None
    pred, wall = predict_peer(handle, b.split[split], b.n_given, batch=b.checked["eval_batch_size"], project=project)
    m = b.score(pred, split)
    return {**{k: m.get(k) for k in METRIC_KEYS}, "rollout_ms_per_traj": 1000.0 * wall / len(pred)}


def _label(b: Bench, method: str) -> str:
    from ups_lightning.bench.peers import PEERS

    return f"ours ({b.cfg.model.name})" if method == "ours" else PEERS[method][0]


def _train(b: Bench, method: str, recipe: str, lr: float, seed: int, budget_min: float, run_dir: Path,
           **kw: Any) -> Dict[str, Any]:
    """One model; a model that fails (diverges: non-finite validation or weights) is recorded as
    failed (val nRMSE inf, never scored) instead of ending the benchmark: a learning rate too high
    for one method is a result of its search, not an error."""
    from ups_lightning.errors import UserError

    try:
        if method == "ours":
            rec = _train_ours(b, recipe, lr, seed, budget_min, run_dir, **kw)
        else:
            rec = _train_peer(b, method, recipe, lr, seed, budget_min, run_dir)
    except UserError as exc:
        log.warning("%s (%s) lr %g seed %d failed: %s", method, recipe, lr, seed, exc)
        rec = {"method": method, "label": _label(b, method), "recipe": recipe, "lr": lr, "seed": seed,
               "budget_min": budget_min, "train_s": math.nan, "best_val_nrmse": math.inf, "learned": False,
               "failed": str(exc), "handle": None}
    rec["run_dir"] = str(run_dir)
    return rec


class Models:
    """Trains (or reuses) the benchmark's models by (method, recipe, lr, seed, budget), keeping every
    record: the search's trials, the seeds and the learning curves read the same models."""

    def __init__(self, b: Bench) -> None:
        self.b, self.records = b, {}
        self._autoencoders: Dict[tuple, Path] = {}

    def __call__(self, method: str, recipe: str, lr: float, seed: int, budget_min: float) -> Dict[str, Any]:
        key = (method, recipe, float(lr), int(seed), round(float(budget_min), 6))
        if key not in self.records:
            rd = self.b.out / "runs" / _run_name(method, recipe, budget_min, lr, seed)
            kw = {}
            share = self._autoencoders.get((seed, key[-1]))
            if method == "ours" and share is not None:
                kw["share_autoencoder"] = share
            rec = _train(self.b, method, recipe, lr, seed, budget_min, rd, **kw)
            if method == "ours" and rec["handle"] is not None:
                self._autoencoders.setdefault((seed, key[-1]), rd)
            self.records[key] = rec
        return self.records[key]


def _val_both_ways(b: Bench, rec: Dict[str, Any]) -> Dict[bool, float]:
    """The model's validation nRMSE with and without the guard (what the guard is chosen on)."""
    if rec.get("handle") is None:
        return {False: math.nan, True: math.nan}
    return {g: float(_score(b, rec["method"], rec["handle"], g, split="val")["nrmse"]) for g in (False, True)}


def choose_guard(val: Sequence[Dict[bool, float]]) -> bool:
    """The guard setting with the lower mean validation nRMSE over a method's seeds (ties: no
    guard); only validation figures are read."""
    from ups_lightning.bench.report import mean_std

    def mean(g: bool) -> float:
        m = mean_std([x[g] for x in val])[0]     # over the finite figures; none: never chosen
        return m if math.isfinite(m) else math.inf

    return mean(True) < mean(False)


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
        val = [_val_both_ways(b, r) for r in recs]
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
            m = _score(b, method, rec["handle"], guard)
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
                    m = _score(b, method, rec["handle"], c["guard"]) if rec["handle"] is not None else {"nrmse": math.nan}
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
    results = run_methods(b)
    curves = run_curves(b, results) if checked["curve_budgets"] else []
    load_end = os.getloadavg()
    header = (f"# Benchmark: {Path(view.path).name}, {meta.n_x} x {meta.n_t} after reduction, "
              f"{len(test)} test trajectories ({view.split_source}), {steps} predicted frames\n\n"
              f"budget_min={checked['budget_min']:g} per learned model (one clock: everything before it "
              f"can predict); search rungs {list(checked['search'].rungs)} of it; seeds {checked['seeds']}; "
              f"git {git_commit()}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, torch threads {threads}; "
              f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
              f"{time.perf_counter() - t0:.0f} s in all")
    published = [p for p in b.spec.published if p.applies(b.params)]
    paths = write_bench_summary(cfg.out_dir, results, fixed, solver_rows, header=header,
                                common={"budget_min": checked["budget_min"], "n_test": len(test), "steps": steps,
                                        "data_path": str(view.path), "pde": view.pde},
                                curves=curves, published=published)
    say("\n" + paths["md"].read_text())
    say(f"bench: {time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return {"results": results, "fixed": fixed, "curves": curves, "paths": paths}
