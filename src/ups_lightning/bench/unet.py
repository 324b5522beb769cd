"""The U-Net peer of the benchmark suite: PDEBench's ``UNet1d`` and ``UNet2d``
(``pdebench/models/unet/unet.py``), reimplemented here layer for layer.

Architecture (PDEBench ``UNet1d(in_channels * initial_step, out_channels, init_features=32)``, the
model its ``training_type="autoregressive"`` builds): with ``f = init_features``, four encoder levels
of width ``f, 2f, 4f, 8f``, each a block ``[Conv1d(k=3, pad=1, no bias) -> BatchNorm1d -> Tanh] x 2``
followed by ``MaxPool1d(2)``; a bottleneck block of width ``16f``; four decoder levels, each a
``ConvTranspose1d(k=2, stride=2)`` halving the width, concatenated (up-sampled first, skip second)
with the encoder output of the same level and passed through a block back to ``8f, 4f, 2f, f``; and a
final ``Conv1d(f, out, k=1)`` (with bias). Input channels are the ``initial_step`` previous frames of
every field, time-major (``t * C + c``, the order PDEBench's ``reshape`` of ``[b, x, t, v]`` gives and
the order ``FNOPeer`` uses); output channels are the fields of the next frame. As in PDEBench the
U-Net gets **no grid channel** (unlike the FNO peer, whose ``positional_embedding="grid"`` adds one):
a convolutional network is translation-equivariant and PDEBench feeds it the frames only. Four
poolings of 2 need a grid size divisible by 16; any other size is refused with a ``ValueError``.

Size: for ``initial_step=10, channels=1, init_features=32`` the network has **2,708,673** trainable
parameters (``sum(p.numel() for p in build_unet(10).parameters())``; the arithmetic layer by layer
is in ``tests/test_unet_peer.py``), the same as PDEBench's ``UNet1d(10, 1)``. BatchNorm's running
statistics are buffers, not parameters, and travel in the state dict.

PDEBench's configuration (``config/args/config_*.yaml``, ``unet/train.py``): ``init_features`` 32 (the
``UNet1d`` default, not exposed in the YAML), ``initial_step`` 10, ``ar_mode: True`` with
``pushforward: True`` and ``unroll_step: 20``: the window rolls forward autoregressively from the first
``initial_step`` frames to ``t_train``; the frames before ``t_train - unroll_step`` are predicted under
``no_grad`` (the pushforward trick) and only the last ``unroll_step`` predictions enter the loss, the
sum of per-frame MSEs, gradients through that unroll. ``pushforward: False`` unrolls with gradients
over every frame; ``ar_mode: False`` is one-step teacher forcing. Batch 50, 500 epochs, no
normalisation; the unroll lives in ``UNetSettings`` (``grad_frames``) for the shared trainer
(``bench/peers.py``), which trains every peer with our optimiser, schedule and loss choice and the
benchmark's learning-rate search instead of PDEBench's Adam lr 1e-3 + StepLR(100 epochs), a
schedule that never decays inside a short wall-clock budget. This module only builds the network.

2D (``UNet2d``): the same network with 3 x 3 convolutions, 2 x 2 poolings and up-convolutions and
BatchNorm2d on (X, Y) grids, each side a multiple of 16.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["UNetSettings", "UNetPeer", "build_unet", "GRID_MULTIPLE"]

LEVELS = 4                    # encoder levels of PDEBench's UNet1d (and poolings before the bottleneck)
GRID_MULTIPLE = 2 ** LEVELS   # the grid size must be a multiple of this


@dataclass
class UNetSettings:
    init_features: int = 32       # width f of the first level; the levels are f, 2f, 4f, 8f, bottleneck 16f
    # PDEBench's autoregressive training (ar_mode, pushforward, unroll_step 20), read by PeerModule
    batch_size: Optional[int] = None  # None: PDEBench's for the data's dimension (peers.PDEBENCH_BATCH_SIZE)
    max_epochs: int = 500
    t_train: Optional[int] = None  # last frame (exclusive) of the training unroll; None: all frames
    grad_frames: Optional[int] = 20   # pushforward: only the last unroll_step=20 predictions have gradients
    val_batch_size: int = 200

    @classmethod
    def from_mapping(cls, d: Dict[str, Any]) -> "UNetSettings":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


_LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.ConvTranspose1d),
           2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d)}


def _conv_block(c_in: int, c_out: int, dims: int = 1) -> nn.Sequential:
    """Two (3-tap convolution without bias, batch norm, tanh) stages, ``c_in -> c_out -> c_out``."""
    conv, norm = _LAYERS[dims][:2]
    layers: List[nn.Module] = []
    for a in (c_in, c_out):
        layers += [conv(a, c_out, kernel_size=3, padding=1, bias=False), norm(c_out), nn.Tanh()]
    return nn.Sequential(*layers)


class UNetPeer(nn.Module):
    """Frames (B, T_in, *space, C) -> next frame (B, *space, C), space (X,) or (X, Y) (``dims``).
    Channels of the network: T_in * C (no grid); each side a multiple of 16."""

    def __init__(self, initial_step: int, channels: int = 1, settings: Optional[UNetSettings] = None,
                 dims: int = 1):
        super().__init__()
        s = settings or UNetSettings()
        if int(s.init_features) < 1:
            raise ValueError(f"unet.init_features={s.init_features} must be >= 1")
        if int(initial_step) < 1 or int(channels) < 1:
            raise ValueError(f"UNetPeer: initial_step={initial_step} and channels={channels} must be >= 1")
        if dims not in _LAYERS:
            raise ValueError(f"UNetPeer: 1D or 2D grids, got dims={dims}")
        self.initial_step, self.channels, self.dims = int(initial_step), int(channels), int(dims)
        conv, _, pool, upconv = _LAYERS[dims]
        widths = [int(s.init_features) * 2 ** i for i in range(LEVELS + 1)]    # f, 2f, 4f, 8f, 16f
        self.encoders = nn.ModuleList()
        c = self.initial_step * self.channels
        for w in widths[:-1]:
            self.encoders.append(_conv_block(c, w, dims))
            c = w
        self.pool = pool(kernel_size=2, stride=2)                              # parameter-free, shared
        self.bottleneck = _conv_block(widths[-2], widths[-1], dims)
        # decoder level i (deepest first): up-convolution 2w -> w, then a block on [up, skip] (2w -> w)
        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upconvs.append(upconv(2 * w, w, kernel_size=2, stride=2))
            self.decoders.append(_conv_block(2 * w, w, dims))
        self.head = conv(widths[0], self.channels, kernel_size=1)

    def forward(self, window: Tensor) -> Tensor:
        space = "X" if self.dims == 1 else "X, Y"
        if window.dim() != 3 + self.dims:
            raise ValueError(f"UNetPeer expects (B, {self.initial_step}, {space}, {self.channels}) windows, "
                             f"got {tuple(window.shape)}")
        b, t, *grid, c = window.shape
        if t != self.initial_step or c != self.channels:
            raise ValueError(f"UNetPeer expects (B, {self.initial_step}, {space}, {self.channels}) windows, "
                             f"got {tuple(window.shape)}")
        if any(n < GRID_MULTIPLE or n % GRID_MULTIPLE for n in grid):
            size = f"X={grid[0]}" if len(grid) == 1 else f"{' x '.join(map(str, grid))} (X x Y)"
            raise ValueError(f"UNetPeer: grid size {size} must be a positive multiple of {GRID_MULTIPLE} on each "
                             f"axis ({LEVELS} max-poolings by 2)")
        h = window.movedim(-1, 2).reshape(b, t * c, *grid)        # (B, T*C, *space), time-major
        skips = []
        for enc in self.encoders:
            h = enc(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottleneck(h)
        for up, dec, skip in zip(self.upconvs, self.decoders, reversed(skips)):
            h = dec(torch.cat([up(h), skip], dim=1))
        return self.head(h).movedim(1, -1)                        # (B, C, *space) -> (B, *space, C)


def build_unet(initial_step: int, channels: int = 1, settings: Optional[UNetSettings] = None,
               spatial_shape: Optional[tuple] = None, periodic: bool = True) -> UNetPeer:
    """``periodic`` is unused: PDEBench's U-Net zero-pads every convolution, periodic data or not."""
    return UNetPeer(initial_step, channels, settings, dims=1 if spatial_shape is None else len(spatial_shape))
