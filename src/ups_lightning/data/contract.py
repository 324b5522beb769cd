"""The data contract: what a model is built for, taken from the data (never from an equation's name).

``DataContract`` carries the equations a run trains on, the spatial shape, the channel count and the
conditioning layout. Models take their channels and conditioning width from it; every checkpoint
stores it (as a hyperparameter), so a finished stage knows what data it can score.

Conditioning vector, one per trajectory (all entries O(1)):

    [dt / dt_ref]  +  [one-hot of the equation, only when the run has several]
                   +  for each equation of the run, its parameters' features (zeros for the others)

For a single-equation run whose one parameter p has reference value r this is
``[dt / dt_ref, log10(p / r)]`` (each spec's ``Parameter`` says how its parameter becomes a feature).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

import torch

from ups_lightning.errors import UserError
from ups_lightning.pdes import get_pde

__all__ = ["DataContract"]


@dataclass(frozen=True)
class DataContract:
    pdes: Tuple[str, ...]             # the run's equations, in the order of their conditioning slots
    spatial_shape: Tuple[int, ...]    # cells per spatial axis after reduction
    n_channels: int

    def __post_init__(self) -> None:
        for name in self.pdes:
            get_pde(name)
        if len(set(self.pdes)) != len(self.pdes) or not self.pdes:
            raise ValueError(f"DataContract: equations must be distinct and at least one, got {self.pdes}")

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def cond_dim(self) -> int:
        one_hot = len(self.pdes) if len(self.pdes) > 1 else 0
        return 1 + one_hot + sum(len(get_pde(p).params) for p in self.pdes)

    def conditioning(self, pde: str, params: Mapping[str, float], dt: float) -> torch.Tensor:
        """(cond_dim,) float32 for a trajectory of equation ``pde`` with ``params`` and frame step dt."""
        if pde not in self.pdes:
            raise UserError(f"this model was trained on {', '.join(self.pdes)}; it cannot be "
                            f"conditioned on {pde!r} data.")
        if not (math.isfinite(dt) and dt > 0):
            raise UserError(f"frame step dt={dt}: need at least 2 evenly spaced frames to condition "
                            f"on the time step.")
        spec = get_pde(pde)
        params = spec.check_params(params, f"{pde} parameters")
        values = [dt / spec.dt_ref]
        if len(self.pdes) > 1:
            values += [1.0 if p == pde else 0.0 for p in self.pdes]
        for p in self.pdes:
            values += spec.features(params) if p == pde else [0.0] * len(get_pde(p).params)
        return torch.tensor(values, dtype=torch.float32)

    def to_dict(self) -> Dict[str, Any]:
        return {"pdes": list(self.pdes), "spatial_shape": list(self.spatial_shape),
                "n_channels": int(self.n_channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataContract":
        return cls(tuple(d["pdes"]), tuple(int(v) for v in d["spatial_shape"]), int(d["n_channels"]))
