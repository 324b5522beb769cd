"""The Python API: a finished run in one line, rolled out from given frames.

    from ups_lightning.api import load
    model = load("outputs/runs/<data>/<model>")     # the verified chain, up to the last stage
    pred = model.rollout(frames, steps=31)                   # (B, T_given, X, C) or (B, X, C) -> (B, 31, X, C)

The model is loaded as evaluation loads it (``evaluation.load_run``: every checkpoint checked against
its record, every carried network against its upstream stage), on the grid, equation and
conditioning of the data it was trained on (its pinned file: ``data/pin.py``), with the guard
evaluation uses by default (decode, project onto the equation's invariants, re-encode each step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch

__all__ = ["load", "Model"]


@dataclass
class Model:
    """A finished run as a surrogate: ``rollout`` from physical frames to physical frames."""

    run_dir: Path
    pde: str
    params: Dict[str, float]
    dt: float
    stages: tuple
    surrogate: Any

    @torch.no_grad()
    def rollout(self, frames: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` predicted frames (B, steps, *space, C) from the last of ``frames`` ((B, T, *space, C),
        or (B, *space, C) for one frame each; space = (X,) or (X, Y)), autoregressively, in physical units."""
        from ups_lightning.inference.rollout import rollout

        u = torch.as_tensor(frames, dtype=torch.float32)
        x = self.surrogate.x
        space = tuple(x.shape) if x.dim() == 1 else tuple(x.shape[:-1])   # (X,) or (X, Y, 2) coordinates
        if u.ndim == len(space) + 3:
            u = u[:, -1]
        if u.ndim != len(space) + 2 or tuple(u.shape[1:-1]) != space:
            grid = ", ".join(map(str, space))
            raise ValueError(f"frames must be (B, T, {grid}, C) or (B, {grid}, C) on the run's grid, got "
                             f"{tuple(torch.as_tensor(frames).shape)}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return rollout(self.surrogate, u, int(steps))


def load(run_dir: str | Path, upto: Optional[str] = None, guard: bool = True) -> Model:
    """The run in ``run_dir`` up to stage ``upto`` (default: the last finished one), ready to roll
    out. ``guard=False``: a pure latent rollout (no projection, no re-encoding)."""
    from ups_lightning.data.datamodule import member_configs
    from ups_lightning.data.pdebench import open_dataset, split_options
    from ups_lightning.errors import UserError
    from ups_lightning.evaluation import CHECK_ROWS, EvalData, build_surrogate, file_physics, load_run, pinned_data
    from ups_lightning.inference.rollout import Guard

    run_dir = Path(run_dir)
    train_cfg, records, module = load_run(run_dir, upto)
    members = member_configs(train_cfg.data)
    if len(members) != 1:
        raise UserError(f"{run_dir} was trained on several equations ({', '.join(members)}); load() rolls out "
                        "single-equation runs.")
    member = next(iter(members.values()))
    pin = pinned_data(records, member.pde)
    path = pin["path"] if pin and Path(pin["path"]).is_file() else member.path
    view = open_dataset(path, reduced_resolution=member.reduced_resolution,
                        reduced_resolution_t=member.reduced_resolution_t, pde=member.pde, n_train=member.n_train,
                        n_val=member.n_val, n_test=member.n_test, **split_options(member))
    meta = view.meta
    grid = SimpleNamespace(meta=meta)    # what build_surrogate reads of a data view: its grid
    # the domain its frames follow, checked on a few training rows (evaluation.file_physics)
    physics = file_physics(EvalData(path, meta, torch.empty(0), "train",
                                    view.read("train", rows=slice(0, CHECK_ROWS))), member)
    g = Guard(reencode=guard, invariants=guard)      # evaluation's default guard, or none
    sur = build_surrogate(train_cfg, module, grid, physics, g)
    return Model(run_dir=run_dir, pde=meta.pde, params=dict(physics.params), dt=float(meta.dt),
                 stages=tuple(records), surrogate=sur)
