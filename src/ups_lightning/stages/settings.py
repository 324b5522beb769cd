"""What every stage's settings hold (``stages.<name>``); ranges stated with ``schema.setting``.

The schema holds types, ranges and keys, never defaults: every value comes from conf/ (the
``MISSING`` default makes a key no YAML file sets an error naming it). Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from ups_lightning.schema import setting


@dataclass
class StageOptim:
    """One stage's own optimiser settings; each None takes the global `optim` value (stage_optim)."""

    betas: Optional[List[float]] = MISSING
    weight_decay: Optional[float] = setting(0.0)
    schedule: Optional[str] = setting(choices=("cosine", "constant"))
    warmup_ratio: Optional[float] = setting(0.0, high=1.0)
    min_lr_ratio: Optional[float] = setting(0.0, high=1.0)
    grad_clip: Optional[float] = setting(0.0, low_ok=False)
    ema_decay: Optional[float] = setting(0.0, high=1.0)


STAGE_OPTIM_INHERIT: Dict[str, Any] = {k: None for k in StageOptim.__dataclass_fields__}


@dataclass
class StageSettings:
    """The keys every stage has; a stage's ``Settings`` adds its own."""

    max_epochs: int = setting(1)
    max_minutes: Optional[float] = setting(0.0, low_ok=False)
    batch_size: int = setting(1)
    lr: float = setting(0.0, low_ok=False)
    optim: StageOptim = field(default_factory=StageOptim, metadata={"later": STAGE_OPTIM_INHERIT})


@dataclass
class BudgetShares:
    """Our plain rollout's two stages' fractions of a wall-clock budget (the bench's and the proxy's
    ``shares``): each in (0, 1]; the drivers check that they add up to at most 1."""

    autoencoder: float = setting(0.0, low_ok=False, high=1.0)
    operator: float = setting(0.0, low_ok=False, high=1.0)
