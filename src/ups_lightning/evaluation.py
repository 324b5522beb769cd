"""Evaluation, as a library: ``evaluate(cfg)`` scores a finished run (``python -m
ups_lightning.evaluate run_dir=DIR [data.path=FILE] [ttc=off|default|lookahead]`` is its command line).

The evaluation contract of benchmark.md: given the first `initial_step` frames of each test
trajectory, roll the surrogate out autoregressively from the last given frame (no teacher forcing),
decode, de-normalise and score every predicted frame in physical space, beside persistence and the
reference solver on the same frames. Appends one row to the leaderboard and redraws its HTML page.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ups_lightning.atomic import check_writable_dir
from ups_lightning.artifacts import (DONE, check_carried_networks, load_snapshots, load_stage, read_record, record_config, stage_dir,
                                     train_command, verified_chain)
from ups_lightning.config import validate_eval_config
from ups_lightning.data.datamodule import check_frames, member_configs, resolve_params, unit_coords
from ups_lightning.data.pdebench import load_manifest, open_dataset, open_file, split_options
from ups_lightning.errors import UserError, command
from ups_lightning.progress import progress_bar
from ups_lightning.provenance import git_commit, package_version, scored
from ups_lightning.eval import leaderboard as lb
from ups_lightning.eval.metrics import all_metrics, nrmse_pdebench, nrmse_per_frame
from ups_lightning.inference.rollout import Guard, Physics, Surrogate, ensemble_rollout, rollout, ttc_rollout
from ups_lightning.inference.ttc import TTCConfig
from ups_lightning.runtime import configure_cpu
from ups_lightning.stages import STAGE_ORDER, chain, get_stage, with_role

log = logging.getLogger("ups_lightning.evaluation")

# metrics copied to the leaderboard for every method, prefixed by the method's name
PER_METHOD = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "brmse", "correlation_horizon",
              "ms_per_traj")


# Evaluation finds stages by what they do (their ``role``), never by name: the plain rollout is the
# stepper stage's (its row is named after it), the corrected rows the correctors'.
STEPPER = with_role("stepper")[0]
#: corrector (its ``corrector`` name in the evaluate settings: teacher, student) -> its stage
CORRECTOR_STAGES = {get_stage(n).corrector: n for n in with_role("corrector")}


def networks_upto(last: Optional[str] = None) -> List[str]:
    """The networks (module attributes) of the stages up to ``last`` (what its rollout runs), or of
    every registered stage."""
    return [net for n in (STAGE_ORDER if last is None else chain(last)) for net in get_stage(n).trains]


def load_run(run_dir: Path, stage: Optional[str] = None) -> tuple:
    """(training config, verified records, module) of the chain up to `stage` (default: the last
    finished stage). The config is the one the evaluated stage was trained under, from its record,
    so a row's settings always describe the model it scores (artifacts.verified_chain)."""
    if not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir}: no such directory. Pass the directory a `{command('ups_lightning.train')} "
                        "... stage=all` run wrote (by default outputs/runs/<data>/<model>).")
    cfg_path = run_dir / "config.yaml"
    try:
        saved_cfg = OmegaConf.load(cfg_path) if cfg_path.is_file() else None
    except Exception:  # an unreadable config.yaml only costs the suggested command its names
        saved_cfg = None
    fix = train_command(run_dir, saved_cfg)
    finished = [name for name in STAGE_ORDER if (stage_dir(run_dir, name) / DONE).exists()]
    if STEPPER not in finished or (stage is not None and stage not in finished):
        want = stage or STEPPER
        raise UserError(
            f"run_dir={run_dir} has no finished {want} stage (finished: {finished or 'none'}); an "
            f"evaluation needs at least the stages up to the {STEPPER} "
            f"({', '.join(chain(STEPPER))}). Train them with: {fix}")
    last = stage or finished[-1]
    records = verified_chain(run_dir, last, fix)
    train_cfg = record_config(records[last], stage_dir(run_dir, last) / DONE)
    train_cfg.run_dir = str(run_dir)
    module = load_stage(run_dir, last, records[last], fix)
    check_carried_networks(run_dir, records, module, fix)
    return train_cfg, records, module


def snapshot_modules(run_dir: Path, records: Dict[str, Any], module: Any) -> List[tuple]:
    """[(epoch, module)] of the stepper's snapshots the run saved (``stages.<stepper>.snapshot_every``),
    latest first: copies of ``module`` with the snapshot's stepper weights (the one-run TTC members
    of issue 21: the same encoder, earlier points of the same training). A snapshot holding the
    module's own stepper weights (the best checkpoint's epoch) is left out: it would repeat it."""
    import copy

    net = get_stage(STEPPER).trains[0]
    own = getattr(module, net).state_dict()
    out = []
    for epoch, state in sorted(load_snapshots(run_dir, STEPPER, records[STEPPER]).items(), reverse=True):
        if state.keys() == own.keys() and all(torch.equal(state[k], own[k]) for k in own):
            continue
        m = copy.deepcopy(module)
        getattr(m, net).load_state_dict(state)
        out.append((epoch, m.eval()))
    return out


@dataclass
class EvalData:
    """The trajectories an evaluation scores: a file's rows (a split, or all) and its grid."""

    path: str
    meta: Any
    fields: torch.Tensor   # (n, T, X, C) physical units
    split: str
    check_rows: Optional[np.ndarray] = None   # a few training rows: which equation form the file follows (file_physics)


def pinned_data(records: Dict[str, Any], pde: str) -> Optional[Dict[str, Any]]:
    """The pin (data/pin.py) of the data the evaluated stages were trained on, for equation ``pde``
    (None for runs trained before pins existed)."""
    for rec in reversed(list(records.values())):
        pin = (rec or {}).get("data_pin") or {}
        if pde in pin:
            return pin[pde]
    return None


def eval_data(d: DictConfig, path: Optional[str], split: Optional[str],
              pin: Optional[Dict[str, Any]] = None) -> EvalData:
    """The evaluated rows: the data config ``d``'s own file by default (one file of one equation: a
    single-equation run's data config or a member of a mixed one), or `path` read with its reduction
    and equation. A split uses the config's split sizes (or the manifest's, for another file with
    one); `all` takes every row. The default is `test`, or `all` for another file without a manifest
    that is smaller than the config's splits. The caller checks that the file fits the model.
    ``pin``: the training data's pin; the run's own data is then read from where training read it
    (a relative data.path means the same file from any directory) and must still be that data."""
    if pin and path is None and Path(pin["path"]).is_file():
        d = d.copy()
        d.path = pin["path"]
    own = path is None or Path(path).resolve() == Path(d.path).resolve()
    path = str(d.path if path is None else path)
    if not Path(path).is_file():
        raise UserError(f"data.path={path}: no such file.")
    manifest = None if own else load_manifest(path)
    if split is None:   # another file smaller than the run's splits, without a manifest: every row
        split = "test"
        if not own and manifest is None:
            with open_file(path, d.reduced_resolution, d.reduced_resolution_t, d.pde) as f:
                if f.meta.n_samples < d.n_train + d.n_val + d.n_test:
                    split = "all"
                    log.info("%s has %d rows, fewer than the run's splits: scoring all of them",
                             path, f.meta.n_samples)
    if split == "all":
        with open_file(path, d.reduced_resolution, d.reduced_resolution_t, d.pde) as f:
            rows = f.read(slice(None))
            return EvalData(path, f.meta, torch.from_numpy(rows).float(), split, rows[:CHECK_ROWS])
    sizes = {"n_train": d.n_train, "n_val": d.n_val, "n_test": d.n_test}
    if manifest is not None:   # another file with its own splits
        sizes = {f"n_{s}": r["stop"] - r["start"] for s, r in manifest["splits"].items()
                 if s in ("train", "val", "test")}
        sizes["n_train"] = max(1, sizes.get("n_train", 1))
    try:
        # the run's split layout; another file's manifest (its frozen splits) rules over it
        layout = split_options(d) if manifest is None else {}
        view = open_dataset(path, reduced_resolution=d.reduced_resolution,
                            reduced_resolution_t=d.reduced_resolution_t, pde=d.pde, **sizes, **layout)
    except UserError as exc:
        raise UserError(f"{exc} To score every row of {path} instead, pass split=all.") from None
    if own and pin:
        from ups_lightning.data.pin import pin_mismatch, view_pin

        what = pin_mismatch(pin, view_pin(view))
        if what:
            raise UserError(f"{path} is not the data this run was trained on ({pin['path']}): {what}. Its "
                            f"'{split}' rows would not be the ones the run held out; restore the file and its "
                            "manifest, or score another file with data.path=FILE (its own splits) or split=all.")
    check = view.read("train", rows=slice(0, CHECK_ROWS)) if "train" in view.splits else None
    return EvalData(path, view.meta, torch.from_numpy(view.read(split)).float(), split, check)


def eval_member(train_cfg: DictConfig, path: Optional[str]) -> DictConfig:
    """The run's data config of the file to score: the one file of a single-equation run; for a
    mixed run, the member of the named file's equation (every member when ``path`` is None is the
    caller's loop)."""
    members = member_configs(train_cfg.data)
    if path is None or len(members) == 1:
        return next(iter(members.values()))
    with open_file(path) as f:     # the file says which equation it holds
        pde = f.pde
    if pde not in members:
        raise UserError(f"{path} holds {pde} data; the run in {train_cfg.run_dir} was trained on "
                        f"{', '.join(members)}.")
    return members[pde]


def check_fits_model(data: EvalData, train_cfg: DictConfig, module: Any) -> None:
    """The model can only score data on its own grid, of its equations, with frames to predict."""
    contract = module.contract
    if data.meta.pde not in contract.pdes:
        raise UserError(f"{data.path}: {data.meta.pde} data, but the model in {train_cfg.run_dir} was "
                        f"trained on {', '.join(contract.pdes)}.")
    if tuple(data.meta.spatial_shape) != tuple(contract.spatial_shape):
        raise UserError(f"{data.path}: {' x '.join(map(str, data.meta.spatial_shape))} cells after "
                        f"reduced_resolution={data.meta.reduced_resolution}, but the model in {train_cfg.run_dir} "
                        f"was trained on {tuple(contract.spatial_shape)}; evaluate it on a file with the "
                        f"same grid.")
    if data.meta.n_channels != contract.channels(data.meta.pde):
        raise UserError(f"{data.path}: {data.meta.n_channels} channel(s), the model has "
                        f"{contract.channels(data.meta.pde)} for {data.meta.pde}.")
    check_frames(data, int(train_cfg.data.initial_step))
    if len(data.fields) == 0:
        raise UserError(f"{data.path}: split {data.split!r} has no rows to score.")


def rollout_frames(fields: torch.Tensor, n_given: int) -> tuple:
    """(the last given frame u0, the frames to predict) of trajectories (n, T, X, C)."""
    return fields[:, n_given - 1], fields[:, n_given:]   # u0: all the rollout ever sees


CHECK_ROWS = 4   # rows the equation's form is checked on (pdes.fit)


def file_physics(data: EvalData, member: DictConfig) -> Physics:
    """The equation, parameters and spacings of the scored file (parameters as the file states
    them, the member config's only for ones it does not), on the domain its frames follow: checked
    on a few of its training rows (pdes.fit: the file's own coordinates for every file this project
    writes, another domain where the spec knows a released layout that follows it), or a UserError
    if none fits."""
    from ups_lightning.pdes import get_pde
    from ups_lightning.pdes.fit import fit_domain

    meta = data.meta
    params = resolve_params(meta, member.get("params"), "data")
    rows = data.check_rows if data.check_rows is not None else data.fields[:CHECK_ROWS].numpy()
    # the last interval between given frames: the check reads no frame a rollout may not read
    fit = fit_domain(get_pde(meta.pde), params, rows, meta.dt, meta.domain_length, str(data.path),
                     k=max(0, min(int(member.initial_step) - 2, rows.shape[1] - 2)))
    if fit.domain_length != meta.domain_length:
        log.info("%s follows %s (domain length %g; misses %s): the solver, its rewards and the guard use it",
                 data.path, fit.label, fit.domain_length, fit.describe())
    return Physics(pde=meta.pde, params=params, dx=fit.domain_length / meta.n_x, dt=meta.dt,
                   domain_length=fit.domain_length)


def build_surrogate(train_cfg: DictConfig, module: Any, data: Any, physics: Physics, guard: Guard) -> Surrogate:
    """The run's module as a Surrogate on the grid and conditioning of `data`."""
    cond = module.contract.conditioning(physics.pde, physics.params, physics.dt)
    steps = {f"{c}_steps": train_cfg.stages[n][get_stage(n).steps_setting] for c, n in CORRECTOR_STAGES.items()}
    return Surrogate(module, unit_coords(data), cond, guard=guard, pde=physics.spec,
                     fields=module.contract.channels(physics.pde), **steps)


def build_proposer(candidates: Any, sur: Surrogate, physics: Physics, view_of: Any,
                   generator: Optional[torch.Generator] = None, run_dir: Optional[Path] = None) -> tuple:
    """(proposer, parameters of the extra members, their training wall-clock s) of TTC candidate settings (``ttc.candidates``: members,
    snapshots, perturb, corrector, corrector_scale, mean) around ``sur``; each member run is loaded
    through the verified chain and must fit the data. A member named twice, or the evaluated run
    (``run_dir``) named as a member, is refused: it would only repeat candidates and count its
    parameters again. ``snapshots``: the evaluated run's own latest stepper snapshots join as members
    (the same encoder; only their steppers' parameters are extra)."""
    from ups_lightning.inference.candidates import Proposer

    named = [Path(p).resolve() for p in candidates.members]
    own = [] if run_dir is None else [Path(run_dir).resolve()]
    repeated = sorted({str(p) for i, p in enumerate(named) if p in named[:i] or p in own})
    if repeated:
        raise UserError(f"ttc.candidates.members names {', '.join(repeated)} more than once (or names the "
                        "evaluated run itself, which is always the first member): each member must be "
                        "another trained run, e.g. another seed.")
    members, extra_params, extra_train_s = [sur], 0, 0.0
    for path in candidates.members:
        m_cfg, m_records, m_module = load_run(Path(path))
        extra_train_s += sum(r.get("wall_clock_s") or 0.0 for r in m_records.values())
        check_fits_model(view_of, m_cfg, m_module)
        members.append(build_surrogate(m_cfg, m_module, view_of, physics, sur.guard))
        extra_params += sum(p.numel() for part in networks_upto(STEPPER) if hasattr(m_module, part)
                            for p in getattr(m_module, part).parameters())
    n_snap = int(candidates.get("snapshots") or 0)
    if n_snap:
        if run_dir is None:
            raise UserError("ttc.candidates.snapshots needs the evaluated run's directory (run_dir).")
        # the evaluated run is already loaded and verified (sur): only its stepper record is read again
        snaps = snapshot_modules(Path(run_dir), {STEPPER: read_record(run_dir, STEPPER) or {}}, sur.m)
        if len(snaps) < n_snap:
            raise UserError(f"ttc.candidates.snapshots={n_snap}: {run_dir} holds {len(snaps)} {STEPPER} snapshot(s) "
                            f"besides its best {STEPPER}. Train its {STEPPER} with stages.{STEPPER}.snapshot_every=1 "
                            "(a snapshot every epoch) or ask for fewer.")
        net = get_stage(STEPPER).trains[0]
        for _, m in snaps[:n_snap]:
            members.append(sur.with_module(m))
            extra_params += sum(p.numel() for p in getattr(m, net).parameters())
    proposer = Proposer(members, perturb=float(candidates.perturb), corrector=candidates.corrector,
                        corrector_scale=float(candidates.corrector_scale), mean=bool(candidates.mean),
                        generator=generator)
    return proposer, extra_params, extra_train_s


def build_search(ttc: DictConfig, sur: Surrogate, physics: Physics, view_of: Any,
                 generator: Optional[torch.Generator] = None, run_dir: Optional[Path] = None) -> tuple:
    """(proposer, reward, parameters of the extra members, their training s) of the TTC settings ``ttc``."""
    from ups_lightning.inference.rewards import load_verifier, make_reward

    proposer, extra_params, extra_train_s = build_proposer(ttc.candidates, sur, physics, view_of, generator, run_dir)
    verifier = load_verifier(ttc.reward.verifier) if ttc.reward.name == "verifier" and ttc.reward.verifier else None
    weights = OmegaConf.to_container(ttc.reward.weights)
    reward = make_reward(ttc.reward.name, physics, cells=ttc.reward.cells, weights=weights, verifier=verifier)
    return proposer, reward, extra_params, extra_train_s


def _timed(what: str, fn: Callable[[], Any]) -> tuple:
    """fn's result and its wall time, with the mode's start and duration in the log."""
    log.info("%s: started", what)
    start = time.perf_counter()
    out = fn()
    took = time.perf_counter() - start
    log.info("%s: done in %.1f s", what, took)
    return out, took


def _batched(what: str, fn: Callable[[torch.Tensor], torch.Tensor], u0: torch.Tensor, batch: int,
             dim: int = 0, bar: str = "none") -> torch.Tensor:
    """fn over batches of u0, concatenated; progress per batch in the log when there are several,
    and on a bar over the trajectories (``bar``: progress.PROGRESS_BARS)."""
    n_batches = -(-len(u0) // batch)
    out, start = [], time.perf_counter()
    shown = progress_bar(what, len(u0), "traj", bar)
    for k, i in enumerate(range(0, len(u0), batch), 1):
        out.append(fn(u0[i : i + batch]))
        shown.update(min(batch, len(u0) - i))
        if n_batches > 1:
            log.info("%s: batch %d/%d (%d trajectories) after %.1f s", what, k, n_batches,
                     min(i + batch, len(u0)), time.perf_counter() - start)
    shown.close()
    return torch.cat(out, dim=dim)


def _ttc_baselines(cfg: DictConfig, sur: Surrogate, proposer: Any, reward: Any, tcfg: TTCConfig, u0: torch.Tensor,
                   steps: int, preds: Dict[str, torch.Tensor], walls: Dict[str, float], extra: Dict[str, Any],
                   member: DictConfig, n_given: int) -> None:
    """The rows beside a TTC row (inference/baselines.py): its candidates averaged, its members'
    rollouts averaged (two or more members), and the solver hybrid on its reward's solver (a
    consistency reward), whose blend weight is chosen on the validation split unless fixed."""
    from ups_lightning.inference import baselines as bl
    from ups_lightning.inference.ttc import plan

    B, k = cfg.batch_size, plan(tcfg).n_first
    preds["candidates_mean"], walls["candidates_mean"] = _timed("candidates' mean", lambda: _batched(
        "candidates' mean", lambda u: bl.candidates_mean_rollout(proposer, u, steps, k), u0, B, bar=cfg.progress_bar))
    if len(proposer.members) > 1:
        # the first member's rollout is the stepper's row: its frames are reused, its time counted
        preds["members_mean"], wall = _timed("members' rollouts", lambda: _batched(
            "members' rollouts", lambda idx: bl.members_mean_rollout(
                proposer.members, u0[idx], steps, first=preds[STEPPER][idx]), torch.arange(len(u0)), B,
            bar=cfg.progress_bar))
        walls["members_mean"] = walls[STEPPER] + wall
    if not reward.solver_cells:
        return
    cells = reward.solver_cells

    def hybrid(weight: float, u: torch.Tensor, n_steps: int = steps) -> torch.Tensor:
        return bl.solver_hybrid_rollout(sur, u, n_steps, reward.solve, cells, weight)

    weight = cfg.baselines.hybrid_weight
    extra["solver_hybrid_weight_chosen_on"] = "setting (baselines.hybrid_weight)"
    if weight is None:   # chosen on validation, never on the scored split
        try:
            val = eval_data(member, cfg.data.path, "val")
        except UserError as exc:
            log.warning("solver hybrid skipped: its blend weight is chosen on the validation split, and %s "
                        "Set baselines.hybrid_weight to a fixed weight instead.", exc)
            return
        v0, v_truth = rollout_frames(val.fields, n_given)

        def val_nrmse(w: float) -> float:
            pred = _batched("solver hybrid (validation)", lambda u: hybrid(w, u, v_truth.shape[1]), v0, B,
                            bar=cfg.progress_bar)
            return float(nrmse_per_frame(pred, v_truth).mean())

        weight, scores = bl.choose_weight(val_nrmse, list(cfg.baselines.hybrid_weights))
        extra["solver_hybrid_weight_chosen_on"] = f"val ({len(v0)} trajectories)"
        extra["solver_hybrid_val_nrmse"] = json.dumps(scores)
        log.info("solver hybrid: blend weight %.2f chosen on validation (nRMSE by weight: %s)", weight, scores)
    extra["solver_hybrid_weight"] = float(weight)
    preds["solver_hybrid"], walls["solver_hybrid"] = _timed("solver hybrid", lambda: _batched(
        "solver hybrid", lambda u: hybrid(float(weight), u), u0, B, bar=cfg.progress_bar))


def _scored_corrector(setting: Any, corrector: Optional[str], records: Dict[str, Any]) -> Optional[str]:
    """The corrector whose corrected and ensemble rows are scored, or None. ``corrector_rows``: true
    always, false never, auto only when the corrector's stage learned (its record: it beat doing
    nothing on validation). A corrector that did not learn only adds minutes and rows far worse
    than the plain rollout (issue 21); TTC's own corrector candidates are set by ``ttc`` alone."""
    if corrector is None or setting is False:
        return None
    stage = CORRECTOR_STAGES[corrector]
    if setting == "auto" and (records.get(stage) or {}).get("learned") is False:
        log.info("corrected and ensemble rows skipped: the %s stage did not learn (its record), so a "
                 "%s-corrected rollout cannot help; corrector_rows=true scores them anyway", stage, corrector)
        return None
    return corrector


def _skips_corrector_search(cfg: DictConfig, records: Dict[str, Any], extra: Dict[str, Any]) -> bool:
    """Under ``corrector_rows=auto`` a search whose extra candidates are draws of a corrector that did
    not learn (its stage record: it did not beat the uncorrected step) is not run: its draws
    are worse than the plain step, so it can only cost time (issue 21: ttc=default on eval-small
    gained nothing at 5.7x the cost). ``corrector_rows=true`` runs it anyway."""
    c = cfg.ttc.candidates.corrector
    if not cfg.ttc.enabled or c is None or cfg.corrector_rows != "auto":
        return False
    if (records.get(CORRECTOR_STAGES[c]) or {}).get("learned") is not False:
        return False
    extra["ttc_skipped"] = f"its candidates are {c}-corrector draws and the {CORRECTOR_STAGES[c]} stage did not learn"
    log.warning("TTC skipped: %s (its record); the row is the plain rollout. corrector_rows=true runs the search "
                "anyway; ttc=ensemble with other seeds as members needs no corrector.", extra["ttc_skipped"])
    return True


def evaluate(cfg: DictConfig) -> Any:
    """Score a finished run (one leaderboard row per scored file). A single-equation run, or any run
    with data.path=FILE, gives its row; a mixed run without data.path scores each equation's file and
    gives {equation: row}."""
    cfg = validate_eval_config(cfg)
    configure_cpu(cfg.num_threads, "num_threads")
    run_dir = Path(cfg.run_dir)
    train_cfg, records, module = load_run(run_dir, cfg.upto)
    # everything an evaluation writes, checked before its rollout, not after it
    for where, setting in ((run_dir, "run_dir"), (Path(cfg.leaderboard).parent, "leaderboard"),
                           (Path(cfg.html).parent, "html")):
        check_writable_dir(where, setting)
    members = member_configs(train_cfg.data)
    if cfg.data.path is not None or len(members) == 1:
        return evaluate_file(cfg, train_cfg, records, module, eval_member(train_cfg, cfg.data.path))
    return {pde: evaluate_file(cfg, train_cfg, records, module, member) for pde, member in members.items()}


def evaluate_file(cfg: DictConfig, train_cfg: DictConfig, records: Dict[str, Any], module: Any,
                  member: DictConfig) -> Dict[str, Any]:
    """Roll out, score and record one file of one equation (module doc)."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    pin = pinned_data(records, member.pde)
    data = eval_data(member, cfg.data.path, cfg.split, pin)
    check_fits_model(data, train_cfg, module)
    n_given = int(train_cfg.data.initial_step)
    fields = data.fields
    u0, truth = rollout_frames(fields, n_given)
    steps = truth.shape[1]
    meta = data.meta
    physics = file_physics(data, member)
    sur = build_surrogate(train_cfg, module, data, physics,
                          Guard(reencode=bool(cfg.guard.reencode), invariants=bool(cfg.guard.invariants)))
    corrector = cfg.corrector if cfg.corrector in sur.correctors else (sur.correctors[-1] if sur.correctors else None)
    corrector = _scored_corrector(cfg.corrector_rows, corrector, records)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, B = len(u0), cfg.batch_size
    log.info("evaluating %s (stage %s) on %d trajectories of %s [%s], %d steps, %d threads",
             run_dir, list(records)[-1], n, data.path, data.split, steps, torch.get_num_threads())

    preds: Dict[str, torch.Tensor] = {}
    walls: Dict[str, float] = {}
    extra: Dict[str, Any] = {}
    preds["persistence"] = u0.unsqueeze(1).expand_as(truth).clone()
    walls["persistence"] = 0.0
    t_rel = np.asarray(meta.t[n_given - 1:], dtype=np.float64) - float(meta.t[n_given - 1])
    # the reference solver from the last given frame; from frame 0 where a frame is not a whole state
    start = n_given - 1 if physics.spec.frames_hold_state else 0
    sol, walls["solver"] = _timed("solver", lambda: physics.spec.solve(
        fields[:, start].double().numpy(), physics.params, np.asarray(meta.t[start:], dtype=np.float64)
        - float(meta.t[start]), domain_length=physics.domain_length))
    preds["solver"] = torch.from_numpy(sol[:, n_given - start:]).float()
    bar = cfg.progress_bar
    preds[STEPPER], walls[STEPPER] = _timed(f"{STEPPER} rollout", lambda: _batched(
        f"{STEPPER} rollout", lambda u: rollout(sur, u, steps), u0, B, bar=bar))
    ens = None
    if corrector is not None:
        preds["corrected"], walls["corrected"] = _timed("corrected rollout", lambda: _batched(
            "corrected rollout", lambda u: rollout(sur, u, steps, corrector, cfg.correct_every, gen), u0, B, bar=bar))
        ens, walls["ensemble"] = _timed("ensemble", lambda: _batched(
            "ensemble",
            lambda u: ensemble_rollout(sur, u, steps, cfg.ensemble_members, corrector, cfg.correct_every, gen),
            u0, max(1, B // cfg.ensemble_members), dim=1, bar=bar))
        preds["ensemble"] = ens.mean(0)
    ttc_on = cfg.ttc.enabled and not _skips_corrector_search(cfg, records, extra)
    if ttc_on:
        # a member's cost is its parameters and its whole training (snapshots: none beyond this run's)
        proposer, reward, extra["ttc_member_params"], extra["ttc_member_train_s"] = build_search(
            cfg.ttc, sur, physics, view_of=data, generator=gen, run_dir=run_dir)
        tcfg = TTCConfig(n_candidates=cfg.ttc.n_candidates, beam_width=cfg.ttc.beam_width,
                         horizon=cfg.ttc.horizon, budget=cfg.ttc.budget)
        infos = []
        ttc_bar = progress_bar("TTC", len(u0) * steps, "traj-step", bar)   # the slow mode: by the step

        def run_ttc(u: torch.Tensor) -> torch.Tensor:
            out, info = ttc_rollout(proposer, u, steps, tcfg, reward, on_step=lambda: ttc_bar.update(len(u)))
            infos.append(info)
            return out

        preds["ttc"], walls["ttc"] = _timed("TTC", lambda: _batched("TTC", run_ttc, u0, B))
        ttc_bar.close()
        extra["ttc_evals_per_step"] = float(np.mean([i["evals_per_step"] for i in infos]))
        extra["ttc_operator_step_kept"] = float(np.mean([i["operator_step_kept"] for i in infos]))
        if reward.solver_cells:   # fairness: the reward's solver on its own, from the same given frame
            from ups_lightning.pdes.coarse import solve_on_grid

            n_c = reward.solver_cells
            sol, walls[f"solver_{n_c}"] = solve_on_grid(u0.double().numpy(), n_c, physics.pde, physics.params,
                                                        t_rel, physics.domain_length)
            preds[f"solver_{n_c}"] = torch.from_numpy(sol).float()
        if cfg.baselines.enabled:
            _ttc_baselines(cfg, sur, proposer, reward, tcfg, u0, steps, preds, walls, extra, member, n_given)

    metrics: Dict[str, Dict[str, float]] = {}
    for name, pred in preds.items():
        m = all_metrics(pred, truth, dx=meta.dx, domain_length=meta.domain_length, u0=u0,   # the file's grid
                        ens=ens if name == "ensemble" else None)
        m["ms_per_traj"] = 1000.0 * walls[name] / n
        metrics[name] = m
    headline = "ttc" if ttc_on else STEPPER
    broken = [name for name, m in metrics.items() if name != "solver" and not math.isfinite(m["nrmse"])]
    if broken:   # never a row, a plot or a champion from a model that diverged
        raise UserError(f"the rollout of {run_dir} produced non-finite fields ({', '.join(broken)}: nRMSE "
                        f"{metrics[broken[0]]['nrmse']}); nothing was recorded. Retrain the run's stages or "
                        f"evaluate an earlier stage with upto={STEPPER}.")
    row = _row(cfg, train_cfg, records, module, data, metrics, headline, steps, n, fields, preds, extra, corrector)
    row.update(pde=physics.pde, pde_params=json.dumps(physics.params))
    artifacts = _write_artifacts(run_dir, row["run_id"], preds, truth, meta, cfg.n_show)
    row["artifacts"] = str(artifacts)
    _print_table(metrics, headline, row)
    _record(cfg, row)
    return row


def _row(cfg: DictConfig, train_cfg: DictConfig, records: Dict[str, Any], module: Any, data: EvalData,
         metrics: Dict[str, Dict[str, float]], headline: str, steps: int, n: int, fields: torch.Tensor,
         preds: Dict[str, torch.Tensor], extra: Dict[str, Any], corrector: Optional[str]) -> Dict[str, Any]:
    train_yaml = OmegaConf.to_yaml(train_cfg)
    params = {part: sum(p.numel() for p in getattr(module, part).parameters())
              for part in networks_upto() if hasattr(module, part)}
    used = sum(params.get(part, 0) for part in networks_upto(STEPPER))
    ttc_corrector = cfg.ttc.candidates.corrector if headline == "ttc" else None
    if ttc_corrector:
        used += sum(params.get(part, 0) for part in get_stage(CORRECTOR_STAGES[ttc_corrector]).trains)
    if headline == "ttc":
        used += extra.get("ttc_member_params", 0)
    row: Dict[str, Any] = {
        "run_id": time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "run_dir": str(cfg.run_dir),
        "data_path": str(data.path),
        "split": data.split,
        "n_test": n,
        "steps": steps,
        "git_commit": git_commit(),
        "package_version": package_version(),
        "config_hash": hashlib.sha256(train_yaml.encode()).hexdigest()[:12],
        "model": train_cfg.model.name,
        "dim": int(train_cfg.model.dim),
        "n_tokens": int(train_cfg.model.n_tokens),
        "params": used,
        **{f"params_{k}": v for k, v in params.items()},
        "stages": json.dumps({k: OmegaConf.to_container(train_cfg.stages[k]) for k in records if records[k]}),
        "method": headline,
        "corrector": corrector or "none",
        "ttc": json.dumps(OmegaConf.to_container(cfg.ttc)) if headline == "ttc" else "off",
        "guard": json.dumps(OmegaConf.to_container(cfg.guard)),
        "note": cfg.note,
    }
    row.update(metrics[headline])
    row["rollout_ms_per_traj"] = metrics[headline]["ms_per_traj"]
    row["rollout_ms_per_step"] = metrics[headline]["ms_per_traj"] / steps
    full_pred = torch.cat([fields[:, : fields.shape[1] - steps], preds[headline]], dim=1)
    row["nrmse_pdebench"] = nrmse_pdebench(full_pred, fields, fields.shape[1] - steps)
    for name, m in metrics.items():
        for k in PER_METHOD:
            if k in m:
                row[f"{name}_{k}"] = m[k]
    for k in ("crps", "spread_skill", "coverage_50", "coverage_90", "ece", "coverage_50_nominal",
              "coverage_90_nominal"):
        if "ensemble" in metrics and k in metrics["ensemble"]:
            row[k] = metrics["ensemble"][k]
    row["solver_ms_per_traj"] = metrics["solver"]["ms_per_traj"]
    if "ttc" in metrics:
        from ups_lightning.inference.baselines import BASELINES, credited_gain

        row["ttc_gain_nrmse"] = metrics[STEPPER]["nrmse"] - metrics["ttc"]["nrmse"]
        row["ttc_cost_ratio"] = metrics["ttc"]["ms_per_traj"] / max(metrics[STEPPER]["ms_per_traj"], 1e-9)
        rivals = {k: metrics[k]["nrmse"] for k in metrics if k in BASELINES or k.startswith("solver_")}
        best, gain = credited_gain(metrics["ttc"]["nrmse"], rivals)
        row["ttc_best_baseline"] = best or "none"
        row["ttc_gain_beyond_baselines"] = gain     # the search's own gain: > 0 only if it beats them all
    row.update(extra)
    scored(data.split)   # one model scored on this split (provenance.json counts them)
    for name, rec in records.items():
        if rec:
            row[f"train_s_{name}"] = round(rec["wall_clock_s"], 1)
            row[f"val_nrmse_{name}"] = rec.get("best_val_nrmse")
    last = CORRECTOR_STAGES[ttc_corrector] if ttc_corrector else STEPPER   # the headline uses every stage up to it
    used_stages = chain(last)
    # a stage that never beat its trivial reference: the row can never be champion (leaderboard.check_gates)
    row["not_learned"] = " ".join(n for n in used_stages if (records.get(n) or {}).get("learned") is False)
    if "ttc" in metrics:   # the search's whole training cost: the stages it runs and its members' training
        row["ttc_train_s_total"] = round(sum((records.get(n) or {}).get("wall_clock_s") or 0.0 for n in used_stages)
                                         + extra.get("ttc_member_train_s", 0.0), 1)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return row


def _write_artifacts(run_dir: Path, run_id: str, preds: Dict[str, torch.Tensor], truth: torch.Tensor,
                     meta: Any, n_show: int) -> Path:
    out = run_dir / "eval" / run_id
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: nrmse_per_frame(p, truth).tolist() for name, p in preds.items()}
    (out / "curves.json").write_text(json.dumps(curves))
    model_key = "ttc" if "ttc" in preds else STEPPER
    show = np.linspace(0, len(truth) - 1, max(1, n_show)).round().astype(int)
    axes = {"x": np.asarray(meta.x), **({"y": np.asarray(meta.y)} if len(meta.spatial_shape) == 2 else {})}
    np.savez_compressed(out / "samples.npz", true=truth[show].numpy(), pred=preds[model_key][show].numpy(),
                        t=np.asarray(meta.t[len(meta.t) - truth.shape[1]:]), **axes)
    return out


def _print_table(metrics: Dict[str, Dict[str, float]], headline: str, row: Dict[str, Any]) -> None:
    table = Table(title=f"{row['model']} on {Path(row['data_path']).name} [{row['split']}, {row['n_test']} "
                        f"trajectories, {row['steps']} steps]  headline: {headline}")
    table.add_column("method", justify="right", no_wrap=True, min_width=max(len(m) for m in metrics))
    for col in ("nRMSE", "@1", "@10", "@31", "cRMSE", "corr. horizon", "ms/traj"):
        table.add_column(col, justify="right")
    def at(m: Dict[str, float], k: int) -> str:    # a horizon past the rollout has no figure
        return f"{m[f'nrmse_{k}']:.4f}" if k <= row["steps"] else f"n/a (horizon {row['steps']})"

    for name, m in metrics.items():
        table.add_row(name, f"{m['nrmse']:.4f}", at(m, 1), at(m, 10), at(m, 31), f"{m['crmse']:.2e}",
                      f"{m['correlation_horizon']:.1f}", f"{m['ms_per_traj']:.2f}")
    Console().print(table)
    if "ttc_best_baseline" in row and row["ttc_best_baseline"] != "none":
        gain = row["ttc_gain_beyond_baselines"]
        print(f"TTC beyond the best baseline without search ({row['ttc_best_baseline']}): nRMSE gain {gain:+.4f}"
              + ("" if gain > 0 else " -- the search is not credited with any gain of its own"))


def _record(cfg: DictConfig, row: Dict[str, Any]) -> None:
    """Label against the group's champion and append, under one lock; then redraw the report."""
    gates = lb.GateConfig(**OmegaConf.to_container(cfg.gates))
    written = lb.append_row(cfg.leaderboard, row, gates=gates)
    row.update(label=written["label"], gate_reasons=written.get("gate_reasons", ""))
    lb.write_html(cfg.leaderboard, cfg.html)
    print(f"label: {row['label']} ({row['gate_reasons'] or 'passed the gates or no champion yet'}); "
          f"leaderboard: {cfg.leaderboard}; report: {cfg.html}")
