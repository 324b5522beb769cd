"""Stage-0 autoencoder: a grid encoder to ``n_tokens`` latent tokens and an any-point decoder, in one
or two spatial dimensions, for any channel count.

The grid comes from the data: ``Autoencoder(in_channels=C, spatial_shape=(X,) | (H, W), ...)``.
Conventions: fields are channel-last, ``(B, X, C)`` in 1D and ``(B, H, W, C)`` in 2D; coordinates
are unit coordinates in [0, 1) (periodic), ``x (X,)`` in 1D and ``x (H, W, 2)`` (or the point list
``(H * W, 2)``, row-major) in 2D, where ``x[..., k]`` runs along spatial axis ``k`` (``H`` is axis 0).

Tokens and patches (``patch`` = cells per token, derived from ``spatial_shape`` and ``n_tokens``):

- 1D, ``spatial_shape=(X,)``: ``patch = X // n_tokens`` (needs ``X >= n_tokens``). When ``n_tokens``
  divides ``X`` the tokens tile the grid exactly; otherwise the encoder works on the largest grid of
  ``n_tokens * patch <= X`` cells it can tile, onto which the native cells are averaged (step 2
  below). At ``X = 256`` this is the rule the project always used (``patch = 256 // n_tokens``), so
  1D checkpoints trained on 256 cells load unchanged and give identical outputs.
- 2D, ``spatial_shape=(H, W)``: the tokens form an ``s x s`` grid, ``s = sqrt(n_tokens)``; ``n_tokens``
  must be a perfect square and ``s`` must divide ``H`` and ``W`` (else a ValueError naming
  ``model.n_tokens``); ``patch = (H // s, W // s)``. Token ``i * s + j`` covers the cells
  ``[i * ph, (i + 1) * ph) x [j * pw, (j + 1) * pw)``.
- Without ``spatial_shape`` (older callers) the 1D grid of 256 cells is assumed, as before, and
  ``n_tokens`` must divide 256 unless ``patch`` is given. An explicit ``patch`` (an int, or a pair in
  2D) always overrides the rule.

Encoder (:class:`GridEncoder`), fields ``u`` on a periodic grid -> ``z (B, n_tokens, dim)``:

1. periodic conv stem at the native resolution (circular padding, GroupNorm, GELU; Conv1d / Conv2d);
2. resampling of the stem features (and of the raw values) to the *model grid* of ``n_tokens *
   patch`` cells (per axis in 2D): identity at the model grid, cell averages on finer grids, periodic
   linear interpolation at the model grid's cell centres (using the given coordinates) on coarser
   ones, so any grid with at least one cell per token and axis works (a model is best used at the
   resolution it was trained at: the conv stem sees cells, not lengths);
3. patchify: the ``patch`` cells of each token are concatenated and projected to ``dim`` (position of
   a shock inside a token is kept, unlike plain pooling);
4. transformer blocks with learned positional embeddings; a final LayerNorm without gain keeps every
   token at unit RMS, so latent scales are comparable across widths and runs.

Decoder (:class:`PointDecoder`), tokens + query coordinates in [0, 1)^d -> field values: queries are
an MLP of periodic Fourier features of each coordinate; ``decoder_depth`` cross-attention blocks let
them read the tokens with a learned *local* attention bias per head (``-softplus(a_h) * d^2``, d the
periodic (Euclidean in 2D) distance query-token in token spacings, heads initialised to Gaussian
windows of 0.5 to 4 tokens). A *local head* then reads the value: each of the ``2^d`` tokens whose
centres bracket x (2 in 1D, 4 in 2D) predicts the coefficients of a local basis of the offset r from
its centre, ``[1, r, sin(w_k r), cos(w_k r)]`` per axis (coefficients = MLP(token, query feature,
basis) + Linear(token)), and the expansions are blended with (bi)linear weights summing to one. The
linear token -> coefficient path makes the exact levels either side of a shock easy to represent; the
field can be read at any point.

Query layouts of ``decode(z, x)`` (the output keeps the layout of x, channels last):

- 1D: ``x (Q,)`` shared by the batch -> ``(B, Q, C)``; ``x (B, Q)`` or ``(B, Q, 1)`` per sample (a
  leading 1 broadcasts) -> ``(B, Q, C)``.
- 2D: ``x (Q, 2)`` shared points -> ``(B, Q, C)``; ``x (H', W', 2)`` a shared grid -> ``(B, H', W', C)``;
  ``x (B, Q, 2)`` per-sample points -> ``(B, Q, C)``; ``x (B, H', W', 2)`` per-sample grids ->
  ``(B, H', W', C)``. A 3-dim x is ambiguous between a shared grid and per-sample points: pass
  ``batched=True`` (per-sample points) or ``batched=False`` (shared grid) to say which. Without it,
  x is read as a shared grid when ``x.shape[:2]`` is the model's ``spatial_shape`` or when its
  leading size is neither 1 nor B, and as per-sample points otherwise.

Decoding on a fixed grid (every rollout step, every latent stage's validation): ``PointDecoder.plan(x)``
computes once all that depends on the query points alone (Fourier features, the query MLP, the first
block's attention queries, the local bias, the bracketing tokens and blend weights, the local basis,
the head's grid half), and folds the head's last Linear and the linear token path into the blended
basis; ``decode_planned(z, plan)`` then equals ``forward(z, x)`` within float rounding. A frozen
decoder caches its plan itself; rollouts hold theirs (``inference/rollout.py``).

Design measured on PDEBench-like shock-forming frames (viscosity 0.001, 256 cells, 41 frames, shocks one or two
cells wide), dim 64, 300 steps of batch 96 with 96 random query points per field, relative L2 on
held-out trajectories: cross-attention + MLP head 6.2%; + bilinear local-basis head 4.0%; + linear
token -> coefficient path 2.4%. Three-minute runs on one CPU thread
(AdamW lr 4e-3, warm-up + cosine, decoder_depth 1): dim 64 0.87% (932 steps), dim 32 0.65%
(1687 steps); decoder_depth 2 at dim 64 0.97% (791 steps). 53% of the remaining squared error sits
in the 9% of cells next to fronts. (1D measurements; the 2D path is the same design, unmeasured.)
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ups_lightning.models.layers import (
    RMSNorm,
    CrossAttentionBlock,
    FourierFeatures,
    TransformerBlock,
    periodic_distance,
    token_centres,
)

Patch = Union[int, Tuple[int, ...]]

#: The 1D grid assumed when no ``spatial_shape`` is given (the 256-cell grid of the default data sets):
#: only for callers that predate ``spatial_shape``; new callers pass the data's shape.
_LEGACY_CELLS = 256


def periodic_linear_resample(f: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """Periodic linear interpolation of ``f (B, X, C)`` sampled at sorted ``x (X,)`` in [0, 1) onto
    ``t (M,)``. Returns (B, M, C)."""
    X = x.shape[0]
    xe = torch.cat([x[-1:] - 1.0, x, x[:1] + 1.0])
    fe = torch.cat([f[:, -1:], f, f[:, :1]], dim=1)
    t = t - torch.floor(t)
    idx = torch.searchsorted(xe.contiguous(), t.contiguous(), right=True).clamp(1, X + 1)
    x0, x1 = xe[idx - 1], xe[idx]
    w = ((t - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1).to(f.dtype)
    return fe[:, idx - 1] * (1 - w)[None, :, None] + fe[:, idx] * w[None, :, None]


def resample_periodic(f: Tensor, x: Tensor, M: int) -> Tensor:
    """``f (B, X, C)`` on the cells centred at ``x (X,)`` -> ``(B, M, C)`` on M equal cells of [0, 1):
    identity at ``X = M``, cell averages on finer grids (uniform cell-centred grid assumed), periodic
    linear interpolation at the cell centres on coarser ones."""
    X = f.shape[1]
    if X == M:
        return f
    if X % M == 0:
        return F.avg_pool1d(f.transpose(1, 2), X // M).transpose(1, 2)
    if X > M:  # finer grid: cell averages (uniform cell-centred grid assumed)
        return F.adaptive_avg_pool1d(f.transpose(1, 2), M).transpose(1, 2)
    t = (torch.arange(M, device=f.device, dtype=x.dtype) + 0.5) / M
    return periodic_linear_resample(f, x, t)


def token_grid(n_tokens: int, spatial_dims: int) -> Tuple[int, ...]:
    """Tokens per spatial axis: ``(n_tokens,)`` in 1D, ``(s, s)`` with ``s * s = n_tokens`` in 2D."""
    if spatial_dims == 1:
        return (n_tokens,)
    if spatial_dims == 2:
        s = math.isqrt(n_tokens) if n_tokens > 0 else 0
        if s * s != n_tokens or s < 1:
            raise ValueError(f"model.n_tokens={n_tokens}: a 2D model lays its tokens on a square grid, so "
                             f"n_tokens must be a perfect square (e.g. 16, 64, 256).")
        return (s, s)
    raise ValueError(f"spatial_shape: only 1 or 2 spatial dimensions are supported, got {spatial_dims}.")


def derive_patch(spatial_shape: Sequence[int], n_tokens: int) -> Patch:
    """Cells per token for a grid of ``spatial_shape`` and ``n_tokens`` tokens (rule: module doc):
    an int in 1D, a pair in 2D."""
    shape = tuple(int(v) for v in spatial_shape)
    if any(v < 1 for v in shape):
        raise ValueError(f"spatial_shape={shape}: every axis needs at least one cell.")
    grid = token_grid(n_tokens, len(shape))
    if len(shape) == 1:
        X = shape[0]
        if n_tokens < 1 or X < n_tokens:
            raise ValueError(f"model.n_tokens={n_tokens}: the grid has {X} cells, fewer than the tokens "
                             f"(need 1 <= n_tokens <= {X}).")
        return X // n_tokens
    bad = [v for v in shape if v % grid[0] != 0]
    if bad:
        raise ValueError(f"model.n_tokens={n_tokens}: the {grid[0]} x {grid[1]} token grid must divide the "
                         f"{shape[0]} x {shape[1]} data grid on both axes; pick n_tokens = s * s with s "
                         f"dividing {math.gcd(*shape)}.")
    return tuple(v // g for v, g in zip(shape, grid))


def _patch_tuple(patch: Patch) -> Tuple[int, ...]:
    p = (int(patch),) if isinstance(patch, int) else tuple(int(v) for v in patch)
    if not 1 <= len(p) <= 2 or any(v < 1 for v in p):
        raise ValueError(f"patch={patch!r}: cells per token must be a positive int (1D) or pair (2D).")
    return p


class GridEncoder(nn.Module):
    """Fields ``u (B, X, C)`` with ``x (X,)``, or ``u (B, H, W, C)`` with ``x (H, W, 2) | (H * W, 2)``
    -> tokens ``(B, n_tokens, dim)``. ``patch`` is an int (1D) or a pair (2D): it sets the dimension."""

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 64,
        n_tokens: int = 32,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 128,
        patch: Patch = 8,
        stem_channels: Optional[int] = None,
        stem_layers: int = 2,
        kernel_size: int = 5,
        groups: Optional[int] = None,
        latent_norm: bool = True,
    ) -> None:
        super().__init__()
        p = _patch_tuple(patch)
        self.spatial_dims = len(p)
        self.grid = token_grid(n_tokens, self.spatial_dims)
        self.in_channels = in_channels
        self.dim = dim
        self.n_tokens = n_tokens
        self.patch = p[0] if self.spatial_dims == 1 else p
        self.patch_cells = p
        self.model_grid = tuple(g * q for g, q in zip(self.grid, p))  # cells the tokens tile
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GridEncoder: kernel_size={kernel_size} must be odd (the stem keeps the grid's shape).")
        c = stem_channels if stem_channels is not None else min(hidden, 64)
        g = groups if groups is not None else math.gcd(8, c)
        conv = nn.Conv1d if self.spatial_dims == 1 else nn.Conv2d
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(stem_layers):
            layers += [
                conv(cin, c, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
                nn.GroupNorm(g, c),
                nn.GELU(),
            ]
            cin = c
        self.stem = nn.Sequential(*layers)
        self.stem_channels = cin
        cells = math.prod(p)
        self.patch_proj = nn.Linear(cells * cin + cells * in_channels, dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim, elementwise_affine=False) if latent_norm else nn.Identity()

    def _to_canonical(self, f: Tensor, x: Tensor) -> Tensor:
        """1D: (B, X, F) -> (B, n_tokens * patch, F) (see :func:`resample_periodic`)."""
        return resample_periodic(f, x, self.model_grid[0])

    def _to_canonical_2d(self, f: Tensor, x: Tensor) -> Tensor:
        """2D: (B, H, W, F) with x (H, W, 2) -> (B, M0, M1, F), one axis at a time."""
        B, H, W, Fc = f.shape
        M0, M1 = self.model_grid
        if H != M0:
            g = f.permute(0, 2, 1, 3).reshape(B * W, H, Fc)
            g = resample_periodic(g, x[:, 0, 0].contiguous(), M0)
            f = g.reshape(B, W, M0, Fc).permute(0, 2, 1, 3)
        if W != M1:
            g = f.reshape(B * M0, W, Fc)
            g = resample_periodic(g, x[0, :, 1].contiguous(), M1)
            f = g.reshape(B, M0, M1, Fc)
        return f

    def _tokens(self, h: Tensor) -> Tensor:
        z = self.patch_proj(h) + self.pos
        for blk in self.blocks:
            z = blk(z)
        return self.out_norm(z)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        if self.spatial_dims == 2:
            return self._forward_2d(u, x)
        if u.dim() != 3 or u.shape[-1] != self.in_channels:
            raise ValueError(f"encode: u must be (B, X, {self.in_channels}), got {tuple(u.shape)}.")
        B, X, _ = u.shape
        if X < self.n_tokens:
            raise ValueError(f"encode: grid has X={X} cells, fewer than n_tokens={self.n_tokens}.")
        if x.dim() != 1 or x.shape[0] != X:
            raise ValueError(f"encode: x must be (X,) = ({X},), got {tuple(x.shape)}.")
        h = self.stem(u.transpose(1, 2)).transpose(1, 2)  # (B, X, c)
        h = torch.cat([h, u], dim=-1)  # keep the raw values (exact levels) next to the features
        h = self._to_canonical(h, x)  # (B, N * P, c + C)
        return self._tokens(h.reshape(B, self.n_tokens, -1))

    def _forward_2d(self, u: Tensor, x: Tensor) -> Tensor:
        if u.dim() != 4 or u.shape[-1] != self.in_channels:
            raise ValueError(f"encode: u must be (B, H, W, {self.in_channels}), got {tuple(u.shape)}.")
        B, H, W, _ = u.shape
        s0, s1 = self.grid
        if H < s0 or W < s1:
            raise ValueError(f"encode: grid {H} x {W} has fewer cells per axis than the {s0} x {s1} tokens.")
        if x.dim() == 2 and x.shape == (H * W, 2):
            x = x.reshape(H, W, 2)
        if x.shape != (H, W, 2):
            raise ValueError(f"encode: x must be (H, W, 2) = ({H}, {W}, 2) or ({H * W}, 2), got {tuple(x.shape)}.")
        h = self.stem(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, c)
        h = torch.cat([h, u], dim=-1)
        h = self._to_canonical_2d(h, x)  # (B, s0 * p0, s1 * p1, c + C)
        p0, p1 = self.patch_cells
        h = h.reshape(B, s0, p0, s1, p1, h.shape[-1]).permute(0, 1, 3, 2, 4, 5)
        return self._tokens(h.reshape(B, self.n_tokens, -1))


class PointDecoder(nn.Module):
    """Tokens ``(B, n_tokens, dim)`` + query coordinates -> field values, channels last (layouts:
    module doc). ``spatial_dims`` is 1 or 2; ``spatial_shape`` (optional, the data grid) only helps
    read an ambiguous 3-dim 2D query (grid or per-sample points)."""

    def __init__(
        self,
        out_channels: int = 1,
        dim: int = 64,
        n_tokens: int = 32,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 128,
        n_fourier: int = 64,
        local_bias: bool = True,
        local_head: bool = True,
        n_rel: int = 16,
        overlap: float = 1.0,
        spatial_dims: int = 1,
        spatial_shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if not 0.0 < overlap <= 1.0:
            raise ValueError(f"PointDecoder: overlap must be in (0, 1], got {overlap}.")
        self.dim, self.n_tokens, self.heads, self.out_channels = dim, n_tokens, heads, out_channels
        self.spatial_dims = int(spatial_dims)
        self.grid = token_grid(n_tokens, self.spatial_dims)
        self.spatial_shape = tuple(int(v) for v in spatial_shape) if spatial_shape is not None else None
        self.overlap = overlap
        self.fourier = FourierFeatures(n_fourier)
        d = self.spatial_dims
        self.feat_dim = d * self.fourier.out_dim  # Fourier features of each coordinate
        self.query = nn.Sequential(nn.Linear(self.feat_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.token_pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, hidden) for _ in range(depth))
        self.local_bias = local_bias
        if local_bias:
            # head h starts with a Gaussian window of width sigma_h tokens, sigma from 0.5 to 4
            sig = torch.logspace(math.log10(0.5), math.log10(4.0), heads) if heads > 1 else torch.tensor([1.0])
            self.bias_raw = nn.Parameter(torch.log(torch.expm1(1.0 / (2 * sig**2))))  # softplus^-1
        self.head_norm = RMSNorm(dim)
        self.local_head = local_head
        if local_head:
            # basis of the offset r in (-1, 1] from a token centre (token spacings), per axis:
            # [1, r, sin, cos](w_k r), w_k = k pi / 2, k = 1..n_rel (shortest period 4 / n_rel tokens:
            # 2 cells at n_rel = 2 * patch)
            self.register_buffer("rel_freqs", torch.pi / 2 * torch.arange(1, n_rel + 1, dtype=torch.float32),
                                 persistent=False)
            n_phi = d * (2 * n_rel + 1)
            self.n_basis = n_phi + 1
            self.head_tok = nn.Linear(dim, hidden)
            self.head_q = nn.Linear(dim + self.feat_dim, hidden)
            self.head_rel = nn.Linear(n_phi, hidden, bias=False)
            self.head = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                      nn.Linear(hidden, out_channels * self.n_basis))
            self.head_skip = nn.Linear(dim, out_channels * self.n_basis)  # linear path token -> coefficients
        else:
            self.head = nn.Sequential(nn.Linear(dim + self.feat_dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, out_channels))

    def token_centres(self, device=None, dtype=torch.float32) -> Tensor:
        """Centres of the tokens, (n_tokens, d), token ``i * s1 + j`` at ((i + 0.5) / s0, (j + 0.5) / s1)."""
        axes = [token_centres(g, device=device, dtype=dtype) for g in self.grid]
        if len(axes) == 1:
            return axes[0].unsqueeze(-1)
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))

    def attn_bias(self, x: Tensor) -> Optional[Tensor]:
        """Local bias (B|1, heads, Q, N) for query coordinates x (B|1, Q, d) (or (B|1, Q) in 1D)."""
        if not self.local_bias:
            return None
        if x.dim() == 2:
            x = x.unsqueeze(-1)
        c = self.token_centres(device=x.device, dtype=x.dtype)  # (N, d)
        scale = torch.tensor(self.grid, device=x.device, dtype=x.dtype)
        d2 = (periodic_distance(x.unsqueeze(-2), c) * scale).pow(2).sum(-1)  # (B, Q, N) in token spacings
        return -F.softplus(self.bias_raw)[None, :, None, None] * d2.unsqueeze(1)

    def _queries(self, x: Tensor, B: int, batched: Optional[bool]) -> Tuple[Tensor, Tuple[int, ...]]:
        """Query coordinates -> (B|1, Q, d) and the layout of the Q queries (module doc)."""
        d = self.spatial_dims
        if d == 1:
            if batched is False and x.dim() != 1:
                raise ValueError(f"decode: a 1D model's shared queries are x (Q,), got {tuple(x.shape)}.")
            if x.dim() == 3 and x.shape[-1] == 1:
                x = x[..., 0]
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if x.dim() != 2 or x.shape[0] not in (1, B):
                raise ValueError(f"decode: x must be (Q,) or (B, Q) with B={B}, got {tuple(x.shape)}.")
            return x.unsqueeze(-1), (x.shape[1],)
        if x.dim() < 2 or x.shape[-1] != d:
            raise ValueError(f"decode: a 2D model's query coordinates are (..., 2), got {tuple(x.shape)}.")
        if x.dim() == 2:  # (Q, 2) shared points
            if batched:
                raise ValueError(f"decode: batched=True needs x (B, Q, 2) or (B, H, W, 2), got {tuple(x.shape)}.")
            return x.unsqueeze(0), (x.shape[0],)
        if x.dim() == 3:
            if batched is None:
                grid_like = self.spatial_shape is not None and tuple(x.shape[:2]) == self.spatial_shape
                batched = not grid_like and x.shape[0] in (1, B)
            if not batched:  # (H', W', 2) shared grid
                return x.reshape(1, -1, d), tuple(x.shape[:2])
            if x.shape[0] not in (1, B):
                raise ValueError(f"decode: per-sample points must be (B, Q, 2) with B={B}, got {tuple(x.shape)}.")
            return x, (x.shape[1],)
        if x.dim() == 4:  # (B|1, H', W', 2) per-sample grids
            if batched is False or x.shape[0] not in (1, B):
                raise ValueError(f"decode: per-sample grids must be (B, H, W, 2) with B={B}, "
                                 f"got {tuple(x.shape)}.")
            return x.reshape(x.shape[0], -1, d), tuple(x.shape[1:3])
        raise ValueError(f"decode: query coordinates of a 2D model must be (Q, 2), (H, W, 2), (B, Q, 2) or "
                         f"(B, H, W, 2), got {tuple(x.shape)}.")

    def forward(self, z: Tensor, x: Tensor, batched: Optional[bool] = None) -> Tensor:
        B = z.shape[0]
        if z.dim() != 3 or z.shape[1:] != (self.n_tokens, self.dim):
            raise ValueError(f"decode: z must be (B, {self.n_tokens}, {self.dim}), got {tuple(z.shape)}.")
        plan = self._cached_plan(x, batched)
        if plan is not None:
            return self.decode_planned(z, plan)
        x, layout = self._queries(x, B, batched)
        x = (x - torch.floor(x)).to(z.dtype)  # periodic; (B|1, Q, d)
        ff = self.fourier(x).flatten(-2)  # (B|1, Q, d * 2F)
        q = self.query(ff).expand(B, -1, -1)
        ctx = z + self.token_pos
        bias = self.attn_bias(x)
        for blk in self.blocks:
            q = blk(q, ctx, attn_bias=bias)
        qn = self.head_norm(q)
        if self.local_head:
            out = self._local_head(z, x, qn, ff)
        else:
            out = self.head(torch.cat([qn, ff.expand(B, -1, -1)], dim=-1))
        return out.reshape(B, *layout, self.out_channels)

    def _corners(self, x: Tensor):
        """For each of the ``2^d`` tokens whose centres bracket the queries ``x (B|1, Q, d)``: its
        row-major index ``j (B|1, Q)``, its (bi)linear blend weight ``w (B|1, Q, 1)`` (the weights of
        a query sum to one; linear per axis when overlap = 1) and the local basis ``phi (B|1, Q,
        K - 1)`` of the query's offset from that token's centre (in token spacings, in (-1, 1])."""
        axes = []
        for k, g in enumerate(self.grid):
            s = x[..., k] * g - 0.5  # position in token-centre units
            j0 = torch.floor(s)
            w1 = ((s - j0 - 0.5) / self.overlap + 0.5).clamp(0, 1).unsqueeze(-1)  # weight of the right token
            axes.append((s, j0, w1))
        for corner in itertools.product((0, 1), repeat=len(self.grid)):
            j = None
            w = None
            rels = []
            for (s, j0, w1), g, c in zip(axes, self.grid, corner):
                jk = (j0.long() + c) % g
                j = jk if j is None else j * g + jk  # row-major token index
                rels.append((s - j0 - c).unsqueeze(-1))  # offset from that token's centre, in (-1, 1]
                wk = w1 if c else 1 - w1
                w = wk if w is None else w * wk
            rel = torch.cat(rels, dim=-1) if len(rels) > 1 else rels[0]  # (B|1, Q, d)
            arg = (rel.unsqueeze(-1) * self.rel_freqs).flatten(-2)  # (B|1, Q, d * n_rel)
            yield j, w, torch.cat([rel, arg.sin(), arg.cos()], dim=-1)

    def _local_head(self, z: Tensor, x: Tensor, qn: Tensor, ff: Tensor) -> Tensor:
        # the 2^d tokens whose centres bracket x each expand the field in the local basis of the offset
        # from their centre (coefficients = MLP(token, query) + Linear(token)); the expansions are
        # blended with (bi)linear weights that sum to one
        B = z.shape[0]
        # head_q of [qn, ff] as two products: the Fourier part depends on the grid only
        wq, d_q = self.head_q.weight, qn.shape[-1]
        hq = F.linear(qn, wq[:, :d_q]) + F.linear(ff, wq[:, d_q:], self.head_q.bias)  # (B, Q, hidden)
        tok = torch.cat([self.head_tok(z), self.head_skip(z)], dim=-1)  # (B, N, hidden + C * K)
        H = hq.shape[-1]
        out = 0.0
        for j, w, phi in self._corners(x):
            if j.shape[0] == 1:   # queries shared by the batch: one index for every sample
                t = tok.index_select(1, j[0])
            else:
                t = torch.gather(tok, 1, j.expand(B, -1).unsqueeze(-1).expand(-1, -1, tok.shape[-1]))
            coef = self.head(t[..., :H] + hq + self.head_rel(phi)) + t[..., H:]
            basis = torch.cat([torch.ones_like(phi[..., :1]), phi], dim=-1).unsqueeze(-2)  # (B|1, Q, 1, K)
            y = (coef.view(*coef.shape[:-1], self.out_channels, self.n_basis) * basis).sum(-1)
            out = out + w * y
        return out

    # --- decoding on a fixed grid ----------------------------------------------------------------
    #: decode shared queries through a cached :meth:`plan` when every weight is frozen (the latent
    #: stages' decoder); False: always the direct path. Rollouts hold their own plan (inference/rollout.py)
    fast_decode: bool = True

    def _cached_plan(self, x: Tensor, batched: Optional[bool]) -> Optional["DecodePlan"]:
        """The plan of queries ``x`` if the fast path applies (shared queries, every weight frozen),
        rebuilt when ``x`` or a weight changed (tensor versions count in-place edits such as
        load_state_dict). A trainable decoder never caches: an optimizer may update weights without
        bumping their version (fused AdamW does not), and a stale plan would decode old weights."""
        if not self.fast_decode or not self.shares_queries(x, batched):
            return None
        if any(p.requires_grad for p in self.parameters()):
            return None
        key = (x.data_ptr(), tuple(x.shape), x.dtype, x.device, x._version, batched,
               tuple(p._version for p in self.parameters()), tuple(p.data_ptr() for p in self.parameters()))
        cached = self.__dict__.get("_plan")
        if cached is None or cached[0] != key:
            cached = (key, self.plan(x, batched))
            self.__dict__["_plan"] = cached   # not a buffer: never saved, never moved
        return cached[1]

    def shares_queries(self, x: Tensor, batched: Optional[bool] = None) -> bool:
        """Whether queries ``x`` are one set for the whole batch (module doc's layouts)."""
        if self.spatial_dims == 1:
            return x.dim() == 1 and batched is not True
        if x.dim() == 2:
            return not batched
        if x.dim() == 3:
            grid_like = self.spatial_shape is not None and tuple(x.shape[:2]) == self.spatial_shape
            return batched is False or (batched is None and grid_like)
        return False

    @torch.no_grad()
    def plan(self, x: Tensor, batched: Optional[bool] = None) -> "DecodePlan":
        """Everything the decode of queries ``x`` shared by the batch (``(Q,)`` in 1D, ``(Q, 2)`` or
        ``(H', W', 2)`` in 2D) computes from ``x`` alone, done once: ``decode_planned(z, plan)``
        then equals ``forward(z, x)`` within float rounding at a fraction of its cost (a rollout
        decodes on one grid at every step). The plan holds this decoder's weights as they are now:
        make a new one after they change."""
        if not self.shares_queries(x, batched):
            raise ValueError(f"plan: needs queries shared by the batch, got {tuple(x.shape)}.")
        xq, layout = self._queries(x, 1, False if x.dim() == 3 else batched)   # (1, Q, d)
        dtype = self.query[0].weight.dtype
        xq = (xq - torch.floor(xq)).to(dtype)
        ff = self.fourier(xq).flatten(-2)  # (1, Q, d * 2F)
        q0 = self.query(ff)
        bias = self.attn_bias(xq)
        plan = DecodePlan(x=x, layout=layout, q0=q0, bias=bias,
                          q_heads=self.blocks[0].prepare_queries(q0) if len(self.blocks) else None)
        if not self.local_head:
            plan.ff = ff
            return plan
        d_q = self.dim
        wq = self.head_q.weight
        grid_part = F.linear(ff[0], wq[:, d_q:], self.head_q.bias)  # (Q, hidden)
        last = self.head[-1]  # Linear(hidden, C * K): folded into the basis below
        W = last.weight.view(self.out_channels, self.n_basis, -1)  # (C, K, hidden)
        b = last.bias.view(self.out_channels, self.n_basis)
        idx, pre, w_eff, b_eff, skip = [], [], [], [], []
        n_tok = self.n_tokens
        for j, w, phi in self._corners(xq):
            j, w, phi = j[0], w[0], phi[0]  # (Q,), (Q, 1), (Q, K - 1)
            basis = torch.cat([torch.ones_like(phi[:, :1]), phi], dim=-1)  # (Q, K)
            wb = w * basis  # blend weight folded into the basis
            idx.append(j)
            pre.append(grid_part + self.head_rel(phi))
            w_eff.append(torch.einsum("qk,ckh->qch", wb, W))  # (Q, C, hidden)
            b_eff.append(wb @ b.T)  # (Q, C)
            # the linear token -> coefficient path as one (N * K, Q) matrix per corner
            sel = F.one_hot(j, n_tok).to(dtype)  # (Q, N)
            skip.append(torch.einsum("qn,qk->nkq", sel, wb).reshape(n_tok * self.n_basis, -1))
        plan.index = torch.cat(idx)                          # (n_c * Q,)
        plan.pre = torch.stack(pre).unsqueeze(0)             # (1, n_c, Q, hidden)
        plan.w_eff = torch.cat(w_eff)                        # (n_c * Q, C, hidden)
        plan.b_eff = torch.stack(b_eff).sum(0)               # (Q, C)
        plan.skip = torch.stack(skip).sum(0)                 # (N * K, Q)
        plan.n_corners = len(idx)
        return plan

    def decode_planned(self, z: Tensor, plan: "DecodePlan") -> Tensor:
        """``forward(z, plan.x)`` from a :meth:`plan` of the queries (the fast path of a rollout)."""
        B = z.shape[0]
        if z.dim() != 3 or z.shape[1:] != (self.n_tokens, self.dim):
            raise ValueError(f"decode: z must be (B, {self.n_tokens}, {self.dim}), got {tuple(z.shape)}.")
        ctx = z + self.token_pos
        q = plan.q0.expand(B, -1, -1)
        for i, blk in enumerate(self.blocks):
            q = blk(q, ctx, attn_bias=plan.bias, q_heads=plan.q_heads if i == 0 else None)
        qn = self.head_norm(q)
        if not self.local_head:
            out = self.head(torch.cat([qn, plan.ff.expand(B, -1, -1)], dim=-1))
            return out.reshape(B, *plan.layout, self.out_channels)
        C, K, Q = self.out_channels, self.n_basis, qn.shape[1]
        hq = F.linear(qn, self.head_q.weight[:, : self.dim])  # (B, Q, hidden)
        n_c = plan.n_corners
        tok = self.head_tok(z).index_select(1, plan.index).view(B, n_c, Q, -1)  # (B, n_c, Q, hidden)
        g = self.head[:-1](tok + hq.unsqueeze(1) + plan.pre)  # GELU, Linear, GELU
        y = torch.einsum("bph,pch->bpc", g.view(B, n_c * Q, -1), plan.w_eff)  # (B, n_c * Q, C)
        y = y.view(B, n_c, Q, C).sum(1) + plan.b_eff
        skip = self.head_skip(z).view(B, self.n_tokens, C, K).transpose(1, 2).reshape(B, C, -1)
        y = y + (skip @ plan.skip).transpose(1, 2)  # (B, Q, C)
        return y.reshape(B, *plan.layout, C)


class DecodePlan:
    """The grid-only features of a :class:`PointDecoder` on fixed queries (:meth:`PointDecoder.plan`):
    the queries and their layout, the first block's query MLP output and attention queries, the local
    bias; with the local head, per bracketing token (corner) of every query: its token index, the
    head's grid half of its first layer, and its last layer and the linear token path folded into
    the blended local basis."""

    def __init__(self, x: Tensor, layout: Tuple[int, ...], q0: Tensor, bias: Optional[Tensor],
                 q_heads: Optional[Tensor]) -> None:
        self.x, self.layout, self.q0, self.bias, self.q_heads = x, layout, q0, bias, q_heads
        self.ff: Optional[Tensor] = None      # without the local head: the Fourier features (1, Q, F)
        self.n_corners = 0
        self.index: Optional[Tensor] = None   # (n_c * Q,) token of each (corner, query)
        self.pre: Optional[Tensor] = None     # (1, n_c, Q, hidden)
        self.w_eff: Optional[Tensor] = None   # (n_c * Q, C, hidden)
        self.b_eff: Optional[Tensor] = None   # (Q, C)
        self.skip: Optional[Tensor] = None    # (N * K, Q)


class Autoencoder(nn.Module):
    """Grid encoder + any-point decoder, 1D or 2D (module doc).

    ``encode(u (B, X, C) | (B, H, W, C), x (X,) | (H, W, 2)) -> z (B, n_tokens, dim)``;
    ``decode(z, x) -> (B, *query layout, C)``; ``forward(u, x) = decode(encode(u, x), x)``.

    Build it from the data: ``Autoencoder(in_channels=C, spatial_shape=(X,) | (H, W), dim=...,
    n_tokens=..., ...)``. ``patch`` and ``n_rel`` default to the rule of the module doc.
    """

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 64,
        n_tokens: int = 32,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 128,
        n_fourier: int = 64,
        decoder_depth: int = 2,
        patch: Optional[Patch] = None,
        stem_channels: Optional[int] = None,
        stem_layers: int = 2,
        stem_kernel: int = 5,
        local_bias: bool = True,
        local_head: bool = True,
        n_rel: Optional[int] = None,
        overlap: float = 1.0,
        latent_norm: bool = True,
        spatial_shape: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"Autoencoder: dim={dim} must be divisible by heads={heads}.")
        if spatial_shape is not None:
            shape = tuple(int(v) for v in spatial_shape)
            if patch is None:
                patch = derive_patch(shape, n_tokens)
            else:
                token_grid(n_tokens, len(shape))  # a 2D model still needs a square number of tokens
                p = _patch_tuple(patch)
                if len(p) == 1 and len(shape) == 2:
                    patch = (p[0], p[0])
                elif len(p) != len(shape):
                    raise ValueError(f"Autoencoder: patch={patch!r} does not match spatial_shape={shape}.")
        else:  # older callers: the 1D grid of 256 cells, whatever n_tokens is
            if patch is None:
                if n_tokens < 1 or n_tokens > _LEGACY_CELLS or _LEGACY_CELLS % n_tokens != 0:
                    raise ValueError(f"Autoencoder: n_tokens={n_tokens} does not divide {_LEGACY_CELLS}; "
                                     f"pass spatial_shape (the data's grid) or patch (cells per token).")
                patch = _LEGACY_CELLS // n_tokens
            p = _patch_tuple(patch)
            shape = tuple(g * q for g, q in zip(token_grid(n_tokens, len(p)), p))
        p = _patch_tuple(patch)
        self.patch = p[0] if len(p) == 1 else p
        n_rel = 2 * max(p) if n_rel is None else n_rel  # local basis resolves ~2 cells
        self.spatial_shape = shape
        self.spatial_dims = len(shape)
        self.in_channels = in_channels
        self.dim = dim
        self.n_tokens = n_tokens
        self.encoder = GridEncoder(in_channels, dim, n_tokens, depth, heads, hidden, patch=self.patch,
                                   stem_channels=stem_channels, stem_layers=stem_layers,
                                   kernel_size=stem_kernel, latent_norm=latent_norm)
        self.decoder = PointDecoder(in_channels, dim, n_tokens, decoder_depth, heads, hidden,
                                    n_fourier=n_fourier, local_bias=local_bias,
                                    local_head=local_head, n_rel=n_rel, overlap=overlap,
                                    spatial_dims=self.spatial_dims, spatial_shape=shape)

    def encode(self, u: Tensor, x: Tensor) -> Tensor:
        return self.encoder(u, x)

    def decode(self, z: Tensor, x: Tensor, batched: Optional[bool] = None) -> Tensor:
        return self.decoder(z, x, batched=batched)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        """Reconstruction on the input grid (same shape as ``u``)."""
        z = self.encode(u, x)
        if self.spatial_dims == 1:
            return self.decode(z, x)
        if x.dim() == 2:  # the (H * W, 2) point list of the grid: decode on the grid layout
            x = x.reshape(*u.shape[1:3], 2)
        return self.decode(z, x, batched=False)
