"""What every stage's LightningModule shares: the optimiser and schedule from config, the frozen
physical-space pieces (decoder, normaliser, latent statistics), and the physical validation figure."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import lightning as L
from lightning.pytorch.callbacks import Timer
import torch
from torch import nn
from torchmetrics import MeanMetric

from ups_lightning.data.contract import DataContract
from ups_lightning.eval.metrics import sample_nrmse  # the one nRMSE: training, evaluation, bench
from ups_lightning.models.autoencoder import Autoencoder
from ups_lightning.models.sizes import sizes_of


def build_autoencoder(model_cfg: Dict[str, Any], contract: DataContract) -> Autoencoder:
    """The autoencoder for the data's channels and grid (the data contract)."""
    s = sizes_of(model_cfg)
    return Autoencoder(
        in_channels=contract.n_channels, spatial_shape=tuple(contract.spatial_shape), dim=s.dim,
        n_tokens=s.n_tokens, depth=model_cfg["ae_depth"], heads=s.heads, hidden=s.hidden,
        n_fourier=model_cfg["n_fourier"], decoder_depth=model_cfg["decoder_depth"],
    )


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def lr_factor(step: int, total: int, time_progress: float, warmup_ratio: float, floor: float,
              cosine: bool) -> float:
    """The LR multiplier at optimizer step `step`: linear warm-up over the first `warmup_ratio` of
    training, then cosine down to `floor` (or constant). Progress is whichever runs out first, steps
    (of `total`) or the stage's wall-clock limit (`time_progress` in [0, 1]), so a time-capped stage
    both leaves warm-up and anneals: with progress counted in steps alone, a stage stopped by its
    clock after fewer than warmup_ratio * total steps trained its whole run inside the warm-up."""
    progress = min(1.0, max((step + 1) / max(1, total), time_progress))
    if progress < warmup_ratio:
        return progress / warmup_ratio
    if not cosine:
        return 1.0
    q = (progress - warmup_ratio) / max(1e-9, 1.0 - warmup_ratio)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q))


def relative_mse(pred: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """MSE with each sample's error divided by its ``reference`` field's mean square (weights
    normalised over the batch), as nRMSE weighs samples: without it large-amplitude fields dominate
    the loss and small ones the metric. The relative loss of our operator and of the peers."""
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    w = 1.0 / reference.pow(2).flatten(1).mean(1).clamp_min(1e-8)
    return (per_sample * w).sum() / w.sum()


def _adamw_impl(optim_cfg: Dict[str, Any], params: list, precision: str) -> Dict[str, Any]:
    """``fused=True`` (one kernel over all parameter tensors instead of ~10 small ops each: 3.2 -> 1.3
    ms per dim32 operator step, issue 20) unless ``optim.fused`` is false, a parameter is complex
    (the FNO peer's spectral weights, which the kernel does not take) or the precision is mixed
    (Lightning refuses gradient clipping with a fused optimizer under a precision plugin)."""
    real = all(p.is_floating_point() for p in params)
    full = str(precision).split("-")[0] in ("32", "64")
    return {"fused": bool(optim_cfg.get("fused", True)) and real and full}


class ScheduledAdamW:
    """Mixin for a LightningModule with ``self.lr`` and ``self.optim_cfg`` (conf/optim): AdamW (no
    decay on biases and norms), linear warm-up then cosine/constant LR per step, fitted to the
    stage's wall-clock limit (``lr_factor``). Every learned method of the benchmark trains with it:
    our stages and the peers (bench/peers.py), so none gets a better schedule than another."""

    def configure_optimizers(self) -> Dict[str, Any]:
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim_cfg["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=tuple(self.optim_cfg["betas"]),
            **_adamw_impl(self.optim_cfg, decay + no_decay, self.trainer.precision),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        settings = dict(total=total, warmup_ratio=self.optim_cfg["warmup_ratio"],
                        floor=self.optim_cfg["min_lr_ratio"], cosine=self.optim_cfg["schedule"] == "cosine")

        def factor(step: int) -> float:
            return lr_factor(step, time_progress=self._time_progress(), **settings)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _time_progress(self) -> float:
        """Fraction of the stage's wall-clock limit (Lightning's Timer) used so far; 0 without one."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, Timer):
                remaining = callback.time_remaining("train")
                if remaining is None:
                    return 0.0
                elapsed = callback.time_elapsed("train")
                return elapsed / max(elapsed + remaining, 1e-9)
        return 0.0


class StageModule(ScheduledAdamW, L.LightningModule):
    """Base class: AdamW with warm-up + cosine/constant LR (per step), physical-space helpers.

    Every stage is built as ``Stage(model_cfg, optim_cfg, stages_cfg, data)``: the model, optimiser
    and all stages' settings (it reads its own, ``stages_cfg[name]``, and any upstream setting it
    needs) and the data contract (``DataContract.to_dict()``). Subclasses declare ``name`` and
    ``upstream`` and register with ``@register_stage`` (``ups_lightning.lit.stages``).

    Buffers `x` (unit coordinates), `field_mean/std` (physical normalisation) and `latent_mean/std`
    travel in every checkpoint, and the contract in its hyperparameters, so a stage can be
    evaluated from its checkpoint alone. Conditioning comes with each batch (`batch["cond"]`).
    """

    name: str = ""
    upstream: Optional[str] = None
    # the validation figure of doing nothing useful (logged by the stage): a stage whose best
    # val/nrmse does not beat it stopped before it learned anything (training.run_stage says so)
    trivial_metric: str = "val/nrmse_persistence"
    trivial_label: str = "doing nothing"   # what the trivial figure is, in the stage's warning

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any], latent_dim: Optional[int] = None) -> None:
        super().__init__()
        self.contract = DataContract.from_dict(data)
        self.settings = stages_cfg[self.name]
        self.optim_cfg, self.lr = optim_cfg, self.settings["lr"]
        shape, dims = self.contract.spatial_shape, self.contract.spatial_dims
        # unit coordinates of the grid: (X,) in 1D, (*shape, dims) beyond
        self.register_buffer("x", torch.zeros(*shape, dims) if dims > 1 else torch.zeros(shape[0]))
        self.register_buffer("field_mean", torch.zeros(self.contract.n_channels))
        self.register_buffer("field_std", torch.ones(self.contract.n_channels))
        if latent_dim is not None:
            self.register_buffer("latent_mean", torch.zeros(latent_dim))
            self.register_buffer("latent_std", torch.ones(latent_dim))
        self.val_nrmse = MeanMetric()

    # --- data context, set once before training from the data and the cache -------------------
    def set_data_context(self, x: torch.Tensor, field_mean: Any, field_std: Any,
                         latent_mean: Optional[torch.Tensor] = None,
                         latent_std: Optional[torch.Tensor] = None) -> None:
        self.x.copy_(x)
        self.field_mean.copy_(torch.as_tensor(field_mean, dtype=torch.float32))
        self.field_std.copy_(torch.as_tensor(field_std, dtype=torch.float32))
        if latent_mean is not None:
            self.latent_mean.copy_(latent_mean)
            self.latent_std.copy_(latent_std)

    def physical(self, u_normalised: torch.Tensor) -> torch.Tensor:
        return u_normalised * self.field_std + self.field_mean

    def decode_latent(self, autoencoder: Autoencoder, z_normalised: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> normalised field on the data grid."""
        return autoencoder.decode(z_normalised * self.latent_std + self.latent_mean, self.x)

    def log_val_nrmse(self, pred_phys: torch.Tensor, true_phys: torch.Tensor) -> None:
        self.val_nrmse.update(sample_nrmse(pred_phys, true_phys))
        self.log("val/nrmse", self.val_nrmse, prog_bar=True, on_epoch=True)
