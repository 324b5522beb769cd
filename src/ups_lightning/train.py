"""`python -m ups_lightning.train [model=dim64] [stage=operator|all|...] [experiment=smoke] ...`

Runs the selected stages in order in one run directory (`run_dir`, one per data x model), handing
checkpoints along. A stage whose finished checkpoint for the same config already exists is skipped;
a stage killed mid-way resumes from its `last.ckpt`, so a killed pipeline resumes where it stopped.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import lightning as L
import torch
from lightning.pytorch import callbacks as cb
from lightning.pytorch import loggers as pl_loggers
from omegaconf import DictConfig, OmegaConf

from ups_lightning.atomic import atomic_write_json
from ups_lightning.config import STAGE_ORDER, validate_train_config
from ups_lightning.data.cache import build_or_load_latent_cache
from ups_lightning.data.datamodule import (
    FrameDataModule, LatentDataModule, conditioning, file_nu, open_view, unit_coords,
)
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.lit.callbacks import EMA
from ups_lightning.lit.common import StageModule
from ups_lightning.lit.stages import AutoencoderModule, DiffusionModule, DistillModule, OperatorModule

log = logging.getLogger("ups_lightning.train")

UPSTREAM = {"autoencoder": None, "operator": "autoencoder", "diffusion": "operator", "distill": "diffusion"}
MODULES = {"autoencoder": AutoencoderModule, "operator": OperatorModule,
           "diffusion": DiffusionModule, "distill": DistillModule}
DONE = "done.json"
RUNNING = "running.json"


# --- records of finished stages ---------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_dir(cfg: DictConfig, name: str) -> Path:
    return Path(cfg.run_dir) / name


def read_record(cfg: DictConfig, name: str) -> Optional[Dict[str, Any]]:
    path = stage_dir(cfg, name) / DONE
    return json.loads(path.read_text()) if path.exists() else None


def stage_config_hash(cfg: DictConfig, name: str, upstream: Optional[Dict[str, Any]]) -> str:
    """What a stage's result depends on: data, model, its own settings, optimiser, seed, precision,
    and the exact upstream checkpoint it was trained on."""
    relevant = {
        "stage": name,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "settings": OmegaConf.to_container(cfg.stages[name], resolve=True),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "seed": cfg.seed,
        "precision": cfg.trainer.precision,
        "upstream": upstream["ckpt_sha256"] if upstream else None,
    }
    for k in ("batch_size", "num_workers"):
        relevant["data"].pop(k, None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def finished_upstream(cfg: DictConfig, name: str) -> Optional[Dict[str, Any]]:
    """The finished record of `name`'s upstream stage for this config, or a UserError naming what is
    missing and the command that makes it."""
    up = UPSTREAM[name]
    if up is None:
        return None
    record = read_record(cfg, up)
    expected = stage_config_hash(cfg, up, finished_upstream(cfg, up))
    if record is None or record.get("config_hash") != expected:
        why = "was not found" if record is None else "was trained with a different config"
        raise UserError(
            f"stage '{name}' needs the finished '{up}' stage for data={cfg.data.name} and "
            f"model={cfg.model.name}, but {stage_dir(cfg, up) / DONE} {why}. Make it with: "
            f"python -m ups_lightning.train model={cfg.model.name} data={cfg.data.name} stage={up} "
            f"(or stage=all, which runs every stage in order and skips the finished ones)."
        )
    return record


def load_stage(record: Dict[str, Any], name: str) -> StageModule:
    module = MODULES[name].load_from_checkpoint(record["best_ckpt"], map_location="cpu", weights_only=False)
    module.eval()
    return module


# --- the trainer from config ----------------------------------------------------------------------
def build_trainer(cfg: DictConfig, name: str) -> L.Trainer:
    settings = cfg.stages[name]
    out = stage_dir(cfg, name)
    callbacks: List[cb.Callback] = [
        cb.ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/nrmse", mode="min",
                           save_top_k=cfg.callbacks.checkpoint.save_top_k,
                           save_last=cfg.callbacks.checkpoint.save_last, auto_insert_metric_name=False),
    ]
    if cfg.callbacks.early_stopping.enabled:
        callbacks.append(cb.EarlyStopping(monitor="val/nrmse", mode="min",
                                          patience=cfg.callbacks.early_stopping.patience,
                                          min_delta=cfg.callbacks.early_stopping.min_delta))
    if cfg.optim.ema.enabled:
        callbacks.append(EMA(decay=cfg.optim.ema.decay))
    if cfg.callbacks.progress_bar == "rich":
        callbacks.append(cb.RichProgressBar())
    elif cfg.callbacks.progress_bar == "tqdm":
        callbacks.append(cb.TQDMProgressBar())
    loggers = _build_loggers(cfg, out)
    if cfg.callbacks.lr_monitor and loggers:
        callbacks.append(cb.LearningRateMonitor(logging_interval="step"))
    max_time = dt.timedelta(minutes=settings.max_minutes) if settings.max_minutes else None
    # the sampling stages validate by drawing samples (the teacher: K steps, twice); the wall-clock
    # limit does not bound validation, so they cap its batches
    val_batches = settings.get("val_batches") or cfg.trainer.limit_val_batches
    return L.Trainer(
        default_root_dir=out, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes, strategy=cfg.trainer.strategy, precision=cfg.trainer.precision,
        max_epochs=settings.max_epochs, max_time=max_time, gradient_clip_val=cfg.optim.grad_clip,
        accumulate_grad_batches=cfg.optim.accumulate, log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic, limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=val_batches,
        check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch, callbacks=callbacks,
        logger=loggers or False, enable_progress_bar=cfg.callbacks.progress_bar != "none",
        enable_model_summary=False,
    )


def _build_loggers(cfg: DictConfig, out: Path) -> list:
    name = cfg.logger.name
    if name == "csv":
        return [pl_loggers.CSVLogger(save_dir=out, name="logs")]
    if name == "tensorboard":
        return [pl_loggers.TensorBoardLogger(save_dir=out, name="tb")]
    return [pl_loggers.WandbLogger(project=cfg.logger.project, save_dir=str(out),
                                   offline=cfg.logger.offline, name=f"{cfg.run_name}/{out.name}")]


# --- one stage ------------------------------------------------------------------------------------
def _stage_module(cfg: DictConfig, name: str, n_x: int) -> StageModule:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    settings = OmegaConf.to_container(cfg.stages[name], resolve=True)
    lr = settings["lr"]
    if name == "autoencoder":
        return AutoencoderModule(model, optim, lr, n_x, n_query=settings["n_query"])
    if name == "distill":
        return DistillModule(model, optim, settings, cfg.stages.diffusion.sample_steps, lr, n_x)
    return MODULES[name](model, optim, settings, lr, n_x)


def compile_networks(module: StageModule) -> None:
    """torch.compile the networks' sub-modules in place (nn.Module.compile): checkpoints keep the
    plain parameter names, so compiled and eager runs read each other's checkpoints."""
    for part in ("autoencoder", "operator", "flow", "student"):
        net = getattr(module, part, None)
        if net is not None:
            for child in net.children():
                child.compile()


def run_stage(cfg: DictConfig, name: str) -> Dict[str, Any]:
    upstream = finished_upstream(cfg, name)
    config_hash = stage_config_hash(cfg, name, upstream)
    out = stage_dir(cfg, name)
    record = read_record(cfg, name)
    if record and record.get("config_hash") == config_hash and cfg.ckpt_path is None:
        log.info("stage %s: finished checkpoint for this config exists (%s), skipping", name, out)
        return record

    # a stage dir left by another config is moved aside, never mixed with this one
    running = out / RUNNING
    if out.exists():
        same = running.exists() and json.loads(running.read_text()).get("config_hash") == config_hash
        if not same:
            stale = out.with_name(f"{name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log.info("stage %s: %s holds a different config, moving it to %s", name, out, stale)
            shutil.move(str(out), str(stale))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(running, {"config_hash": config_hash, "started": time.time()})

    L.seed_everything(cfg.seed + STAGE_ORDER.index(name), workers=True, verbose=False)
    view = open_view(cfg.data)
    x = unit_coords(view)
    cond = conditioning(view, file_nu(view, cfg.data.nu))
    try:
        module = _stage_module(cfg, name, n_x=len(x))
    except ValueError as exc:  # the networks' own checks of the model settings
        raise UserError(f"model={cfg.model.name}: {exc} Adjust the model.* settings.") from None
    if name == "autoencoder":
        module.set_data_context(x, view.normalizer.mean, view.normalizer.std, cond)
        datamodule: L.LightningDataModule = FrameDataModule(
            cfg.data, cfg.stages.autoencoder.batch_size, cfg.stages.autoencoder.val_frames)
    else:
        up_module = load_stage(upstream, UPSTREAM[name])
        cache = build_or_load_latent_cache(up_module.autoencoder, view, x, Path(cfg.run_dir) / "latents")
        module.load_upstream(up_module)
        module.set_data_context(x, view.normalizer.mean, view.normalizer.std, cond,
                                cache.latent_mean, cache.latent_std)
        steps = cfg.stages.operator.rollout_steps if name == "operator" else 1
        datamodule = LatentDataModule(cache, cfg.stages[name].batch_size, steps=steps,
                                      num_workers=cfg.data.num_workers)
        if name == "diffusion":
            module.fit_residual_scale(datamodule.train_dataloader(shuffle=False))  # same on every rank
        elif name == "distill":
            module.start_from_teacher()

    resume = cfg.ckpt_path
    last = out / "checkpoints" / "last.ckpt"
    if resume is None and last.exists():
        log.info("stage %s: resuming from %s", name, last)
        resume = str(last)
    trainer = build_trainer(cfg, name)
    if cfg.trainer.compile:
        compile_networks(module)
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    wall = time.time() - start

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb and ckpt_cb.best_model_path else str(last)
    record = {
        "stage": name,
        "config_hash": config_hash,
        "best_ckpt": best,
        "ckpt_sha256": _sha256_file(Path(best)),
        "best_val_nrmse": float(ckpt_cb.best_model_score) if ckpt_cb and ckpt_cb.best_model_score is not None else None,
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "wall_clock_s": wall,
        "epochs": trainer.current_epoch,
        "params_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if trainer.is_global_zero:
        atomic_write_json(out / DONE, record)
        running.unlink(missing_ok=True)
    trainer.strategy.barrier()
    log.info("stage %s done in %.1f s: best val/nrmse %s", name, wall, record["best_val_nrmse"])
    return record


def run(cfg: DictConfig) -> Dict[str, Dict[str, Any]]:
    cfg = validate_train_config(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.run_dir) / "config.yaml")
    if cfg.ckpt_path is not None and len(cfg.stage.run) != 1:
        raise UserError(f"ckpt_path={cfg.ckpt_path} resumes one stage: pick it with stage=NAME "
                        f"(stage.run is {list(cfg.stage.run)}).")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).exists():
        raise UserError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file.")
    records = {}
    for name in STAGE_ORDER:
        if name in cfg.stage.run:
            records[name] = run_stage(cfg, name)
    return records


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
