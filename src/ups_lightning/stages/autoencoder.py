"""Stage 0 (pipeline.md): the grid encoder and any-point decoder, trained on reconstruction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch
from torchmetrics import MeanMetric

from ups_lightning.stages.base import StageModule, build_autoencoder, masked_mse, sample_nrmse
from ups_lightning.stages.settings import StageSettings, setting


@dataclass
class Settings(StageSettings):
    val_frames: int = setting(1)  # frames per validation trajectory (evenly spaced)
    n_query: int = setting(0)  # random query points per field in training (0: the whole grid)


class AutoencoderModule(StageModule):
    """Stage 0: grid encoder + any-point decoder, trained on reconstruction of normalised fields;
    validated by reconstruction nRMSE in physical units."""

    name, role, trains = "autoencoder", "encoder", ("autoencoder",)
    Settings = Settings
    trivial_metric = "val/nrmse_mean_field"

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.autoencoder = build_autoencoder(model_cfg, self.contract)
        self.n_query = self.settings["n_query"]
        self.val_mean_field = MeanMetric()

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        u, m = batch["u"], self.present(batch)
        z = self.autoencoder.encode(u, self.x)
        points = u[0, ..., 0].numel()          # cells of a field (X, or X * Y in 2D)
        if 0 < self.n_query < points:
            # any-point training: each field is decoded at its own random subset of grid points
            flat = u.reshape(u.shape[0], points, u.shape[-1])                  # (B, cells, C)
            coords = self.x.reshape(points, -1) if self.x.dim() > 1 else self.x  # (cells, d) or (cells,)
            idx = torch.rand(u.shape[0], points, device=u.device).argsort(dim=1)[:, : self.n_query]
            recon = self.autoencoder.decode(z, coords[idx], batched=True if self.x.dim() > 1 else None)
            loss = masked_mse(recon, torch.gather(flat, 1, idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1])), m)
        else:
            loss = masked_mse(self.autoencoder.decode(z, self.x), u, m)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        u, m = batch["u"], self.present(batch)
        recon = self.autoencoder(u, self.x)
        self.log("val/loss", masked_mse(recon, u, m), on_epoch=True)
        true = self.physical(u, m)
        self.log_val_nrmse(self.physical(recon, m), true)
        # doing nothing useful: the training split's mean field
        self.val_mean_field.update(sample_nrmse(self.physical(torch.zeros_like(u), m), true))
        self.log("val/nrmse_mean_field", self.val_mean_field, on_epoch=True)

    def prepare(self, cfg: Any, data: Any, x: torch.Tensor, upstream: Any, latents_dir: Path) -> Any:
        """Frames of the run's data, normalised (the first stage: nothing upstream)."""
        from ups_lightning.data.datamodule import FrameDataModule

        self.set_data_context(x, data.normalizer.mean, data.normalizer.std)
        return FrameDataModule(cfg.data, self.settings["batch_size"], self.settings["val_frames"])


STAGE = AutoencoderModule
