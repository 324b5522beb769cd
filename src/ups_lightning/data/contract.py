"""The data contract: what a model is built for, taken from the data (never from an equation's name).

``DataContract`` carries the equations a run trains on, the spatial shape, the channel count, each
equation's field count and the conditioning layout. Models take their channels and conditioning width from it; every checkpoint
stores it (as a hyperparameter), so a finished stage knows what data it can score.

Conditioning vector, one per trajectory (all entries O(1)):

    [dt / dt_ref]  +  [one-hot of the equation, only when the run has several]
                   +  for each equation of the run, its parameters' features (zeros for the others)

For a single-equation run whose one parameter p has reference value r this is
``[dt / dt_ref, log10(p / r)]`` (each spec's ``Parameter`` says how its parameter becomes a feature).

Channel layout (a masked layout when the equations' field counts differ): the model has
``n_channels`` = the largest field count; channel k holds field k of every equation that has one, and
an equation with fewer fields leaves its last channels *absent*: filled with the channel's mean on the
way in (normalised 0), left out of every loss and metric (``channel_mask``), and dropped on the way out
(``inference.rollout.Surrogate``). ``fields`` is each equation's field count, aligned with ``pdes``.
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
    fields: Tuple[int, ...] = ()      # each equation's field count (channels 0 .. n - 1); () = all n_channels

    def __post_init__(self) -> None:
        for name in self.pdes:
            get_pde(name)
        if len(set(self.pdes)) != len(self.pdes) or not self.pdes:
            raise ValueError(f"DataContract: equations must be distinct and at least one, got {self.pdes}")
        fields = tuple(int(n) for n in self.fields) or (int(self.n_channels),) * len(self.pdes)
        if len(fields) != len(self.pdes) or not all(1 <= n <= self.n_channels for n in fields) \
                or max(fields) != self.n_channels:
            raise ValueError(f"DataContract: fields={self.fields} must give each of {self.pdes} a field count "
                             f"in 1..{self.n_channels}, the largest equal to n_channels={self.n_channels}")
        object.__setattr__(self, "fields", fields)

    @property
    def masked(self) -> bool:
        """Some equation leaves channels absent (module doc)."""
        return min(self.fields) < self.n_channels

    def channels(self, pde: str) -> int:
        """The fields of ``pde``: it fills the model's channels 0 .. n - 1."""
        return self.fields[self.pdes.index(pde)]

    def channel_mask(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, n_channels) float: 1 where the channel is one of the trajectory's fields, 0 where it is
        absent, read from the equation's one-hot in each conditioning vector ``cond (B, cond_dim)``."""
        present = torch.tensor([[1.0 if k < n else 0.0 for k in range(self.n_channels)] for n in self.fields],
                               dtype=cond.dtype, device=cond.device)
        if len(self.pdes) == 1:
            return present.expand(cond.shape[0], -1)
        return cond[:, 1:1 + len(self.pdes)] @ present

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
        d = {"pdes": list(self.pdes), "spatial_shape": list(self.spatial_shape), "n_channels": int(self.n_channels)}
        if self.masked:      # only then: every other run's hyperparameters stay as they were
            d["fields"] = list(self.fields)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataContract":
        return cls(tuple(d["pdes"]), tuple(int(v) for v in d["spatial_shape"]), int(d["n_channels"]),
                   tuple(int(v) for v in d.get("fields", ())))
