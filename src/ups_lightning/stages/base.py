"""What every stage's LightningModule shares: the optimiser and schedule from config, the frozen
physical-space pieces (decoder, normaliser, latent statistics), the physical validation figure, and
the hooks training and evaluation call instead of naming a stage (``StageModule``); the bases of
the latent stages (``LatentStage``) and of the residual correctors (``ResidualStage``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
from lightning.pytorch.callbacks import Timer
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ups_lightning.data.contract import DataContract
from ups_lightning.eval.metrics import sample_nrmse  # the one nRMSE: training, evaluation, bench
from ups_lightning.models.autoencoder import Autoencoder
from ups_lightning.models.diffusion import ResidualFlow
from ups_lightning.models.operator import PDETransformer
from ups_lightning.models.sizes import sizes_of
from ups_lightning.stages.settings import StageSettings


def build_autoencoder(model_cfg: Dict[str, Any], contract: DataContract) -> Autoencoder:
    """The autoencoder for the data's channels and grid (the data contract)."""
    s = sizes_of(model_cfg)
    return Autoencoder(
        in_channels=contract.n_channels, spatial_shape=tuple(contract.spatial_shape), dim=s.dim,
        n_tokens=s.n_tokens, depth=model_cfg["ae_depth"], heads=s.heads, hidden=s.hidden,
        n_fourier=model_cfg["n_fourier"], decoder_depth=model_cfg["decoder_depth"],
        # the stem as it was before these were keys, for checkpoints that lack them
        stem_layers=model_cfg.get("stem_layers", 2), stem_kernel=model_cfg.get("stem_kernel", 5),
        stem_channels=model_cfg.get("stem_channels"),
    )


def build_operator(model_cfg: Dict[str, Any], contract: DataContract) -> PDETransformer:
    s = sizes_of(model_cfg)
    return PDETransformer(dim=s.dim, n_tokens=s.n_tokens, depth=s.depth, heads=s.heads, hidden=s.hidden,
                          cond_dim=contract.cond_dim, levels=model_cfg["levels"],
                          attn_backend=model_cfg["attn_backend"])


def build_flow(model_cfg: Dict[str, Any], contract: DataContract, cls: type = ResidualFlow) -> nn.Module:
    s = sizes_of(model_cfg)
    return cls(dim=s.dim, n_tokens=s.n_tokens, depth=model_cfg["diffusion_depth"], heads=s.heads,
               hidden=s.hidden, cond_dim=contract.cond_dim)


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


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE of channel-last fields over their present channels (``mask`` (B, C): a masked layout,
    ``DataContract``); plain MSE without a mask."""
    if mask is None:
        return F.mse_loss(pred, target)
    m = per_channel(mask, pred).expand_as(pred)
    return ((pred - target).pow(2) * m).sum() / m.sum().clamp_min(1.0)


def per_channel(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A channel mask (B, C) shaped to broadcast over channel-last fields ``like`` (B, ..., C)."""
    return mask.view(mask.shape[0], *[1] * (like.dim() - 2), mask.shape[1])


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
    needs) and the data contract (``DataContract.to_dict()``). A stage declares what training and
    evaluation need to know about it (below) and is registered in ``ups_lightning.stages``.

    Buffers `x` (unit coordinates), `field_mean/std` (physical normalisation) and `latent_mean/std`
    travel in every checkpoint, and the contract in its hyperparameters, so a stage can be
    evaluated from its checkpoint alone. Conditioning comes with each batch (`batch["cond"]`).
    """

    name: str = ""
    Settings: type = StageSettings    # the schema of stages.<name> (stages/settings.py)
    role: str = ""                    # encoder | stepper | corrector: what evaluation uses it for
    trains: tuple = ()                # the networks (attributes) this stage trains; upstream ones are frozen
    compile_whole: tuple = ()         # of those, the ones torch.compile takes as one graph (training.compile_networks)
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

    def present(self, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The batch's channel mask (B, C) in a masked layout (``DataContract``: an equation with fewer
        fields than the model's channels); None when every equation fills every channel."""
        return self.contract.channel_mask(batch["cond"]) if self.contract.masked else None

    def physical(self, u_normalised: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Physical units; with ``mask`` (B, C) the absent channels are zeroed, so that a figure
        computed on zeroed prediction and truth alike counts the present channels alone."""
        u = u_normalised * self.field_std + self.field_mean
        return u if mask is None else u * per_channel(mask, u)

    def decode_latent(self, autoencoder: Autoencoder, z_normalised: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> normalised field on the data grid."""
        return autoencoder.decode(z_normalised * self.latent_std + self.latent_mean, self.x)

    def log_val_nrmse(self, pred_phys: torch.Tensor, true_phys: torch.Tensor) -> None:
        self.val_nrmse.update(sample_nrmse(pred_phys, true_phys))
        self.log("val/nrmse", self.val_nrmse, prog_bar=True, on_epoch=True)

    # --- what training calls (training.run_stage), so that it names no stage ------------------
    def prepare(self, cfg: Any, data: Any, x: torch.Tensor, upstream: Optional["StageModule"],
                latents_dir: Path) -> L.LightningDataModule:
        """Take what the stage needs from the run's data and its finished upstream stage (None for
        the first stage) and return the data module it trains on."""
        raise NotImplementedError(f"stage {self.name} does not say how it gets its data (prepare)")

    def stage_callbacks(self, out: Path) -> List[Any]:
        """Callbacks of the stage's own (besides the ones every stage gets), writing under ``out``."""
        return []


class LatentStage(StageModule):
    """A latent stage: holds the frozen autoencoder and reads windows from the LatentDataModule."""

    own_prefixes: tuple = ()     # state-dict keys of its own (the rest is copied from upstream)

    def __init__(self, model_cfg: Dict[str, Any], optim_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                 data: Dict[str, Any]) -> None:
        super().__init__(model_cfg, optim_cfg, stages_cfg, data, latent_dim=model_cfg["dim"])
        self.autoencoder = freeze(build_autoencoder(model_cfg, self.contract))
        self.val_persistence = MeanMetric()

    def log_persistence(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """The one-step nRMSE of persistence (u_{t+1} = u_t), the latent stages' trivial figure."""
        self.val_persistence.update(sample_nrmse(self.physical(u[:, 0], mask), self.physical(u[:, 1], mask)))
        self.log("val/nrmse_persistence", self.val_persistence, on_epoch=True)

    def decode_phys(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.physical(self.decode_latent(self.autoencoder, z), mask)

    def load_upstream(self, upstream: StageModule) -> None:
        """Copy the upstream stage's networks and buffers; everything else must be this stage's own."""
        missing, unexpected = self.load_state_dict(upstream.state_dict(), strict=False)
        own = tuple(self.own_prefixes) + ("latent_mean", "latent_std")  # the latter set from the cache
        bad = [k for k in missing if not k.startswith(own)] + [k for k in unexpected if not k.startswith("val_")]
        if bad:
            raise RuntimeError(f"upstream checkpoint does not fit this stage: {bad[:5]}")

    def unroll_steps(self) -> int:
        """Steps per training window (1: one-step pairs)."""
        return 1

    def prepare(self, cfg: Any, data: Any, x: torch.Tensor, upstream: Optional[StageModule],
                latents_dir: Path) -> L.LightningDataModule:
        """The latent cache of the run's data under the upstream autoencoder (built once, shared by
        every latent stage), the upstream networks copied in, windows of ``unroll_steps``."""
        from ups_lightning.data.cache import build_or_load_latent_cache
        from ups_lightning.data.datamodule import LatentDataModule

        cache = build_or_load_latent_cache(upstream.autoencoder, data, x, latents_dir)
        self.load_upstream(upstream)
        self.set_data_context(x, data.normalizer.mean, data.normalizer.std, cache.latent_mean, cache.latent_std)
        cond = {split: data.cond(split) for split in ("train", "val")}
        datamodule = LatentDataModule(cache, cond, self.settings["batch_size"], steps=self.unroll_steps(),
                                      num_workers=cfg.data.num_workers)
        self.before_fit(datamodule)
        return datamodule

    def before_fit(self, datamodule: L.LightningDataModule) -> None:
        """Anything the stage fits from its data before training (nothing by default)."""


class ResidualStage(LatentStage):
    """Shared by the diffusion teacher and the distilled student: residuals of the frozen operator,
    scaled by their training-set std (buffer `r_std`). A corrector earns its place only by beating
    the step it corrects, so its trivial figure is the uncorrected operator step, not persistence."""

    role = "corrector"
    corrector: str = ""      # its name in evaluation's rows and ttc settings (teacher, student)
    steps_setting: str = ""  # its setting of the steps one corrected state takes to sample
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

    def sample_residual(self, z_pred: torch.Tensor, cond: torch.Tensor, generator: Any = None,
                        steps: Optional[int] = None) -> torch.Tensor:
        """A scaled residual sampled by the network the stage trains, in ``steps`` (default: its
        ``steps_setting``)."""
        net = getattr(self, self.trains[0])
        return net.sample(z_pred, cond, steps=steps or self.settings[self.steps_setting], generator=generator)

    def corrected(self, z_pred: torch.Tensor, cond: torch.Tensor, generator: Any = None) -> torch.Tensor:
        """A stochastic corrected state."""
        return z_pred + self.r_std * self.sample_residual(z_pred, cond, generator)

    def validate_samples(self, batch: Dict[str, torch.Tensor]) -> None:
        z, u, cond, m = batch["z"], batch["u"], batch["cond"], self.present(batch)
        true = self.physical(u[:, 1], m)
        z_pred = self.operator_step(z[:, 0], cond)
        a = self.decode_phys(self.corrected(z_pred, cond), m)
        b = self.decode_phys(self.corrected(z_pred, cond), m)
        self.log_val_nrmse(a, true)
        self.val_operator.update(sample_nrmse(self.decode_phys(z_pred, m), true))
        self.val_spread.update(sample_nrmse(a, b))  # distinct samples: > 0
        self.log_persistence(u, m)
        self.log("val/nrmse_operator", self.val_operator, on_epoch=True)
        self.log("val/sample_spread", self.val_spread, on_epoch=True)
