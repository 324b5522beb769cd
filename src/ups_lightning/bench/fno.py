"""The FNO peer of the benchmark suite (benchmark.md section 4): PDEBench's FNO1d, built from the
`neuraloperator` library, trained and scored the way PDEBench does it.

Architecture (PDEBench ``FNO1d(num_channels=1, modes=12, width=20, initial_step=10)``):
input the ``initial_step`` previous frames plus the grid coordinate as channels, a linear lift to
``width``, 4 Fourier layers ``gelu(K u + W u)`` (no activation after the last), keeping the first 12
real-FFT modes, and a projection ``width -> 128 -> 1``. In neuraloperator 2.0 terms: ``FNO`` with
``positional_embedding="grid"`` (the x channel, on [0, 1)), ``lifting_channel_ratio=0`` (one linear
lift), ``use_channel_mlp=False``, ``fno_skip="linear"``, ``projection_channel_ratio=128/width`` and
``n_modes=(2 * (modes - 1),)``: neuraloperator counts modes on the full FFT axis and keeps
``n // 2 + 1`` real-FFT modes, so ``n_modes=(12,)`` would keep only 7; ``(22,)`` keeps PDEBench's 12.
The parameter count then equals PDEBench's FNO1d exactly (23,937 with complex weights counted once,
as ``numel`` does). Two departures, both deliberate: no zero-padding of the periodic domain (PDEBench
pads 2 cells "if input is non-periodic"; the data here are periodic), and the grid channel is the unit
coordinate, as every model of this project sees it.

Training (PDEBench ``training_type="autoregressive"``): from the first ``initial_step`` frames of a
training trajectory, predict the next frame, append it to the input window and repeat to frame
``t_train`` (default: the end), the loss the *sum over predicted frames* of the per-frame MSE, with
gradients through the whole unroll (PDEBench does not detach). Adam, lr 1e-3, weight decay 1e-4,
StepLR(step 100 epochs, gamma 0.5), batch 50, at most 500 epochs: the schedule runs as far as the
wall-clock budget lets it. No normalisation (PDEBench uses none). After every epoch (and when the
budget runs out mid-epoch) the model rolls out the validation split and the checkpoint with the
lowest validation nRMSE over the predicted frames is kept; the test split is never seen here.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ups_lightning.eval.metrics import frame_nrmse

__all__ = ["FNOSettings", "FNOPeer", "build_fno", "rollout_fno", "predict_test", "train_fno", "count_params"]


@dataclass
class FNOSettings:
    modes: int = 12               # real-FFT modes kept (PDEBench's count)
    width: int = 20
    n_layers: int = 4
    projection: int = 128         # hidden width of the projection MLP
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler_step: int = 100     # epochs
    scheduler_gamma: float = 0.5
    max_epochs: int = 500
    t_train: Optional[int] = None  # last frame (exclusive) of the training unroll; None: all frames
    val_batch_size: int = 200

    @classmethod
    def from_mapping(cls, d: Dict[str, Any]) -> "FNOSettings":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class FNOPeer(nn.Module):
    """Frames (B, T_in, X, C) -> next frame (B, X, C). Channels of the network: T_in * C + grid."""

    def __init__(self, initial_step: int, channels: int = 1, settings: Optional[FNOSettings] = None):
        super().__init__()
        from neuralop.models import FNO

        s = settings or FNOSettings()
        if s.modes < 1:
            raise ValueError(f"fno.modes={s.modes} must be >= 1")
        self.initial_step, self.channels = int(initial_step), int(channels)
        self.net = FNO(
            n_modes=(max(1, 2 * (s.modes - 1)),), in_channels=self.initial_step * self.channels,
            out_channels=self.channels, hidden_channels=s.width, n_layers=s.n_layers,
            lifting_channel_ratio=0, projection_channel_ratio=s.projection / s.width,
            positional_embedding="grid", use_channel_mlp=False, fno_skip="linear",
        )

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        # neuraloperator's models add a '_metadata' entry to the state dict they are part of; the
        # wrapper's state dict holds tensors only, so that it loads back with nn.Module's strict check
        sd = super().state_dict(*args, **kwargs)
        if isinstance(sd, dict):
            sd.pop("_metadata", None)
        return sd

    def forward(self, window: Tensor) -> Tensor:
        b, t, x, c = window.shape
        if t != self.initial_step or c != self.channels:
            raise ValueError(f"FNOPeer expects (B, {self.initial_step}, X, {self.channels}) windows, "
                             f"got {tuple(window.shape)}")
        inp = window.permute(0, 1, 3, 2).reshape(b, t * c, x)       # (B, T*C, X), time-major
        out = self.net(inp)                                           # (B, C, X)
        return out.permute(0, 2, 1)                                   # (B, X, C)


def build_fno(initial_step: int, channels: int = 1, settings: Optional[FNOSettings] = None) -> FNOPeer:
    return FNOPeer(initial_step, channels, settings)


def count_params(model: nn.Module) -> int:
    """Trainable parameters as ``numel`` counts them (one per complex weight, as PDEBench prints)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rollout_fno(model: FNOPeer, given: Tensor, steps: int, batch: Optional[int] = None) -> Tensor:
    """Autoregressive rollout: ``given`` (B, T_in, X, C) are the given frames (only the last
    ``initial_step`` are read); returns the ``steps`` predicted frames (B, steps, X, C)."""
    k = model.initial_step
    if given.shape[1] < k:
        raise ValueError(f"rollout_fno: {given.shape[1]} given frames, the model needs {k}")
    if batch is not None and batch < len(given):
        return torch.cat([rollout_fno(model, given[i:i + batch], steps) for i in range(0, len(given), batch)])
    was_training = model.training
    model.eval()
    window = given[:, -k:].float()
    preds = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(window)
            preds.append(nxt)
            window = torch.cat([window[:, 1:], nxt.unsqueeze(1)], dim=1)
    model.train(was_training)
    return torch.stack(preds, dim=1)


def predict_test(model: FNOPeer, fields: Tensor, n_given: int, batch: Optional[int] = None) -> tuple:
    """The evaluation protocol: from frames 0..n_given-1 of ``fields`` (B, T, X, C) predict frames
    n_given..T-1 autoregressively; nothing after the given frames is read. Returns (pred
    (B, T - n_given, X, C), wall-clock seconds of the batched rollout, after one untimed warm-up)."""
    given = fields[:, :n_given]
    steps = fields.shape[1] - n_given
    rollout_fno(model, given[:1], 1)               # first-call allocations, not timed
    start = time.perf_counter()
    pred = rollout_fno(model, given, steps, batch=batch)
    return pred, time.perf_counter() - start


def _unroll_loss(model: FNOPeer, traj: Tensor, t_train: int) -> Tensor:
    """PDEBench's autoregressive training loss: sum over frames initial_step..t_train-1 of the
    per-frame MSE, gradients through the whole unroll."""
    k = model.initial_step
    window = traj[:, :k]
    loss = traj.new_zeros(())
    for t in range(k, t_train):
        nxt = model(window)
        loss = loss + torch.mean((nxt - traj[:, t]) ** 2)
        window = torch.cat([window[:, 1:], nxt.unsqueeze(1)], dim=1)
    return loss


def _val_nrmse(model: FNOPeer, val: Tensor, batch: int) -> float:
    k = model.initial_step
    pred = rollout_fno(model, val[:, :k], val.shape[1] - k, batch=batch)
    # nRMSE per sample, frame and channel (the one implementation, eval.metrics), mean over all
    return float(frame_nrmse(pred, val[:, k:]).mean())


def train_fno(model: FNOPeer, train: Tensor, val: Tensor, settings: FNOSettings, budget_s: float,
              seed: int = 0, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Train ``model`` in place on ``train`` (N, T, X, C) for at most ``budget_s`` seconds of
    wall-clock (training and validation together) or ``settings.max_epochs`` epochs; load the
    weights with the best validation nRMSE at the end. Returns a record of the run."""
    if budget_s <= 0:
        raise ValueError(f"train_fno: budget_s={budget_s} must be > 0")
    k = model.initial_step
    n_t = train.shape[1]
    t_train = n_t if settings.t_train is None else max(k + 1, min(int(settings.t_train), n_t))
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=settings.scheduler_step, gamma=settings.scheduler_gamma)
    train, val = train.float(), val.float()
    start = time.perf_counter()
    deadline = start + budget_s
    best = {"val_nrmse": math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    history: List[Dict[str, float]] = []
    steps_done, epoch, out_of_time = 0, 0, False

    def validate(ep: float) -> None:
        v = _val_nrmse(model, val, settings.val_batch_size)
        history.append({"epoch": ep, "val_nrmse": v, "elapsed_s": time.perf_counter() - start})
        if v < best["val_nrmse"]:
            best.update(val_nrmse=v, epoch=ep, state=copy.deepcopy(model.state_dict()))

    while epoch < settings.max_epochs and not out_of_time:
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total, batches = 0.0, 0
        for i in range(0, len(train), settings.batch_size):
            if time.perf_counter() >= deadline:
                out_of_time = True
                break
            loss = _unroll_loss(model, train[order[i:i + settings.batch_size]], t_train)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
            steps_done += 1
        if batches == 0:
            break
        frac = batches / math.ceil(len(train) / settings.batch_size)
        ep = epoch + frac
        validate(round(ep, 3))
        if not out_of_time:
            epoch += 1
            sched.step()
        if log:
            log(f"fno epoch {ep:6.2f}  train loss {total / batches:.4e}  val nRMSE "
                f"{history[-1]['val_nrmse']:.4f}  lr {opt.param_groups[0]['lr']:.1e}  "
                f"{time.perf_counter() - start:6.1f} s")
        if time.perf_counter() >= deadline:
            out_of_time = True
    wall = time.perf_counter() - start
    model.load_state_dict(best["state"])
    model.eval()
    return {
        "train_s": wall,
        "epochs": float(history[-1]["epoch"]) if history else 0.0,
        "optimizer_steps": steps_done,
        "best_epoch": best["epoch"],
        "best_val_nrmse": best["val_nrmse"],
        "t_train": t_train,
        "history": history,
        "params": count_params(model),
        "settings": settings.as_dict(),
        "stopped_by": "budget" if out_of_time else "max_epochs",
    }


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
