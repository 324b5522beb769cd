"""One LightningModule per stage (pipeline.md). Each downstream module holds its upstream networks
frozen, so its checkpoint alone is enough to decode, roll out and evaluate."""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from ups_lightning.data.contract import DataContract
from ups_lightning.lit.common import StageModule, build_autoencoder, freeze, relative_mse, sample_nrmse
from ups_lightning.models.diffusion import ConsistencyStudent, ResidualFlow, consistency_distillation_loss
from ups_lightning.models.operator import PDETransformer
from ups_lightning.models.sizes import sizes_of

# stage name -> its LightningModule class, in pipeline order; artifacts.load_stage builds modules
# only from these
STAGE_MODULES: Dict[str, type] = {}


def register_stage(cls: type) -> type:
    """Class decorator: a stage declares its `name` and `upstream` (a registered stage, or None)."""
    if cls.upstream is not None and cls.upstream not in STAGE_MODULES:
        raise TypeError(f"stage {cls.name}: upstream {cls.upstream!r} must be registered first")
    STAGE_MODULES[cls.name] = cls
    return cls


def build_operator(model_cfg: Dict[str, Any], contract: DataContract) -> PDETransformer:
    s = sizes_of(model_cfg)
    return PDETransformer(dim=s.dim, n_tokens=s.n_tokens, depth=s.depth, heads=s.heads, hidden=s.hidden,
                          cond_dim=contract.cond_dim, levels=model_cfg["levels"],
                          attn_backend=model_cfg["attn_backend"])


def build_flow(model_cfg: Dict[str, Any], contract: DataContract, cls: type = ResidualFlow) -> torch.nn.Module:
    s = sizes_of(model_cfg)
    return cls(dim=s.dim, n_tokens=s.n_tokens, depth=model_cfg["diffusion_depth"], heads=s.heads,
               hidden=s.hidden, cond_dim=contract.cond_dim)


@register_stage
class AutoencoderModule(StageModule):
    """Stage 0: grid encoder + any-point decoder, trained on reconstruction of normalised fields;
    validated by reconstruction nRMSE in physical units."""

    name, upstream = "autoencoder", None
    trivial_metric = "val/nrmse_mean_field"

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.autoencoder = build_autoencoder(model_cfg, self.contract)
        self.n_query = self.settings["n_query"]
        self.val_mean_field = MeanMetric()

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        u = batch["u"]
        z = self.autoencoder.encode(u, self.x)
        if 0 < self.n_query < u.shape[1]:
            # any-point training: each field is decoded at its own random subset of grid points
            idx = torch.rand(u.shape[0], u.shape[1], device=u.device).argsort(dim=1)[:, : self.n_query]
            recon = self.autoencoder.decode(z, self.x[idx])
            loss = F.mse_loss(recon, torch.gather(u, 1, idx.unsqueeze(-1).expand(-1, -1, u.shape[2])))
        else:
            loss = F.mse_loss(self.autoencoder.decode(z, self.x), u)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        u = batch["u"]
        recon = self.autoencoder(u, self.x)
        self.log("val/loss", F.mse_loss(recon, u), on_epoch=True)
        true = self.physical(u)
        self.log_val_nrmse(self.physical(recon), true)
        # doing nothing useful: the training split's mean field
        self.val_mean_field.update(sample_nrmse(self.physical(torch.zeros_like(u)), true))
        self.log("val/nrmse_mean_field", self.val_mean_field, on_epoch=True)


class _LatentStage(StageModule):
    """A latent stage: holds the frozen autoencoder and reads windows from the LatentDataModule."""

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data, latent_dim=model_cfg["dim"])
        self.autoencoder = freeze(build_autoencoder(model_cfg, self.contract))
        self.val_persistence = MeanMetric()

    def log_persistence(self, u: torch.Tensor) -> None:
        """The one-step nRMSE of persistence (u_{t+1} = u_t), the latent stages' trivial figure."""
        self.val_persistence.update(sample_nrmse(self.physical(u[:, 0]), self.physical(u[:, 1])))
        self.log("val/nrmse_persistence", self.val_persistence, on_epoch=True)

    def decode_phys(self, z: torch.Tensor) -> torch.Tensor:
        return self.physical(self.decode_latent(self.autoencoder, z))

    def load_upstream(self, upstream: StageModule) -> None:
        """Copy the upstream stage's networks and buffers; everything else must be this stage's own."""
        missing, unexpected = self.load_state_dict(upstream.state_dict(), strict=False)
        own = tuple(self.own_prefixes) + ("latent_mean", "latent_std")  # the latter set from the cache
        bad = [k for k in missing if not k.startswith(own)] + [k for k in unexpected if not k.startswith("val_")]
        if bad:
            raise RuntimeError(f"upstream checkpoint does not fit this stage: {bad[:5]}")

    own_prefixes: tuple = ()


@register_stage
class OperatorModule(_LatentStage):
    """Stage 2: z_{t+1} = z_t + f(z_t, cond). Latent MSE, optionally a multi-step (pushforward) term,
    latent input noise and a decoded-space term; validated by one-step physical nRMSE."""

    name, upstream = "operator", "autoencoder"
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
        z, u = batch["z"], batch["u"]
        cond = self.operator.condition(batch["cond"])   # once for the whole unroll
        steps = z.shape[1] - 1
        state = z[:, 0]
        if self.settings["noise_std"] > 0:
            state = state + self.settings["noise_std"] * torch.randn_like(state)
        loss = z.new_zeros(())
        for k in range(1, steps + 1):
            pred = self(state, cond)
            loss = loss + self.step_loss(pred, z[:, k], u[:, k])
            if self.settings["decoded_weight"] > 0:
                decoded = self.decode_latent(self.autoencoder, pred)
                loss = loss + self.settings["decoded_weight"] * F.mse_loss(decoded, u[:, k])
            detach = self.settings["pushforward_detach"] and k < steps
            state = pred.detach() if detach else pred
        loss = loss / steps
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def step_loss(self, pred: torch.Tensor, target: torch.Tensor, u_target: torch.Tensor) -> torch.Tensor:
        """Latent MSE of one step; with `relative_loss`, each sample's error is divided by its
        physical field's mean square (normalised over the batch), as the nRMSE metric weighs it."""
        if not self.settings["relative_loss"]:
            return F.mse_loss(pred, target)
        return relative_mse(pred, target, self.physical(u_target))

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        z, u = batch["z"], batch["u"]
        pred = self(z[:, 0], batch["cond"])
        self.log("val/latent_mse", F.mse_loss(pred, z[:, 1]), on_epoch=True)
        true = self.physical(u[:, 1])
        self.log_val_nrmse(self.decode_phys(pred), true)
        # the two references a user needs to judge the stage: doing nothing, and the decoder's floor
        self.log_persistence(u)
        self.val_recon.update(sample_nrmse(self.decode_phys(z[:, 1]), true))
        self.log("val/nrmse_recon_floor", self.val_recon, on_epoch=True)


class _ResidualStage(_LatentStage):
    """Shared by the diffusion teacher and the distilled student: residuals of the frozen operator,
    scaled by their training-set std (buffer `r_std`). A corrector earns its place only by beating
    the step it corrects, so its trivial figure is the uncorrected operator step, not persistence."""

    trivial_metric = "val/nrmse_operator"
    trivial_label = "the uncorrected operator step"

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.operator = freeze(build_operator(model_cfg, self.contract))
        self.register_buffer("r_std", torch.ones(()))
        self.val_operator = MeanMetric()
        self.val_spread = MeanMetric()

    def operator_step(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.operator(z, cond)

    def scaled_residual(self, batch: Dict[str, torch.Tensor]) -> tuple:
        z = batch["z"]
        z_pred = self.operator_step(z[:, 0], batch["cond"])
        return (z[:, 1] - z_pred) / self.r_std, z_pred

    @torch.no_grad()
    def fit_residual_scale(self, loader: Any, max_batches: int = 50) -> None:
        sq, n = 0.0, 0
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            z = batch["z"].to(self.device)
            r = z[:, 1] - self.operator_step(z[:, 0], batch["cond"].to(self.device))
            sq += float(r.pow(2).sum())
            n += r.numel()
        self.r_std.fill_(max((sq / max(n, 1)) ** 0.5, 1e-8))

    def corrected(self, z_pred: torch.Tensor, cond: torch.Tensor, generator: Any = None) -> torch.Tensor:
        """A stochastic corrected state; `sample_residual` is the subclass's own sampler."""
        return z_pred + self.r_std * self.sample_residual(z_pred, cond, generator)

    def validate_samples(self, batch: Dict[str, torch.Tensor]) -> None:
        z, u, cond = batch["z"], batch["u"], batch["cond"]
        true = self.physical(u[:, 1])
        z_pred = self.operator_step(z[:, 0], cond)
        a = self.decode_phys(self.corrected(z_pred, cond))
        b = self.decode_phys(self.corrected(z_pred, cond))
        self.log_val_nrmse(a, true)
        self.val_operator.update(sample_nrmse(self.decode_phys(z_pred), true))
        self.val_spread.update(sample_nrmse(a, b))  # distinct samples: > 0
        self.log_persistence(u)
        self.log("val/nrmse_operator", self.val_operator, on_epoch=True)
        self.log("val/sample_spread", self.val_spread, on_epoch=True)


@register_stage
class DiffusionModule(_ResidualStage):
    """Stage 3: flow matching on r = z_{t+1} - operator(z_t), conditioned on operator(z_t); sampled
    in K steps. Validated by the one-step physical nRMSE of corrected states and the samples' spread."""

    name, upstream = "diffusion", "operator"
    own_prefixes = ("flow.", "r_std")

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.flow = build_flow(model_cfg, self.contract)

    def sample_residual(self, z_pred: torch.Tensor, cond: torch.Tensor, generator: Any = None,
                        steps: int | None = None) -> torch.Tensor:
        steps = steps or self.settings["sample_steps"]
        return self.flow.sample(z_pred, cond, steps=steps, generator=generator)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r, z_pred = self.scaled_residual(batch)
        loss = self.flow.loss(r, z_pred, batch["cond"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        r, z_pred = self.scaled_residual(batch)
        self.log("val/loss", self.flow.loss(r, z_pred, batch["cond"]), on_epoch=True)
        self.validate_samples(batch)


@register_stage
class DistillModule(_ResidualStage):
    """Stage 4: consistency distillation of the flow teacher into a 1-2 step student. Validated by
    the student's one-step physical nRMSE and spread beside the teacher's K-step ones (the teacher
    samples with the diffusion stage's `sample_steps`)."""

    name, upstream = "distill", "diffusion"
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

    def sample_residual(self, z_pred: torch.Tensor, cond: torch.Tensor, generator: Any = None,
                        steps: int | None = None) -> torch.Tensor:
        steps = steps or self.settings["student_steps"]
        return self.student.sample(z_pred, cond, steps=steps, generator=generator)

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
        z, u, cond = batch["z"], batch["u"], batch["cond"]
        true = self.physical(u[:, 1])
        z_pred = self.operator_step(z[:, 0], cond)

        def teacher() -> torch.Tensor:
            r = self.flow.sample(z_pred, cond, steps=self.teacher_steps)
            return self.decode_phys(z_pred + self.r_std * r)

        a, b = teacher(), teacher()
        self.val_teacher.update(sample_nrmse(a, true))
        self.val_teacher_spread.update(sample_nrmse(a, b))
        self.log("val/teacher_nrmse", self.val_teacher, on_epoch=True)
        self.log("val/teacher_spread", self.val_teacher_spread, on_epoch=True)

