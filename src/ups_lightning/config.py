"""Structured config schema for `python -m ups_lightning.train`.

The YAML files under `conf/` stay plain; the composed config is merged onto this schema before
anything runs, so an unknown key or a wrongly typed value is a clear error naming the key
(`validate_train_config`) instead of a traceback deep inside a stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ups_lightning.errors import UserError

STAGE_ORDER = ("autoencoder", "operator", "diffusion", "distill")


@dataclass
class DataConfig:
    name: str = "burgers1d_small"
    pde: str = "burgers1d"
    root: str = "data"
    path: str = "data/burgers1d_small/1D_Burgers_Sols_Nu0.001.hdf5"
    nu: float = 0.001
    nx: int = 256
    nt: int = 41
    t_max: float = 2.0
    seed: int = 0
    n_train: int = 512
    n_val: int = 64
    n_test: int = 128
    reduced_resolution: int = 1
    reduced_resolution_t: int = 1
    initial_step: int = 10
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class ModelConfig:
    name: str = "dim32"
    dim: int = 32
    n_tokens: int = 32
    depth: int = 4           # operator blocks
    levels: int = 1          # U-shaped token down/up-sampling levels in the operator
    ae_depth: int = 2        # encoder blocks
    decoder_depth: int = 1   # decoder cross-attention blocks
    n_fourier: int = 64      # Fourier features of query coordinates
    diffusion_depth: int = 3
    attn_backend: str = "sdpa"  # sdpa | flash


@dataclass
class StageSelect:
    name: str = "all"
    run: List[str] = field(default_factory=lambda: list(STAGE_ORDER))


@dataclass
class AutoencoderStage:
    max_epochs: int = 20
    max_minutes: Optional[float] = None
    batch_size: int = 64
    lr: float = 1e-3
    val_frames: int = 8          # frames per validation trajectory (evenly spaced)
    n_query: int = 96            # random query points per field in training (0: the whole grid)


@dataclass
class OperatorStage:
    max_epochs: int = 30
    max_minutes: Optional[float] = None
    batch_size: int = 64
    lr: float = 1e-3
    rollout_steps: int = 8       # >1: multi-step (pushforward) loss over this many steps
    pushforward_detach: bool = False  # True: stop gradients between the unrolled steps
    decoded_weight: float = 0.0  # weight of the decoded-space loss through the frozen decoder
    noise_std: float = 0.0       # latent noise injection on the input state
    relative_loss: bool = False  # weigh each sample's error by 1 / its field's mean square (as nRMSE does)


@dataclass
class DiffusionStage:
    max_epochs: int = 20
    max_minutes: Optional[float] = None
    batch_size: int = 64
    lr: float = 1e-3
    sample_steps: int = 16       # K teacher steps at sampling time
    val_batches: Optional[int] = None  # validation batches per epoch (None: trainer.limit_val_batches)


@dataclass
class DistillStage:
    max_epochs: int = 10
    max_minutes: Optional[float] = None
    batch_size: int = 64
    lr: float = 5e-4
    n_grid: int = 16             # teacher ODE grid the student is made consistent along
    student_steps: int = 1       # 1 or 2 sampling steps
    target_decay: float = 0.95   # EMA of the consistency target
    val_batches: Optional[int] = None  # validation batches per epoch (None: trainer.limit_val_batches)


@dataclass
class StagesConfig:
    autoencoder: AutoencoderStage = field(default_factory=AutoencoderStage)
    operator: OperatorStage = field(default_factory=OperatorStage)
    diffusion: DiffusionStage = field(default_factory=DiffusionStage)
    distill: DistillStage = field(default_factory=DistillStage)


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    compile: bool = False
    deterministic: bool = False
    log_every_n_steps: int = 10
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    check_val_every_n_epoch: int = 1
    num_threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch's default)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.99


@dataclass
class OptimConfig:
    name: str = "adamw"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    schedule: str = "cosine"     # cosine | constant
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.05
    grad_clip: Optional[float] = 1.0
    accumulate: int = 1
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class LoggerConfig:
    name: str = "csv"            # csv | tensorboard | wandb
    project: str = "ups_lightning"
    offline: bool = True


@dataclass
class CheckpointConfig:
    save_top_k: int = 1
    save_last: bool = True


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 10
    min_delta: float = 0.0


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    lr_monitor: bool = True
    progress_bar: str = "rich"   # rich | tqdm | none


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageSelect = field(default_factory=StageSelect)
    stages: StagesConfig = field(default_factory=StagesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    seed: int = 0
    run_name: str = "burgers1d_small/dim32"
    run_dir: str = "outputs/runs/burgers1d_small/dim32"
    ckpt_path: Optional[str] = None
    experiment: Optional[str] = None


def validate_train_config(cfg: DictConfig) -> DictConfig:
    """Merge the composed config onto the schema; unknown keys and wrong types become UserError."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise UserError(
            f"invalid training config at key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}. "
            "Check the spelling of the key and the type of its value against "
            "src/ups_lightning/config.py (the config schema) or the YAML files under conf/."
        ) from None
    unknown = [s for s in merged.stage.run if s not in STAGE_ORDER]
    if unknown:
        raise UserError(
            f"stage.run lists unknown stage(s) {unknown}; known stages are {list(STAGE_ORDER)} "
            "(pick a stage with stage=autoencoder|operator|diffusion|distill|all)."
        )
    if merged.model.attn_backend not in ("sdpa", "flash"):
        raise UserError(f"model.attn_backend={merged.model.attn_backend!r}: expected 'sdpa' or 'flash'.")
    if merged.optim.schedule not in ("cosine", "constant"):
        raise UserError(f"optim.schedule={merged.optim.schedule!r}: expected 'cosine' or 'constant'.")
    if merged.logger.name not in ("csv", "tensorboard", "wandb"):
        raise UserError(f"logger.name={merged.logger.name!r}: expected csv, tensorboard or wandb.")
    return merged


def to_container(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
