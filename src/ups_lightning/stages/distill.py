"""Stage 4 (pipeline.md): consistency distillation of the diffusion teacher into a 1-2 step student."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torchmetrics import MeanMetric

from ups_lightning.models.diffusion import ConsistencyStudent, consistency_distillation_loss
from ups_lightning.stages.base import ResidualStage, build_flow, freeze, sample_nrmse
from ups_lightning.stages.settings import StageSettings, setting


@dataclass
class Settings(StageSettings):
    n_grid: int = setting(2)  # teacher ODE grid the student is made consistent along
    student_steps: int = setting(choices=(1, 2))  # 1 or 2 sampling steps
    target_decay: float = setting(0.0, high=1.0)  # EMA of the consistency target
    val_batches: Optional[int] = setting(1)  # validation batches per epoch (None: trainer.limit_val_batches)


class DistillModule(ResidualStage):
    """Stage 4: consistency distillation of the flow teacher into a 1-2 step student. Validated by
    the student's one-step physical nRMSE and spread beside the teacher's K-step ones (the teacher
    samples with the diffusion stage's `sample_steps`)."""

    name, trains, corrector = "distill", ("student",), "student"
    Settings, steps_setting = Settings, "student_steps"
    own_prefixes = ("student.", "target.")

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.teacher_steps = stages_cfg["diffusion"]["sample_steps"]
        self.flow = freeze(build_flow(model_cfg, self.contract))
        self.student = build_flow(model_cfg, self.contract, ConsistencyStudent)
        self.target = freeze(copy.deepcopy(self.student))
        self.val_teacher = MeanMetric()
        self.val_teacher_spread = MeanMetric()

    def start_from_teacher(self) -> None:
        """Warm-start the student's backbone from the teacher where the shapes agree."""
        own = self.student.state_dict()
        warm = {k: v for k, v in self.flow.state_dict().items() if k in own and own[k].shape == v.shape}
        self.student.load_state_dict(warm, strict=False)
        self.target.load_state_dict(self.student.state_dict())

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r, z_pred = self.scaled_residual(batch)
        loss = consistency_distillation_loss(self.student, self.target, self.flow, r, z_pred,
                                             batch["cond"], n_grid=self.settings["n_grid"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        decay = self.settings["target_decay"]
        with torch.no_grad():
            for t, s in zip(self.target.parameters(), self.student.parameters()):
                t.lerp_(s, 1.0 - decay)

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validate_samples(batch)
        z, u, cond, m = batch["z"], batch["u"], batch["cond"], self.present(batch)
        true = self.physical(u[:, 1], m)
        z_pred = self.operator_step(z[:, 0], cond)

        def teacher() -> torch.Tensor:
            r = self.flow.sample(z_pred, cond, steps=self.teacher_steps)
            return self.decode_phys(z_pred + self.r_std * r, m)

        a, b = teacher(), teacher()
        self.val_teacher.update(sample_nrmse(a, true))
        self.val_teacher_spread.update(sample_nrmse(a, b))
        self.log("val/teacher_nrmse", self.val_teacher, on_epoch=True)
        self.log("val/teacher_spread", self.val_teacher_spread, on_epoch=True)

    def before_fit(self, datamodule: Any) -> None:
        self.start_from_teacher()


STAGE = DistillModule
