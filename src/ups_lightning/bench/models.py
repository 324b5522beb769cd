"""Training and scoring one model of one method (ours, or a peer under a recipe), and ``Models``,
which trains or reuses the benchmark's models by (method, recipe, lr, seed, budget)."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ups_lightning.bench.context import Bench, _fingerprint, _tag, compose_train_config
from ups_lightning.bench.settings import METRIC_KEYS
from ups_lightning.config import compose_config

__all__ = ["Models", "OURS_GUARD", "choose_guard"]

log = logging.getLogger("ups_lightning.bench")


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
    from ups_lightning.bench.peers import PEERS, PeerModule, TrajectoryData, count_params, with_batch_size
    from ups_lightning.errors import UserError
    from ups_lightning.training import build_trainer

    _, _, build = PEERS[method]
    label = _label(b, method)
    space = tuple(b.meta.spatial_shape)
    settings = with_batch_size(b.checked["peers"][method], len(space))
    tcfg = b.base_cfg.copy()
    if recipe == "pdebench":   # its authors train to the end and keep the best on validation:
        tcfg.optim.ema.enabled = False   # no EMA, no clipping, no early stop (which ended a 40-min
        tcfg.optim.grad_clip = None      # FNO at 29.5 min on noisy validation: issue 22)
        tcfg.callbacks.early_stopping = None
    optim = OmegaConf.to_container(tcfg.optim, resolve=True)
    done = run_dir / "done.json"
    fp = _fingerprint({"method": method, "recipe": recipe, "settings": settings.as_dict(), "lr": lr,
                       "seed": seed, "budget_min": budget_min, "relative_loss": b.checked["relative_loss"],
                       "data": OmegaConf.to_container(b.data_cfg, resolve=True), "optim": optim,
                       "early_stopping": OmegaConf.to_container(tcfg.callbacks, resolve=True).get("early_stopping")})
    L.seed_everything(seed, workers=True, verbose=False)
    from ups_lightning.pdes import get_pde

    net = build(b.n_given, b.meta.n_channels, settings, spatial_shape=space if len(space) > 1 else None,
                periodic=get_pde(b.meta.pde).boundary == "periodic")
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
    # learned: the peers' criterion, the rollout against persistence's on validation. The stages' own
    # flags are kept beside: in 2D the operator's decoded one-step error sits on the autoencoder's
    # reconstruction error, above one-step persistence, while its rollout beats persistence's
    trivial = b.persistence_nrmse("val")
    for name, r in records.items():
        if r.get("learned") is False:
            b.say(f"ours: stage {name} did not beat its own trivial reference (val {r['best_val_nrmse']:.4g} vs "
                  f"{r['trivial_metric']} {r['trivial_val_nrmse']:.4g})")
    return {"method": "ours", "label": _label(b, "ours"), "recipe": recipe, "lr": lr, "seed": seed,
            "budget_min": budget_min,
            "train_s": sum(float(r["wall_clock_s"]) + float(r.get("prep_s") or 0.0) for r in records.values()),
            "best_val_nrmse": val["nrmse"], "trivial_val_nrmse": trivial, "learned": val["nrmse"] < trivial,
            "params": val["params"],
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

    return f"ours ({b.cfg.model.name})" if method == "ours" else PEERS[method][0].format(dims=len(b.meta.spatial_shape))


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
