"""The learned peers of the benchmark (benchmark.md section 4), each trained two ways.

A peer is a network mapping the ``initial_step`` previous frames (B, T_in, X, C) to the next frame
(B, X, C): PDEBench's FNO1d (``bench/fno.py``) and U-Net1d (``bench/unet.py``). ``PeerModule``
trains any of them through the Lightning Trainer our stages use (``training.build_trainer``: the
same wall-clock Timer and checkpoint on the best ``val/nrmse``) under one of two recipes
(``RECIPES``); the benchmark trains both and keeps the one better on validation:

- ``project``: our stages' recipe: AdamW with warm-up + cosine fitted to the clock
  (``stages.base.ScheduledAdamW``), the relative loss (each sample weighed as nRMSE weighs it), a
  bias-corrected EMA and gradient clipping (conf/optim);
- ``pdebench``: its authors' recipe (PDEBench's ``train_models_forward.py`` and
  ``config_Bgs.yaml``): Adam with weight decay 1e-4, StepLR (step 100 epochs, gamma 0.5), the
  per-step MSE summed over the unrolled frames, no EMA, no clipping, no early stop (it trains to its clock).

Both keep what PDEBench prescribes for the architecture itself: autoregressive training over the
trajectory, and for the U-Net the pushforward trick (only the last ``grad_frames`` predictions
carry gradients and enter the loss).

Validation, the figure the checkpoint, the recipe and the learning rate are chosen on, is the
rollout nRMSE over the predicted frames of the validation split, from the given frames only;
persistence's figure is logged beside it (``val/nrmse_persistence``, the trivial reference). The
test split is never seen here.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Tuple

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from ups_lightning.bench.fno import FNOSettings, build_fno
from ups_lightning.bench.unet import UNetSettings, build_unet
from ups_lightning.eval.metrics import frame_nrmse
from ups_lightning.stages.base import ScheduledAdamW, relative_mse

__all__ = ["PEERS", "RECIPES", "PDEBENCH_RECIPE", "PDEBENCH_BATCH_SIZE", "with_batch_size", "PeerModule", "TrajectoryData", "rollout_peer", "predict_peer", "count_params"]

#: name -> (label (``{dims}``: the data's spatial dimension), settings class, builder (initial_step,
#: channels, settings, spatial_shape=None | (X, Y), periodic=True) -> nn.Module)
PEERS: Dict[str, Tuple[str, type, Callable[..., nn.Module]]] = {
    "fno": ("FNO{dims}d (neuralop, PDEBench)", FNOSettings, build_fno),
    "unet": ("U-Net{dims}d (PDEBench)", UNetSettings, build_unet),
}

#: how a learned method can be trained (see the module docstring)
RECIPES = ("project", "pdebench")
#: PDEBench's optimiser for both peers (train_models_forward.py; config_Bgs.yaml)
PDEBENCH_RECIPE = {"weight_decay": 1e-4, "scheduler_step": 100, "scheduler_gamma": 0.5}
#: PDEBench's training batch per spatial dimension, for both peers and both recipes: 50 in 1D
#: (config_Bgs.yaml), 5 in 2D (config_rdb.yaml, config_diff-react.yaml); a 2D batch of 50 unrolled over
#: every frame made each step take tens of seconds on 2 cores (results/issue25/bench_smoke_swe2d)
PDEBENCH_BATCH_SIZE = {1: 50, 2: 5}

Project = Optional[Callable[[Tensor, Tensor], Tensor]]   # (frame, last given frame) -> frame


def with_batch_size(settings: Any, dims: int) -> Any:
    """``settings`` (FNOSettings / UNetSettings) with a null ``batch_size`` replaced by PDEBench's
    for ``dims`` spatial dimensions (PDEBENCH_BATCH_SIZE); a given one is kept."""
    if settings.batch_size is not None:
        return settings
    if dims not in PDEBENCH_BATCH_SIZE:
        raise ValueError(f"no PDEBench batch size for {dims} spatial dimensions: set the peer's batch_size")
    return dataclasses.replace(settings, batch_size=PDEBENCH_BATCH_SIZE[dims])


def count_params(model: nn.Module) -> int:
    """Trainable parameters as ``numel`` counts them (one per complex weight, as PDEBench prints)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rollout_peer(net: nn.Module, given: Tensor, steps: int, batch: Optional[int] = None,
                 project: Project = None) -> Tensor:
    """Autoregressive rollout from ``given`` (B, T_in, X, C) (only its last ``initial_step`` frames
    are read): the ``steps`` predicted frames (B, steps, X, C). ``project`` (the guard) maps each
    predicted frame onto the invariants the last given frame fixes before it is fed back."""
    k = net.initial_step
    if given.shape[1] < k:
        raise ValueError(f"rollout_peer: {given.shape[1]} given frames, the model needs {k}")
    if batch is not None and batch < len(given):
        return torch.cat([rollout_peer(net, given[i:i + batch], steps, None, project)
                          for i in range(0, len(given), batch)])
    was_training = net.training
    net.eval()
    window, last = given[:, -k:].float(), given[:, -1].float()
    preds = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = net(window)
            if project is not None:
                nxt = project(nxt, last)
            preds.append(nxt)
            window = torch.cat([window[:, 1:], nxt.unsqueeze(1)], dim=1)
    net.train(was_training)
    return torch.stack(preds, dim=1)


def predict_peer(net: nn.Module, fields: Tensor, n_given: int, batch: Optional[int] = None,
                 project: Project = None) -> Tuple[Tensor, float]:
    """The evaluation protocol: frames n_given..T-1 of ``fields`` (B, T, X, C) from frames
    0..n_given-1; nothing after the given frames is read. Returns (pred, wall-clock seconds of the
    batched rollout after one untimed warm-up call)."""
    given = fields[:, :n_given]
    rollout_peer(net, given[:1], 1, project=project)    # first-call allocations, not timed
    start = time.perf_counter()
    pred = rollout_peer(net, given, fields.shape[1] - n_given, batch=batch, project=project)
    return pred, time.perf_counter() - start


class TrajectoryData(L.LightningDataModule):
    """Whole trajectories (N, T, X, C) in physical units: shuffled training batches, and the
    validation split rolled out from its given frames."""

    def __init__(self, train: Tensor, val: Tensor, batch_size: int, val_batch_size: int) -> None:
        super().__init__()
        self.train, self.val = train.float(), val.float()
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train), batch_size=self.batch_size, shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val), batch_size=self.val_batch_size, shuffle=False)


class PeerModule(ScheduledAdamW, L.LightningModule):
    """A peer network trained autoregressively: from the first ``initial_step`` frames, predict the
    next, feed it back, to frame ``t_train``; the loss covers the last ``grad_frames`` predictions
    (None: all), gradients through those frames. ``recipe`` (``RECIPES``) sets the optimiser,
    schedule and loss; the Trainer's EMA and clipping follow it (bench: ``_train_peer``)."""

    trivial_metric = "val/nrmse_persistence"

    def __init__(self, net: nn.Module, lr: float, optim_cfg: Dict[str, Any], relative_loss: bool,
                 t_train: Optional[int] = None, grad_frames: Optional[int] = None,
                 recipe: str = "project") -> None:
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"PeerModule: recipe {recipe!r} is not one of {RECIPES}")
        self.net, self.lr, self.optim_cfg, self.recipe = net, float(lr), optim_cfg, recipe
        self.relative_loss, self.t_train, self.grad_frames = bool(relative_loss), t_train, grad_frames
        self.val_nrmse, self.val_persistence = MeanMetric(), MeanMetric()

    def configure_optimizers(self) -> Any:
        if self.recipe == "project":
            return super().configure_optimizers()
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=PDEBENCH_RECIPE["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=PDEBENCH_RECIPE["scheduler_step"],
                                                gamma=PDEBENCH_RECIPE["scheduler_gamma"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _frame_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.recipe == "pdebench":        # nn.MSELoss(reduction="mean") on the flattened frame
            return torch.mean((pred - target) ** 2)
        return relative_mse(pred, target, target) if self.relative_loss else torch.mean((pred - target) ** 2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        traj = batch[0]
        k = self.net.initial_step
        end = traj.shape[1] if self.t_train is None else max(k + 1, min(int(self.t_train), traj.shape[1]))
        first_grad = k if self.grad_frames is None else max(k, end - int(self.grad_frames))
        window = traj[:, :k]
        losses = []
        for t in range(k, end):
            if t < first_grad:          # pushforward: carried forward without gradients, not scored
                with torch.no_grad():
                    nxt = self.net(window)
            else:
                nxt = self.net(window)
                losses.append(self._frame_loss(nxt, traj[:, t]))
            window = torch.cat([window[:, 1:], nxt.unsqueeze(1)], dim=1)
        # PDEBench sums the frames' losses (loss += loss_fn(...)); ours averages them
        loss = torch.stack(losses).sum() if self.recipe == "pdebench" else torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        traj = batch[0]
        k = self.net.initial_step
        pred = rollout_peer(self.net, traj[:, :k], traj.shape[1] - k)
        truth = traj[:, k:]
        self.val_nrmse.update(frame_nrmse(pred, truth).flatten(1).mean(1))
        persistence = traj[:, k - 1:k].expand_as(truth)
        self.val_persistence.update(frame_nrmse(persistence, truth).flatten(1).mean(1))
        self.log("val/nrmse", self.val_nrmse, prog_bar=True, on_epoch=True)
        self.log("val/nrmse_persistence", self.val_persistence, on_epoch=True)
