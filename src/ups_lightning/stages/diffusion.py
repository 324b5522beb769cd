"""Stage 3 (pipeline.md): the diffusion residual corrector, flow matching on the operator's residuals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ups_lightning.stages.base import ResidualStage, build_flow
from ups_lightning.stages.settings import StageSettings, setting


@dataclass
class Settings(StageSettings):
    sample_steps: int = setting(1)  # K teacher steps at sampling time
    val_batches: Optional[int] = setting(1)  # validation batches per epoch (None: trainer.limit_val_batches)


class DiffusionModule(ResidualStage):
    """Stage 3: flow matching on r = z_{t+1} - operator(z_t), conditioned on operator(z_t); sampled
    in K steps. Validated by the one-step physical nRMSE of corrected states and the samples' spread."""

    name, trains, corrector = "diffusion", ("flow",), "teacher"
    Settings, steps_setting = Settings, "sample_steps"
    own_prefixes = ("flow.", "r_std")

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.flow = build_flow(model_cfg, self.contract)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r, z_pred = self.scaled_residual(batch)
        loss = self.flow.loss(r, z_pred, batch["cond"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        r, z_pred = self.scaled_residual(batch)
        self.log("val/loss", self.flow.loss(r, z_pred, batch["cond"]), on_epoch=True)
        self.validate_samples(batch)

    def before_fit(self, datamodule: Any) -> None:
        self.fit_residual_scale(datamodule.train_dataloader(shuffle=False))  # same on every rank


STAGE = DiffusionModule
