"""Callbacks the stages share."""
from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def _ema_keeping_constants(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        # decay * p + (1 - decay) * p is not always p in floating point: without this check the
        # frozen upstream networks would drift by an ulp per step, and with them the cache key.
        if torch.equal(averaged, current):
            return averaged
        return averaged.lerp(current, 1.0 - decay)

    return avg


class EMA(EMAWeightAveraging):
    """Lightning's EMA of weights (validated and checkpointed with the averaged weights), keeping
    parameters and buffers that never change (frozen upstream stages) bit-identical."""

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__(decay=decay)
        self._kwargs["avg_fn"] = _ema_keeping_constants(decay)
