"""Stage 2 (pipeline.md): the PDE-Transformer stepping the latent state, z_{t+1} = z_t + f(z_t, cond)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from ups_lightning.stages.base import LatentStage, build_operator, masked_mse, relative_mse, sample_nrmse
from ups_lightning.stages.settings import StageSettings, setting


@dataclass
class Settings(StageSettings):
    rollout_steps: int = setting(1)  # >1: multi-step (pushforward) loss over this many steps
    pushforward_detach: bool = setting()  # True: stop gradients between the unrolled steps
    decoded_weight: float = setting(0.0)  # weight of the decoded-space loss through the frozen decoder
    noise_std: float = setting(0.0)  # latent noise injection on the input state
    relative_loss: bool = setting()  # weigh each sample's error by 1 / its field's mean square (as nRMSE does)
    snapshot_every: int = setting(0, later=0)  # >0: save the operator's weights every this many epochs (one-run TTC members)


class OperatorModule(LatentStage):
    """Stage 2: z_{t+1} = z_t + f(z_t, cond). Latent MSE, optionally a multi-step (pushforward) term,
    latent input noise and a decoded-space term; validated by one-step physical nRMSE."""

    name, role, trains, compile_whole = "operator", "stepper", ("operator",), ("operator",)
    Settings = Settings
    own_prefixes = ("operator.",)

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.operator = build_operator(model_cfg, self.contract)
        self.val_recon = MeanMetric()

    def forward(self, z: torch.Tensor, cond: Any) -> torch.Tensor:
        """``cond``: raw (B, cond_dim) or the operator's prepared ``Conditioning``."""
        return self.operator(z, cond)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z, u, m = batch["z"], batch["u"], self.present(batch)
        cond = self.operator.condition(batch["cond"])   # once for the whole unroll
        steps = z.shape[1] - 1
        state = z[:, 0]
        if self.settings["noise_std"] > 0:
            state = state + self.settings["noise_std"] * torch.randn_like(state)
        loss = z.new_zeros(())
        for k in range(1, steps + 1):
            pred = self(state, cond)
            loss = loss + self.step_loss(pred, z[:, k], u[:, k], m)
            if self.settings["decoded_weight"] > 0:
                decoded = self.decode_latent(self.autoencoder, pred)
                loss = loss + self.settings["decoded_weight"] * masked_mse(decoded, u[:, k], m)
            detach = self.settings["pushforward_detach"] and k < steps
            state = pred.detach() if detach else pred
        loss = loss / steps
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def step_loss(self, pred: torch.Tensor, target: torch.Tensor, u_target: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latent MSE of one step; with `relative_loss`, each sample's error is divided by its
        physical field's mean square (its present channels'; normalised over the batch), as the
        nRMSE metric weighs it."""
        if not self.settings["relative_loss"]:
            return F.mse_loss(pred, target)
        return relative_mse(pred, target, self.physical(u_target, mask))

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        z, u, m = batch["z"], batch["u"], self.present(batch)
        pred = self(z[:, 0], batch["cond"])
        self.log("val/latent_mse", F.mse_loss(pred, z[:, 1]), on_epoch=True)
        true = self.physical(u[:, 1], m)
        self.log_val_nrmse(self.decode_phys(pred, m), true)
        # the two references a user needs to judge the stage: doing nothing, and the decoder's floor
        self.log_persistence(u, m)
        self.val_recon.update(sample_nrmse(self.decode_phys(z[:, 1], m), true))
        self.log("val/nrmse_recon_floor", self.val_recon, on_epoch=True)

    def unroll_steps(self) -> int:
        return self.settings["rollout_steps"]

    def stage_callbacks(self, out: Path) -> List[Any]:
        from ups_lightning.stages.callbacks import SNAPSHOTS, Snapshots

        every = self.settings.get("snapshot_every")
        return [Snapshots(every, "operator", out / SNAPSHOTS)] if every else []


STAGE = OperatorModule
