"""The FNO peer of the benchmark suite (benchmark.md section 4): PDEBench's FNO1d and FNO2d, built from
the `neuraloperator` library, trained and scored the way PDEBench does it.

Architecture (PDEBench ``FNO1d(num_channels=1, modes=12, width=20, initial_step=10)``):
input the ``initial_step`` previous frames plus the grid coordinate as channels, a linear lift to
``width``, 4 Fourier layers ``gelu(K u + W u)`` (no activation after the last), keeping the first 12
real-FFT modes, and a projection ``width -> 128 -> 1``. In neuraloperator 2.0 terms: ``FNO`` with
``positional_embedding="grid"`` (the x channel, on [0, 1)), ``lifting_channel_ratio=0`` (one linear
lift), ``use_channel_mlp=False``, ``fno_skip="linear"``, ``projection_channel_ratio=128/width`` and
``n_modes=(2 * (modes - 1),)``: neuraloperator counts modes on the full FFT axis and keeps
``n // 2 + 1`` real-FFT modes, so ``n_modes=(12,)`` would keep only 7; ``(22,)`` keeps PDEBench's 12.
The parameter count then equals PDEBench's FNO1d exactly (23,937 with complex weights counted once,
as ``numel`` does). Two departures, both deliberate: no zero-padding of the periodic domain (PDEBench
pads 2 cells "if input is non-periodic"; the 1D data here are periodic), and the grid channel is the unit
coordinate, as every model of this project sees it.

2D (PDEBench ``FNO2d(num_channels, modes1=12, modes2=12, width=20, initial_step=10)``): the same
network on (X, Y) with two grid channels; PDEBench keeps 12 modes of each sign on the first axis and
12 real-FFT modes on the last, ``n_modes=(24, 22)`` in neuraloperator's count. Its 2D equations are
not periodic, so the domain is zero-padded by 2 cells per axis after the lift, as PDEBench pads it
(neuraloperator pads both ends, PDEBench the far end only: the one departure in 2D).

Training (PDEBench ``training_type="autoregressive"``): from the first ``initial_step`` frames of a
training trajectory, predict the next frame, append it to the input window and repeat to frame
``t_train`` (default: the end), gradients through the whole unroll (PDEBench does not detach). The
loop is ``bench/peers.py``'s ``PeerModule``, the same Lightning trainer, timer, optimiser, schedule and
loss choice as our stages (PDEBench's own Adam + StepLR(100 epochs) never decays inside a short
wall-clock budget, so it is not used); its learning rate comes from the benchmark's search.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn


__all__ = ["FNOSettings", "FNOPeer", "build_fno", "PAD_CELLS"]

PAD_CELLS = 2   # PDEBench's FNO padding of a non-periodic domain (cells per axis)


@dataclass
class FNOSettings:
    modes: int = 12               # real-FFT modes kept (PDEBench's count)
    width: int = 20
    n_layers: int = 4
    projection: int = 128         # hidden width of the projection MLP
    batch_size: Optional[int] = None  # None: PDEBench's for the data's dimension (peers.PDEBENCH_BATCH_SIZE)
    max_epochs: int = 500
    t_train: Optional[int] = None  # last frame (exclusive) of the training unroll; None: all frames
    grad_frames: Optional[int] = None  # predictions with gradients (the last ones); None: all
    val_batch_size: int = 200

    @classmethod
    def from_mapping(cls, d: Dict[str, Any]) -> "FNOSettings":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class FNOPeer(nn.Module):
    """Frames (B, T_in, *space, C) -> next frame (B, *space, C), space (X,) or (X, Y). Channels of the
    network: T_in * C + one grid channel per axis. ``spatial_shape``: the grid (None: 1D);
    ``periodic=False`` pads the domain by PAD_CELLS cells per axis (module doc)."""

    def __init__(self, initial_step: int, channels: int = 1, settings: Optional[FNOSettings] = None,
                 spatial_shape: Optional[Tuple[int, ...]] = None, periodic: bool = True):
        super().__init__()
        from neuralop.models import FNO

        s = settings or FNOSettings()
        if s.modes < 1:
            raise ValueError(f"fno.modes={s.modes} must be >= 1")
        self.initial_step, self.channels = int(initial_step), int(channels)
        self.dims = 1 if spatial_shape is None else len(spatial_shape)
        if self.dims not in (1, 2):
            raise ValueError(f"FNOPeer: 1D or 2D grids, got spatial_shape={spatial_shape}")
        # neuraloperator counts modes on the full FFT axis (both signs) and n // 2 + 1 on the last
        n_modes = (2 * s.modes,) * (self.dims - 1) + (max(1, 2 * (s.modes - 1)),)
        pad = None if periodic or spatial_shape is None else [PAD_CELLS / n for n in spatial_shape]
        self.net = FNO(
            n_modes=n_modes, in_channels=self.initial_step * self.channels,
            out_channels=self.channels, hidden_channels=s.width, n_layers=s.n_layers,
            lifting_channel_ratio=0, projection_channel_ratio=s.projection / s.width,
            positional_embedding="grid", use_channel_mlp=False, fno_skip="linear", domain_padding=pad,
        )

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        # neuraloperator's models add a '_metadata' entry to the state dict they are part of; the
        # wrapper's state dict holds tensors only, so that it loads back with nn.Module's strict check
        sd = super().state_dict(*args, **kwargs)
        if isinstance(sd, dict):
            sd.pop("_metadata", None)
        return sd

    def forward(self, window: Tensor) -> Tensor:
        if window.dim() != 3 + self.dims or window.shape[1] != self.initial_step or window.shape[-1] != self.channels:
            space = "X" if self.dims == 1 else "X, Y"
            raise ValueError(f"FNOPeer expects (B, {self.initial_step}, {space}, {self.channels}) windows, "
                             f"got {tuple(window.shape)}")
        b, t, *space, c = window.shape
        inp = window.movedim(-1, 2).reshape(b, t * c, *space)       # (B, T*C, *space), time-major
        return self.net(inp).movedim(1, -1)                          # (B, C, *space) -> (B, *space, C)


def build_fno(initial_step: int, channels: int = 1, settings: Optional[FNOSettings] = None,
              spatial_shape: Optional[Tuple[int, ...]] = None, periodic: bool = True) -> FNOPeer:
    return FNOPeer(initial_step, channels, settings, spatial_shape, periodic)
