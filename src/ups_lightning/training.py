"""Training, as a library: ``run(cfg)`` runs the selected stages of a composed training config
(``python -m ups_lightning.train`` is its command line).

Runs the selected stages in order in one run directory (`run_dir`, one per data x model), handing
checkpoints along. A stage whose verified finished checkpoint for the same config already exists is
skipped; a stage killed mid-way resumes from its `last.ckpt` (RNG state included), so a killed pipeline
resumes where it stopped. Records and the trust chain between stages: `ups_lightning.artifacts`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import glob
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import torch
from torch import nn
from lightning.pytorch import callbacks as cb
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ups_lightning.artifacts import (
    DONE, add_reference, drop_reference, init_weights, latents_dir, load_stage, nonfinite_tensors, read_record,
    save_overrides, sha256_file, stage_config_hash, stage_dir, train_command, verify_checkpoint,
)
from ups_lightning.atomic import atomic_write_json, check_writable_dir
from ups_lightning.config import stage_optim, validate_train_config
from ups_lightning.data.pin import pin_mismatch, run_pin
from ups_lightning.data.datamodule import open_run_data, unit_coords
from ups_lightning.errors import UserError
from ups_lightning.runtime import configure_cpu
from ups_lightning.stages import STAGE_ORDER, UPSTREAM, get_stage
from ups_lightning.stages.base import StageModule
from ups_lightning.stages.callbacks import EMA, SNAPSHOTS, EagerValidation, NonFiniteLossStop, RNGState

log = logging.getLogger("ups_lightning.training")

PROGRESS_BARS = {"rich": cb.RichProgressBar, "tqdm": cb.TQDMProgressBar, "none": None}
ATTEMPTS = ".attempts"   # stages in training, one directory per stage and config hash
LOCK = ".lock"           # held while a process trains in the run directory


def finished_record(cfg: DictConfig, name: str, config_hash: str) -> Optional[tuple]:
    """(run directory, record) of stage `name` finished under `config_hash`: held by this run (itself
    or by reference), else by a run of `reuse_runs` (which the caller then references); None if none."""
    for where in [Path(cfg.run_dir), *reusable_runs(cfg)]:
        record = read_record(where, name)
        if record is not None and record["config_hash"] == config_hash:
            return where, record
    return None


def reusable_runs(cfg: DictConfig) -> List[Path]:
    """The run directories of `reuse_runs` (each a path or a glob such as a sweep's `<dir>/*`, expanded
    now, so jobs finished since count), this run itself left out."""
    own = Path(cfg.run_dir).resolve()
    runs: List[Path] = []
    for entry in cfg.reuse_runs or ():
        matches = sorted(Path(m) for m in glob.glob(entry)) if glob.has_magic(entry) else [Path(entry)]
        runs += [m for m in matches if m.is_dir() and m.resolve() != own and m not in runs]
    return runs


def finished_upstream(cfg: DictConfig, name: str, fix: str,
                      links: Optional[Dict[str, Path]] = None) -> Optional[Dict[str, Any]]:
    """The verified record of `name`'s upstream stage for this config (its own upstream verified in
    turn), or a UserError naming what is missing or changed and the command that makes it. Stages
    found in `reuse_runs` rather than in this run go into `links` (stage -> run holding it)."""
    up = UPSTREAM[name]
    if up is None:
        return None
    upstream_of_up = finished_upstream(cfg, up, fix, links)
    expected = stage_config_hash(cfg, up, upstream_of_up)
    found = finished_record(cfg, up, expected)
    if found is None:
        record = read_record(cfg.run_dir, up)
        why = "was not found" if record is None else "was trained with a different config or upstream"
        also = f" (nor in reuse_runs={list(cfg.reuse_runs)})" if cfg.reuse_runs else ""
        raise UserError(
            f"stage '{name}' needs the finished '{up}' stage for data={cfg.data.name} and "
            f"model={cfg.model.name}, but {stage_dir(cfg.run_dir, up) / DONE} {why}{also}. Run every stage "
            f"in order (finished ones are skipped) with: {fix}"
        )
    where, record = found
    verify_checkpoint(where, up, record, fix)
    if links is not None and where != Path(cfg.run_dir):
        links[up] = where
    return record


# --- the trainer from config ----------------------------------------------------------------------
def time_limit(max_minutes: Optional[float], spent_s: float = 0.0) -> Optional[dt.timedelta]:
    """The fit's wall-clock limit: ``max_minutes`` counts from the stage's start, so what the stage
    spent before its fit (opening the data, loading upstream, building the latent cache) is taken
    off: one clock for every method the benchmark compares (docs/results/benchmark.md). At least
    one second is left (a stage whose preparation ate its budget then fails with a clear error)."""
    if not max_minutes:
        return None
    return dt.timedelta(seconds=max(1.0, 60.0 * float(max_minutes) - float(spent_s)))


def logger_kwargs(cfg: DictConfig, name: str, out: Path) -> Dict[str, Any]:
    """Where and as what the stage logs. CSV/TensorBoard: into the stage's attempt directory (it
    becomes ``<run_dir>/<stage>/``). W&B: one W&B run per stage (``<run>/<stage>``, grouped by the
    run), kept in ``<run_dir>/wandb/``, which never moves, so the ``wandb sync`` path it prints stays
    valid (``finish_loggers`` ends the W&B run with its stage)."""
    if str(cfg.logger.target.get("_target_", "")).endswith("WandbLogger"):
        run = str(cfg.get("run_name") or Path(cfg.run_dir).name)
        return {"save_dir": str(Path(cfg.run_dir) / "wandb"), "name": f"{run}/{name}", "group": run,
                "job_type": name}
    return {"save_dir": str(out)}


def finish_loggers(trainer: L.Trainer) -> None:
    """End each logger's external run with its stage (Lightning would hand a live W&B run to the
    next stage's logger, so every stage would land in the first stage's W&B run)."""
    for lg in trainer.loggers:
        experiment = getattr(lg, "_experiment", None)
        if experiment is not None and callable(getattr(experiment, "finish", None)):
            experiment.finish()


def build_trainer(cfg: DictConfig, name: str, out: Path, spent_s: float = 0.0,
                  own: Sequence[Any] = ()) -> L.Trainer:
    """The stage's Trainer writing into `out`. Besides checkpointing, early stopping and EMA, a
    non-finite training loss stops the stage (NonFiniteLossStop) and checkpoints carry the RNG
    state (RNGState), so a killed and resumed stage reproduces the uninterrupted one. ``spent_s``:
    the stage's time before its fit, taken off its ``max_minutes`` (``time_limit``); ``own``: the
    stage's own callbacks (``StageModule.stage_callbacks``)."""
    settings, optim = cfg.stages[name], stage_optim(cfg, name)
    callbacks: List[cb.Callback] = [NonFiniteLossStop(), RNGState(),
        cb.ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/nrmse", mode="min",
                           save_top_k=cfg.callbacks.checkpoint.save_top_k,
                           save_last=cfg.callbacks.checkpoint.save_last, auto_insert_metric_name=False),
    ]
    # every other callback with a _target_ in the config (callbacks/default.yaml), built by Hydra
    callbacks += [instantiate(spec) for spec in cfg.callbacks.values()
                  if isinstance(spec, DictConfig) and "_target_" in spec]
    if optim["ema"]["enabled"]:
        callbacks.append(EMA(decay=optim["ema"]["decay"], bias_correction=bool(optim["ema"].get("bias_correction"))))
    if compiles(cfg.trainer.compile, name):
        callbacks.append(EagerValidation())
    callbacks += list(own)
    bar = PROGRESS_BARS[cfg.callbacks.progress_bar]
    if bar is not None:
        callbacks.append(bar())
    loggers = [instantiate(cfg.logger.target, **logger_kwargs(cfg, name, out))]
    max_time = time_limit(settings.max_minutes, spent_s)
    # the sampling stages validate by drawing samples (the teacher: K steps, twice); the wall-clock
    # limit does not bound validation, so they cap its batches
    val_batches = settings.get("val_batches") or cfg.trainer.limit_val_batches
    return L.Trainer(
        default_root_dir=out, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes, strategy=cfg.trainer.strategy, precision=cfg.trainer.precision,
        max_epochs=settings.max_epochs, max_time=max_time, gradient_clip_val=optim["grad_clip"],
        accumulate_grad_batches=optim["accumulate"], log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic, limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=val_batches,
        # on steps (a long epoch under a wall-clock limit still keeps its best weights), or at epoch ends
        val_check_interval=cfg.trainer.val_every_n_steps or 1.0,
        check_val_every_n_epoch=None if cfg.trainer.val_every_n_steps else cfg.trainer.check_val_every_n_epoch,
        callbacks=callbacks,
        logger=loggers, enable_progress_bar=cfg.callbacks.progress_bar != "none",
        enable_model_summary=False, **trainer_extra(cfg),
    )


# --- one stage ------------------------------------------------------------------------------------
def _stage_module(cfg: DictConfig, name: str, contract: Any) -> StageModule:
    """The registered stage, built with the one constructor signature every stage has (and the
    optimiser settings this stage trains with)."""
    return get_stage(name)(OmegaConf.to_container(cfg.model, resolve=True), stage_optim(cfg, name),
                               OmegaConf.to_container(cfg.stages, resolve=True), contract.to_dict())


def compiles(setting: Any, stage: str) -> bool:
    """Whether ``trainer.compile`` (true, false or a list of stage names) compiles ``stage``."""
    return setting if isinstance(setting, bool) else stage in setting


def compile_networks(module: StageModule) -> None:
    """torch.compile the networks in place (nn.Module.compile): checkpoints keep the plain parameter
    names, so compiled and eager runs read each other's checkpoints. The networks a stage trains
    (``trains``) are compiled; a network called as a whole (``compile_whole``: the latent stepper,
    whose blocks sit in ModuleLists, which compiling its children never reached: issue 20 measured
    1.7x on the dim32 training step) as one graph, the others, entered through methods
    (encode/decode, loss/sample), child by child. Frozen upstream networks stay eager: most run only in validation, where a compile (a new graph
    per batch shape) costs more of the stage's clock than it saves. On a CPU without a C++ compiler
    (inductor needs one) the stage runs eager, with a warning, instead of failing mid-stage."""
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    compiler = os.environ.get("CXX") or "g++"
    if on_cpu and shutil.which(compiler) is None:
        log.warning("trainer.compile: no C++ compiler (%s) on this machine, which torch.compile needs on a "
                    "CPU; the stage trains eager. Install g++ or set CXX, or set trainer.compile=false.",
                    compiler)
        return
    for part in module.trains:
        net = getattr(module, part, None)
        if net is None or not any(p.requires_grad for p in net.parameters()):
            continue
        units = [net] if part in module.compile_whole else [
            c for c in net.children() if not isinstance(c, (nn.ModuleList, nn.ModuleDict, nn.ParameterList))]
        for unit in units:
            unit.compile()


def run_stage(cfg: DictConfig, name: str, fix: str) -> Dict[str, Any]:
    """Train one stage, or skip it when its verified finished checkpoint for this config exists.

    It trains in `<run_dir>/.attempts/<stage>-<config hash>/` (a killed attempt resumes there from
    its last.ckpt) and only a finished, finite result replaces `<run_dir>/<stage>/`; a stage that
    failed (non-finite validation figure or weights) leaves the previous good stage in place. Finished
    stages of the same config in `reuse_runs` are used by reference (artifacts.add_reference)."""
    run_dir = Path(cfg.run_dir)
    links: Dict[str, Path] = {}
    upstream = finished_upstream(cfg, name, fix, links)
    for up, holder in links.items():
        _use_reference(run_dir, up, holder)
    config_hash = stage_config_hash(cfg, name, upstream)
    final = run_dir / name   # a stage trained here is held here, never written into a referenced run
    try:
        found = finished_record(cfg, name, config_hash)
    except UserError as exc:
        log.warning("stage %s: %s Retraining it.", name, exc)
        found = None
    if found and cfg.ckpt_path is None:
        where, record = found
        _refuse_changed_data(cfg, name, where, record, fix)
        try:
            verify_checkpoint(where, name, record, fix)
            if where != run_dir:
                _use_reference(run_dir, name, where)
            log.info("stage %s: finished checkpoint for this config exists (%s), skipping", name,
                     stage_dir(where, name))
            return record
        except UserError as exc:
            log.warning("%s Retraining it.", exc)

    prep_start = time.time()    # the stage's clock starts here (time_limit)
    attempt = run_dir / ATTEMPTS / f"{name}-{config_hash}"
    attempt.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed + STAGE_ORDER.index(name), workers=True, verbose=False)
    data = open_run_data(cfg.data)
    pin = run_pin(data)
    x = unit_coords(data)
    try:
        module = _stage_module(cfg, name, data.contract)
    except ValueError as exc:  # the networks' own checks of the model settings
        raise UserError(f"model={cfg.model.name}: {exc} Adjust the model.* settings.") from None
    up = UPSTREAM[name]
    up_module = load_stage(run_dir, up, upstream, fix) if up is not None else None
    datamodule = module.prepare(cfg, data, x, up_module, latents_dir(run_dir))
    init = None
    if cfg.init_from:   # fine-tuning: the networks it trains start from that run's (after any warm start)
        init = init_weights(module, cfg.init_from, name)
        log.info("stage %s: starts from %s (%d tensors copied; %d fresh%s)", name, cfg.init_from, init["copied"],
                 len(init["fresh"]), f": {', '.join(init['fresh'][:4])}{' ...' if len(init['fresh']) > 4 else ''}"
                 if init["fresh"] else "")

    resume = cfg.ckpt_path
    last = attempt / "checkpoints" / "last.ckpt"
    if resume is None and last.exists():
        if _readable_checkpoint(last):
            log.info("stage %s: resuming from %s", name, last)
            resume = str(last)
        else:   # a kill or a full disk while it was written: set aside, the stage starts over
            aside = last.with_name(f"last.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.ckpt")
            os.replace(last, aside)
            log.warning("stage %s: %s cannot be read (truncated or damaged: a kill or a full disk while it "
                        "was written); it is set aside as %s and the stage starts over", name, last, aside.name)
    prep_s = time.time() - prep_start
    trainer = build_trainer(cfg, name, attempt, spent_s=prep_s, own=module.stage_callbacks(attempt))
    if compiles(cfg.trainer.compile, name):
        compile_networks(module)
    start = time.time()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    finally:
        finish_loggers(trainer)
    wall = time.time() - start

    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else last
    score = ckpt_cb.best_model_score if ckpt_cb else None
    best_val = float(score) if score is not None else None
    stopped = next((c.reason for c in trainer.callbacks if isinstance(c, NonFiniteLossStop) and c.reason), None)
    problem = _failed_stage(best, best_val, stopped)
    digest = None if problem else sha256_file(best)
    trainer.strategy.barrier()   # every rank has read the attempt before the first moves or removes it
    if problem:
        if trainer.is_global_zero:
            shutil.rmtree(attempt, ignore_errors=True)
        kept = f"The previous '{name}' stage in {final} is left as it was" if final.exists() else \
            f"Nothing was kept of it"
        fix = f"Lower stages.{name}.lr (now {cfg.stages[name].lr}) or check the data, then rerun."
        if not stopped and (trainer.global_step == 0 or score is None):   # it never trained or never validated
            fix = (f"It took {trainer.global_step} optimizer steps and {'never validated' if score is None else 'validated'}: "
                   f"check trainer.limit_train_batches (now {cfg.trainer.limit_train_batches}), "
                   f"trainer.limit_val_batches (now {cfg.trainer.limit_val_batches}), the validation interval "
                   f"(trainer.val_every_n_steps, trainer.check_val_every_n_epoch) and stages.{name}.max_minutes "
                   f"(now {cfg.stages[name].max_minutes}), then rerun.")
        raise UserError(f"stage '{name}' failed: {problem}. {kept}. {fix}")
    if stopped:
        log.warning("stage %s: %s; its best checkpoint (val/nrmse %.4g) is kept", name, stopped, best_val)
    trivial = trainer.callback_metrics.get(module.trivial_metric)
    trivial = float(trivial) if trivial is not None else None
    learned = None if trivial is None else best_val < trivial
    if learned is False:
        # the limit that ended the fit: the clock, or the epochs
        epochs = cfg.stages[name].max_epochs
        timed_out = bool(cfg.stages[name].max_minutes) and (epochs is None or trainer.current_epoch < int(epochs))
        limit = (f"max_minutes (now {cfg.stages[name].max_minutes})" if timed_out
                 else f"max_epochs (now {cfg.stages[name].max_epochs})")
        log.warning("stage %s STOPPED BEFORE IT LEARNED ANYTHING: its best val/nrmse %.4g does not beat "
                    "%s (%s %.4g) after %d epochs (%d steps) in %.0f s. Everything downstream inherits it "
                    "(evaluation leaves out the rows of a corrector that did not learn: corrector_rows=auto); "
                    "raise stages.%s.%s or free the CPU (%d torch threads).", name,
                    best_val, module.trivial_label, module.trivial_metric, trivial, trainer.current_epoch,
                    trainer.global_step, time.time() - start, name, limit, torch.get_num_threads())
    record = {
        "stage": name,
        "config_hash": config_hash,
        "upstream_sha256": upstream["ckpt_sha256"] if upstream else None,
        "best_ckpt": str(best.resolve().relative_to(attempt.resolve())),   # Lightning reports it absolute
        "ckpt_sha256": digest,
        "best_val_nrmse": best_val,
        # the stage's do-nothing figure (mean field / persistence) and whether the best beat it
        "trivial_metric": module.trivial_metric,
        "trivial_val_nrmse": trivial,
        "learned": learned,
        "num_threads": torch.get_num_threads(),
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        # the data it was trained on (data/pin.py): verified at skip and at evaluation
        "data_pin": pin,
        "wall_clock_s": wall,
        "prep_s": prep_s,       # before the fit (data, upstream, latent cache), inside max_minutes
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "params_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        # the one-run members (Snapshots), each file's digest as the checkpoint's is kept
        "snapshots": {f.name: sha256_file(f) for f in sorted((attempt / SNAPSHOTS).glob("epoch*.pt"))},
        "init_from": init,      # the run and weights it started from (None: from scratch)
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        atomic_write_json(attempt / DONE, record)
        _move_aside(final)
        os.replace(attempt, final)
        drop_reference(run_dir, name)
        with contextlib.suppress(OSError):   # no empty .attempts/ left behind
            attempt.parent.rmdir()
    trainer.strategy.barrier()
    log.info("stage %s done in %.1f s: best val/nrmse %s", name, wall, record["best_val_nrmse"])
    return record


def _refuse_changed_data(cfg: DictConfig, name: str, where: Path, record: Dict[str, Any], fix: str) -> None:
    """A finished stage is reused only on the data it was trained on (its record's ``data_pin``): a
    replaced file or an edited split of the same name is refused, never trained on as if unchanged."""
    pinned = record.get("data_pin")
    if not pinned:
        return
    now = run_pin(open_run_data(cfg.data))
    for pde, was in pinned.items():
        what = pin_mismatch(was, now.get(pde, {})) if pde in now else f"the run's data no longer holds {pde}"
        if what:
            raise UserError(f"stage '{name}' in {stage_dir(where, name)} was trained on {was.get('path')}, but the "
                            f"data given now ({(now.get(pde) or {}).get('path', cfg.data.get('path'))}) differs: "
                            f"{what}. It is not reused for other data: restore the file and its manifest, or train "
                            f"on this data in a new run directory: {fix} run_dir=<new directory>.")


def _move_aside(final: Path) -> None:
    """A stage of another config is moved aside (`<stage>.stale-<time>`), never mixed with the new one."""
    if final.exists():
        stale = final.with_name(f"{final.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        log.info("stage %s: moving the previous %s to %s", final.name, final, stale)
        shutil.move(str(final), str(stale))


def _use_reference(run_dir: Path, name: str, holder: Path) -> None:
    """This run uses stage `name` of run `holder` from now on (a stage of another config that this run
    held itself is moved aside first, so the reference is what the run resolves)."""
    _move_aside(run_dir / name)
    add_reference(run_dir, name, holder)


def _readable_checkpoint(path: Path) -> bool:
    """Whether Lightning can resume from ``path`` (it loads with weights_only=True, as fit does)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:    # truncated zip, unpickling error, OSError: all mean "cannot resume from it"
        return False


def _failed_stage(best: Path, best_val: Optional[float], stopped: Optional[str]) -> Optional[str]:
    """Why a finished fit must not count as a trained stage, or None."""
    if not best.is_file():
        return f"it wrote no checkpoint ({best})" + (f"; {stopped}" if stopped else "")
    if best_val is None or not math.isfinite(best_val):
        return f"its best validation nRMSE is {best_val}" + (f" ({stopped})" if stopped else "")
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    bad = nonfinite_tensors(state)
    if bad:
        return f"{len(bad)} tensors of its best checkpoint hold NaN/Inf (e.g. {bad[0]})"
    return None


def preflight(cfg: DictConfig, overrides: Optional[Sequence[str]]) -> str:
    """Every check that can fail before anything is written; returns the command that runs the
    whole pipeline with the user's overrides (quoted in errors)."""
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={cfg.trainer.accelerator}: no CUDA GPU is visible to torch "
                        f"{torch.__version__} here. Use trainer=cpu (the default).")
    if cfg.ckpt_path is not None and len(cfg.stage.run) != 1:
        raise UserError(f"ckpt_path={cfg.ckpt_path} resumes one stage: pick it with stage=NAME "
                        f"(stage.run is {list(cfg.stage.run)}).")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file.")
    check_trainer_settings(cfg)
    check_writable_dir(cfg.run_dir, "run_dir")
    fix = train_command(cfg.run_dir, cfg, overrides)
    ensure_data(cfg, overrides)
    open_run_data(cfg.data)   # checks the files, split sizes, parameters, frames against initial_step
    first = next(name for name in STAGE_ORDER if name in cfg.stage.run)
    finished_upstream(cfg, first, fix)
    return fix


def trainer_extra(cfg: DictConfig) -> Dict[str, Any]:
    """The lightning.Trainer arguments passed through from ``trainer.extra`` (+trainer.<arg>=...)."""
    extra = cfg.trainer.get("extra")
    return OmegaConf.to_container(extra, resolve=True) if extra else {}


def check_trainer_settings(cfg: DictConfig) -> None:
    """Lightning's own checks of the trainer.* settings, run by building a Trainer from them before
    anything is written, so a bad value is one paragraph instead of a traceback mid-run."""
    t = cfg.trainer
    launched = any(k in os.environ for k in ("SLURM_NTASKS", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"))
    if int(t.num_nodes) > 1 and not launched:
        raise UserError(f"trainer.num_nodes={t.num_nodes} needs a multi-node launcher (SLURM, torchrun) that starts "
                        "the other nodes; on one machine the run would wait for them forever. Use "
                        "trainer.num_nodes=1 (trainer=ddp trainer.devices=N runs N processes here).")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = t[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise UserError(f"trainer.{key}={value}: a stage needs training batches and validation batches "
                            "(validation chooses its checkpoint); give a fraction in (0, 1] or a count >= 1.")
    try:
        L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                  precision=t.precision, limit_train_batches=t.limit_train_batches,
                  limit_val_batches=t.limit_val_batches, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, **trainer_extra(cfg))
    except Exception as exc:   # Lightning's MisconfigurationException, ValueError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        extra = "".join(f", trainer.{k}={v}" for k, v in trainer_extra(cfg).items())
        raise UserError(f"Lightning refuses the trainer settings (trainer.accelerator={t.accelerator}, "
                        f"trainer.devices={t.devices}, trainer.strategy={t.strategy}, trainer.precision={t.precision}, "
                        f"trainer.limit_train_batches={t.limit_train_batches}, trainer.limit_val_batches="
                        f"{t.limit_val_batches}{extra}): {first}") from None


def ensure_data(cfg: DictConfig, overrides: Optional[Sequence[str]]) -> None:
    """The data config's own files are generated when missing (seconds for the small sets); a file
    the user named with data.path= (or data.members.<m>.path=) is never made up. A file is made with
    at least its data config's own split sizes: a run on fewer (data.n_train=51) takes the first rows
    of the splits of the file every other run reads, not a smaller file of other test rows."""
    from ups_lightning import CONF_DIR
    from ups_lightning.config import compose_config
    from ups_lightning.data.datamodule import member_configs
    from ups_lightning.data.generation import run as generate

    for member in member_configs(cfg.data).values():
        if Path(member.path).exists():
            continue
        named = [o for o in overrides or () if o.lstrip("+~").split("=", 1)[0].endswith(".path")]
        if named:
            raise UserError(f"{named[0]}: no such file {member.path}. Pass an existing PDEBench-layout "
                            "HDF5 file, or drop the override to use the data config's generated file.")
        log.info("data file %s is missing: generating it (data=%s)", member.path, member.name)
        member = member.copy()
        if (Path(CONF_DIR) / "data" / f"{member.name}.yaml").is_file():   # its data config's own sizes
            own = compose_config("train", [f"data={member.name}"]).data
            with open_dict(member):
                for key in ("n_train", "n_val", "n_test"):
                    member[key] = max(int(member[key]), int(own[key]))
        generate({"data": member, "workers": 2, "progress": False})


def run(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Run the selected stages in order. Nothing is written before every check passes; the run
    directory is locked while this process trains in it; a run that fails before any stage
    finished leaves no directory behind. `overrides` (the command line's) make the suggested
    commands keep the user's settings."""
    cfg = validate_train_config(cfg)
    configure_cpu(cfg.trainer.num_threads, "trainer.num_threads")
    fix = preflight(cfg, overrides)
    run_dir = Path(cfg.run_dir)
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    run_dir.mkdir(parents=True, exist_ok=True)
    # DDP's launcher re-runs this command in each further rank: the first process holds the lock
    lock = FileLock(str(run_dir / LOCK)) if _launching_process() else contextlib.nullcontext()
    if isinstance(lock, FileLock):
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"run_dir={run_dir} is locked by another training process ({run_dir / LOCK}); "
                            "wait for it to finish, or train into another run_dir=.") from None
    handler = _log_to(run_dir / "train.log")
    finished = False
    try:
        records = {}
        for name in STAGE_ORDER:
            if name in cfg.stage.run:
                records[name] = run_stage(cfg, name, fix)
                if not finished:   # the run's config is the one that last finished a stage
                    OmegaConf.save(cfg, run_dir / "config.yaml")
                    if overrides is not None:
                        save_overrides(run_dir, overrides)
                    finished = True
        return records
    except Exception:
        with contextlib.suppress(OSError):
            (run_dir / ATTEMPTS).rmdir()   # only if no killed attempt waits there to resume
        if fresh and not finished and _launching_process() and not (run_dir / ATTEMPTS).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if isinstance(lock, FileLock):
            lock.release()


def _launching_process() -> bool:
    """False in the processes a DDP launcher started for ranks other than the first."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (-m), whatever its sweeper or launcher."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job(cfg: DictConfig, overrides: Optional[List[str]]) -> tuple:
    """(cfg, overrides) of a multirun job: a job that names no run_dir trains in its own job directory
    (hydra.sweep.dir/<job number>) and uses by reference the finished stages of the same config that
    the plain run's directory or an earlier job of the sweep holds (reuse_runs), so no job overwrites
    another and none retrains what they share. Outside a multirun, or with run_dir= given, both are
    returned unchanged."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():
        return cfg, overrides
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides or ()}
    if "run_dir" in given:
        swept = any(a.lstrip("+~").startswith("run_dir=") and "," in a for a in sys.argv[1:])
        if not swept:   # every job of the sweep would train into, and move aside, the same directory
            raise UserError(f"run_dir={cfg.run_dir} is given once for every job of this multirun: the jobs would "
                            "overwrite each other's stages. Drop run_dir= (each job then trains in its own sweep "
                            "directory and uses the finished stages it shares by reference), or sweep it "
                            "(run_dir=a,b, one per job).")
        return cfg, overrides
    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    with open_dict(cfg):
        if "reuse_runs" not in given:
            cfg.reuse_runs = [cfg.run_dir, str(Path(hydra_cfg.sweep.dir) / "*")]
        cfg.run_dir = job_dir
    log.info("sweep job %s: training in %s; finished stages of the same config are used by reference from %s",
             hydra_cfg.job.num, job_dir, list(cfg.reuse_runs))
    kept = [o for o in overrides or () if o.lstrip("+~").split("=", 1)[0] != "reuse_runs"]
    reuse = "[" + ",".join(f"'{r}'" for r in cfg.reuse_runs) + "]"
    return cfg, [*kept, f"run_dir={job_dir}", f"reuse_runs={reuse}"]


FAILED = "failed.json"   # a sweep job that failed: its overrides and the error (the report lists it)


def record_failed_job(run_dir: str | Path, overrides: Optional[List[str]], error: str) -> None:
    atomic_write_json(Path(run_dir) / FAILED, {"overrides": list(overrides or []), "error": error,
                                               "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def command_overrides() -> Optional[List[str]]:
    """The overrides of the running Hydra command, or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
