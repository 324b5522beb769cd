"""Callbacks the stages share."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging

from ups_lightning.atomic import atomic_path


def _ema_keeping_constants(decay: float, bias_correction: bool = True
                           ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        # decay * p + (1 - decay) * p is not always p in floating point: without this check the
        # frozen upstream networks would drift by an ulp per step, and with them the cache key.
        if torch.equal(averaged, current):
            return averaged
        if not averaged.is_floating_point():   # counters (BatchNorm's num_batches_tracked): the model's
            return current
        weight = 1.0 - decay
        if bias_correction:   # num_averaged updates so far (the first copied the weights): see EMA
            weight = weight / (1.0 - decay ** (float(num_averaged) + 1.0))
        return averaged.lerp(current, weight)

    return avg


class EMA(WeightAveraging):
    """Lightning's EMA of weights (validated and checkpointed with the averaged weights), keeping
    parameters and buffers that never change (frozen upstream stages) bit-identical.

    ``bias_correction`` (the default): the average after t updates is Adam's bias-corrected EMA,
    sum_i d^(t-i) (1-d) w_i / (1 - d^t), so every weight counts by its age alone. Without it the
    first step's weights keep d^(t-1) of the average (0.65 after 43 steps at d = 0.99: a model that
    takes few steps is validated with weights close to its initial ones; issue 22).

    Built on the public ``WeightAveraging`` constructor, whose keyword arguments go to torch's
    ``AveragedModel`` (``avg_fn`` here). ``EMAWeightAveraging`` cannot take an ``avg_fn`` (it passes
    its own), so this is the same callback with the constant-keeping average; the inherited
    ``should_update`` (after every optimizer step, never at epoch ends) is ``EMAWeightAveraging``'s
    default schedule."""

    def __init__(self, decay: float = 0.999, bias_correction: bool = True) -> None:
        super().__init__(avg_fn=_ema_keeping_constants(decay, bias_correction))
        self.decay, self.bias_correction = decay, bias_correction


class NonFiniteLossStop(Callback):
    """Stop the stage at the first NaN/Inf training loss (nothing learns past it); `reason` says
    when, and the stage runner refuses a result whose best checkpoint is not finite."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and not torch.isfinite(loss).all():
            self.reason = f"the training loss became {float(loss)} at step {trainer.global_step}"
            trainer.should_stop = True


class RNGState(Callback):
    """Checkpoints carry torch's, numpy's and Python's RNG states, restored when the resumed stage
    starts its next training epoch (after the sanity check, which draws samples), so a killed and
    resumed stage shuffles and samples exactly as the uninterrupted one. Plain types and tensors
    only: checkpoints stay loadable with weights_only=True."""

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


class EagerValidation(Callback):
    """Validation (and the sanity check before training) runs the compiled networks eager: its batches
    come in other shapes and another grad mode than training's, and compiling a graph for each would
    cost tens of seconds of a stage's clock (the sanity check's outside it) for a few batches."""

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        torch.compiler.set_stance("force_eager")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        torch.compiler.set_stance("default")


SNAPSHOTS = "snapshots"   # the stage directory's folder of network snapshots (Snapshots below)


class Snapshots(Callback):
    """Saves one network's weights every ``every`` training epochs into ``<stage dir>/snapshots/
    epoch<NNN>.pt``: the weights the stage validates with (the EMA's average when the stage keeps one),
    as the plain ``state_dict`` of ``network`` (e.g. ``operator``). These are the one-run TTC members of
    issue 21: checkpoints along the same training run, which cost no extra training. A resumed stage
    rewrites an epoch's file only when it reaches that epoch again."""

    def __init__(self, every: int, network: str, directory: Any) -> None:
        if every < 1:
            raise ValueError(f"Snapshots: every must be >= 1 epoch, got {every}")
        self.every, self.network, self.directory = int(every), network, Path(directory)

    def _evaluated(self, trainer: Any, pl_module: Any) -> Any:
        for c in trainer.callbacks:   # the averaged copy's network (Lightning keeps it private)
            averaged = getattr(c, "_average_model", None) if isinstance(c, WeightAveraging) else None
            if averaged is not None:
                return getattr(averaged.module, self.network)
        return getattr(pl_module, self.network)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1   # epochs finished
        if epoch % self.every or not trainer.is_global_zero:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in self._evaluated(trainer, pl_module).state_dict().items()}
        with atomic_path(self.directory / f"epoch{epoch:03d}.pt") as tmp:
            torch.save(state, tmp)
