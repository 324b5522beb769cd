"""Shared building blocks of the latent models.

- :class:`RMSNorm`.
- :class:`Attention`: self- or cross-attention, RMSNorm on queries and keys (per head), computed by
  ``torch.nn.functional.scaled_dot_product_attention`` (``backend="sdpa"``, the default: torch
  dispatches to flash / memory-efficient kernels where the device has them) or by the optional
  ``flash_attn`` package (``backend="flash"``). :func:`set_attention_backend` switches a whole model.
- :class:`TransformerBlock`: pre-norm self-attention + GELU MLP, optionally conditioned by AdaLN-Zero
  (a conditioning vector ``(B, cond_dim)`` -> shift/scale/gate for both branches; gates start at 0 so
  a fresh conditioned block is the identity). :class:`CrossAttentionBlock` is the same for
  queries attending to a context. :class:`FinalLayer` is the AdaLN output head (zero-initialised).
- :class:`FourierFeatures` (periodic features of coordinates in [0, 1)), :class:`TimestepEmbedding`
  (sinusoidal embedding of a scalar such as the flow time) and :class:`ConditionEmbedding` (MLP on
  the raw conditioning vector of the data contract, ``DataContract.conditioning``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ups_lightning.errors import UserError

ATTENTION_BACKENDS = ("sdpa", "flash")


class FlashAttentionUnavailable(UserError, ImportError):
    """``backend="flash"`` was asked for but the optional ``flash_attn`` package is not importable."""


def _import_flash_attn() -> Optional[Callable[..., Tensor]]:
    """``flash_attn.flash_attn_func`` if the package imports, else None (not cached on purpose)."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn_func


def _check_backend(backend: str) -> Optional[Callable[..., Tensor]]:
    if backend not in ATTENTION_BACKENDS:
        raise UserError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}.")
    if backend == "flash":
        fn = _import_flash_attn()
        if fn is None:
            raise FlashAttentionUnavailable(
                "attention backend 'flash' needs the optional `flash_attn` package (CUDA only; "
                "`pip install ups_lightning[gpu]` or `pip install flash-attn`), which is not "
                "importable here. Use backend 'sdpa' (the default): torch's "
                "scaled_dot_product_attention already uses flash kernels where the GPU supports them."
            )
        return fn
    return None


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learned gain (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel (one pass instead of five; the decode and the operator call it often)
        w = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), (self.dim,), w, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


class Attention(nn.Module):
    """Multi-head self- or cross-attention with RMSNorm on queries and keys.

    ``forward(x (B, L, dim), context (B, S, context_dim) | None, attn_bias)``: with ``context=None``
    it is self-attention. ``attn_bias`` is an additive float bias broadcastable to (B, heads, L, S).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        qk_norm: bool = True,
        backend: str = "sdpa",
        context_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"Attention: dim={dim} must be divisible by heads={heads}.")
        self._flash_fn = _check_backend(backend)
        self.backend = backend
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        self.q_norm: nn.Module = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def set_backend(self, backend: str) -> None:
        self._flash_fn = _check_backend(backend)
        self.backend = backend

    def qkv(self, x: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised q, k, v of shape (B, heads, L|S, head_dim)."""
        return (self.queries(x), *self.keys_values(x if context is None else context))

    def queries(self, x: Tensor) -> Tensor:
        """Normalised queries (B, heads, L, head_dim) of ``x`` (alone: a decoder's fixed grid)."""
        B, L, _ = x.shape
        return self.q_norm(self.to_q(x).view(B, L, self.heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised keys and values (B, heads, S, head_dim) of ``context``."""
        B, S, _ = context.shape
        k, v = self.to_kv(context).view(B, S, 2, self.heads, self.head_dim).unbind(2)
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, q: Optional[Tensor] = None) -> Tensor:
        """``q``: this layer's :meth:`queries` of ``x`` when already known (broadcast over the batch)."""
        if q is None:
            q, k, v = self.qkv(x, context)
        else:
            k, v = self.keys_values(x if context is None else context)
            q = q.expand(k.shape[0], -1, -1, -1)
        use_flash = (
            self._flash_fn is not None
            and attn_bias is None
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
        )
        if use_flash:
            out = self._flash_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, L, H, Dh)
        else:
            if attn_bias is not None:
                attn_bias = attn_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias).transpose(1, 2)
        return self.proj(out.reshape(x.shape[0], x.shape[1], self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qk_norm={self.qk_norm}, backend={self.backend!r}"


def naive_attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
    """Reference softmax(q k^T / sqrt(d) + bias) v on (B, H, L, Dh) tensors (for tests)."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_bias is not None:
        logits = logits + attn_bias
    return logits.softmax(dim=-1) @ v


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every :class:`Attention` inside ``module`` to ``backend``; returns ``module``."""
    _check_backend(backend)
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_backend(backend)
    return module


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim if out_dim is None else out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation of (B, L, D) by per-sample (B, D) shift and scale (one fused multiply-add
    over the tokens: a training step is bound by its number of operations, issue 20)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The AdaLN-Zero residual ``x + gate * y`` with a per-sample (B, D) gate, in one operation."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (self-attention + GELU MLP).

    With ``cond_dim`` set it is AdaLN-Zero conditioned: ``cond (B, cond_dim)`` -> SiLU -> Linear ->
    (shift, scale, gate) for each branch, the Linear zero-initialised (fresh block == identity).
    Without ``cond_dim`` the norms are RMSNorms with learned gains and the gates are 1.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: Optional[int] = None,
        cond_dim: Optional[int] = None,
        qk_norm: bool = True,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        hidden = 2 * dim if hidden is None else hidden
        self.cond_dim = cond_dim
        conditioned = cond_dim is not None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False) if conditioned else RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False) if conditioned else RMSNorm(dim)
        self.mlp = MLP(dim, hidden)
        if conditioned:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)
        else:
            self.ada = None

    def forward(self, x: Tensor, cond: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, ada: Optional[Tensor] = None) -> Tensor:
        """``ada``: this block's ``self.ada(cond)`` when already known (a rollout or an unrolled
        training step conditions every step on the same ``cond``); ``cond`` is then not read."""
        if self.ada is None:
            x = x + self.attn(self.norm1(x), attn_bias=attn_bias)
            return x + self.mlp(self.norm2(x))
        if ada is None:
            if cond is None:
                raise ValueError("TransformerBlock was built with cond_dim but called without cond.")
            ada = self.ada(cond)
        sh1, sc1, g1, sh2, sc2, g2 = ada.chunk(6, dim=-1)
        x = gated(x, g1, self.attn(modulate(self.norm1(x), sh1, sc1), attn_bias=attn_bias))
        return gated(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: queries ``x (B, L, dim)`` attend to ``context (B, S, ctx)``,
    then a GELU MLP; residual on the queries."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: Optional[int] = None,
        context_dim: Optional[int] = None,
        qk_norm: bool = True,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        hidden = 2 * dim if hidden is None else hidden
        context_dim = dim if context_dim is None else context_dim
        self.norm_q = RMSNorm(dim)
        self.norm_ctx = RMSNorm(context_dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, backend=backend, context_dim=context_dim)
        self.norm2 = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def prepare_queries(self, x: Tensor) -> Tensor:
        """The attention queries of ``x`` (B|1, L, dim), for ``forward(..., q_heads=)`` when the same
        ``x`` meets many contexts (a decoder's grid queries)."""
        return self.attn.queries(self.norm_q(x))

    def forward(self, x: Tensor, context: Tensor, attn_bias: Optional[Tensor] = None,
                q_heads: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm_q(x) if q_heads is None else x, self.norm_ctx(context),
                          attn_bias=attn_bias, q=q_heads)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """AdaLN output head: LayerNorm modulated by ``cond`` then a zero-initialised Linear."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Optional[Tensor] = None, ada: Optional[Tensor] = None) -> Tensor:
        """``ada``: ``self.ada(cond)`` when already known (as for :class:`TransformerBlock`)."""
        shift, scale = (self.ada(cond) if ada is None else ada).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class FourierFeatures(nn.Module):
    """Periodic features of coordinates in [0, 1): ``[sin(2 pi k x), cos(2 pi k x)]`` for
    k = 1..n_freq. ``x (...)`` -> ``(..., 2 * n_freq)``."""

    def __init__(self, n_freq: int) -> None:
        super().__init__()
        if n_freq < 1:
            raise ValueError(f"FourierFeatures: n_freq must be >= 1, got {n_freq}.")
        self.n_freq = n_freq
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32),
                             persistent=False)

    @property
    def out_dim(self) -> int:
        return 2 * self.n_freq

    def forward(self, x: Tensor) -> Tensor:
        arg = x.unsqueeze(-1).to(self.freqs.dtype) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (e.g. flow time tau in [0, 1]) followed by an MLP.

    ``t (B,)`` or a Python float -> ``(B, dim)``; ``scale`` stretches [0, 1] so the sinusoids resolve it.
    """

    def __init__(self, dim: int, n_freq: int = 64, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        self.scale = scale
        half = n_freq
        self.register_buffer(
            "freqs", torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half),
            persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        arg = (t.float() * self.scale).unsqueeze(-1) * self.freqs
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))


class ConditionEmbedding(nn.Module):
    """MLP embedding of the raw conditioning vector (B, cond_dim) -> (B, dim)."""

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.mlp = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, cond: Tensor) -> Tensor:
        if cond.dim() != 2 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must have shape (B, {self.cond_dim}), got {tuple(cond.shape)}.")
        return self.mlp(cond)


def token_centres(n_tokens: int, device=None, dtype=torch.float32) -> Tensor:
    """Centres (j + 0.5) / n of n equal cells of [0, 1)."""
    return (torch.arange(n_tokens, device=device, dtype=dtype) + 0.5) / n_tokens


def periodic_distance(a: Tensor, b: Tensor) -> Tensor:
    """Signed periodic difference a - b wrapped into [-0.5, 0.5) (broadcasting)."""
    d = a - b
    return d - torch.floor(d + 0.5)
