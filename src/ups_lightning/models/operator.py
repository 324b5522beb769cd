"""Stage-2 latent operator: a PDE-Transformer, ``z_{t+1} = z_t + f(z_t, cond)``.

``f`` is a U-shaped transformer on the latent tokens:

- input projection + learned positional embedding per resolution level;
- pre-norm blocks (RMSNorm on queries and keys, attention through
  ``scaled_dot_product_attention`` or the optional flash-attn package) with AdaLN-Zero conditioning
  on an MLP embedding of the conditioning vector (``DataContract.conditioning``: the frame step,
  the equation and its parameters; width ``cond_dim`` from the data contract);
- ``levels`` times: a block at the current resolution, then token down-sampling by 2 (adjacent pairs
  merged by a Linear); a bottleneck of ``depth - 2 * levels`` blocks; then up-sampling by 2 (Linear to
  two tokens), fusion with the skip connection of that level (concat + Linear) and a block;
- an AdaLN output head whose last Linear is zero-initialised, so an untrained operator is the
  identity map (persistence) and training starts from it.

With ``levels=0`` it is a plain stack of ``depth`` blocks. ``n_tokens`` must be divisible by
``2 ** levels`` and ``depth >= 2 * levels + 1``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ups_lightning.models.layers import (
    ConditionEmbedding,
    FinalLayer,
    TransformerBlock,
    set_attention_backend,
)


class TokenDown(nn.Module):
    """(B, N, D) -> (B, N/2, D): adjacent token pairs concatenated and projected."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        return self.proj(x.reshape(B, N // 2, 2 * D))


class TokenUp(nn.Module):
    """(B, N/2, D) -> (B, N, D), fused with the skip connection of the finer level."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)
        self.fuse = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        B, M, D = x.shape
        up = self.proj(x).reshape(B, 2 * M, D)
        return self.fuse(torch.cat([up, skip], dim=-1))


class Conditioning(NamedTuple):
    """What the operator computes from ``cond`` alone: every block's AdaLN modulation and the head's,
    in the order the blocks run. Made once by :meth:`PDETransformer.condition` where many steps share
    one ``cond`` (an unrolled training step, a rollout), it is passed in ``cond``'s place."""
    blocks: List[Tensor]
    final: Tensor


class PDETransformer(nn.Module):
    def __init__(
        self,
        dim: int,
        n_tokens: int,
        depth: int = 4,
        heads: int = 4,
        hidden: Optional[int] = None,
        cond_dim: int = 2,
        levels: int = 1,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"PDETransformer: dim={dim} must be divisible by heads={heads}.")
        if levels < 0:
            raise ValueError(f"PDETransformer: levels must be >= 0, got {levels}.")
        if n_tokens % (2 ** levels) != 0:
            raise ValueError(f"PDETransformer: n_tokens={n_tokens} must be divisible by 2**levels={2 ** levels}.")
        if depth < 2 * levels + 1:
            raise ValueError(f"PDETransformer: depth={depth} too small for levels={levels} "
                             f"(need depth >= 2 * levels + 1 = {2 * levels + 1}).")
        hidden = 2 * dim if hidden is None else hidden
        self.dim, self.n_tokens, self.depth, self.levels, self.cond_dim = dim, n_tokens, depth, levels, cond_dim

        def block() -> TransformerBlock:
            return TransformerBlock(dim, heads, hidden, cond_dim=dim, backend=attn_backend)

        self.cond_embed = ConditionEmbedding(cond_dim, dim)
        self.in_proj = nn.Linear(dim, dim)
        self.pos = nn.ParameterList(
            nn.Parameter(torch.randn(1, n_tokens // 2 ** l, dim) * 0.02) for l in range(levels + 1))
        self.down_blocks = nn.ModuleList(block() for _ in range(levels))
        self.downs = nn.ModuleList(TokenDown(dim) for _ in range(levels))
        self.mid_blocks = nn.ModuleList(block() for _ in range(depth - 2 * levels))
        self.ups = nn.ModuleList(TokenUp(dim) for _ in range(levels))
        self.up_blocks = nn.ModuleList(block() for _ in range(levels))
        self.final = FinalLayer(dim, dim, dim)  # last Linear zero-initialised: identity at init

    def _blocks_in_order(self) -> List[nn.Module]:
        return [*self.down_blocks, *self.mid_blocks, *(self.up_blocks[l] for l in reversed(range(self.levels)))]

    def condition(self, cond: Tensor) -> Conditioning:
        """The modulations of conditioning vectors ``cond`` (B, cond_dim), for :meth:`delta`."""
        c = self.cond_embed(cond)
        return Conditioning([blk.ada(c) for blk in self._blocks_in_order()], self.final.ada(c))

    def delta(self, z: Tensor, cond: Union[Tensor, Conditioning]) -> Tensor:
        """The update f(z, cond) alone, shape (B, N, D); ``cond`` raw (B, cond_dim) or prepared."""
        if z.dim() != 3 or z.shape[1] != self.n_tokens or z.shape[2] != self.dim:
            raise ValueError(f"PDETransformer: z must be (B, {self.n_tokens}, {self.dim}), got {tuple(z.shape)}.")
        mods = cond if isinstance(cond, Conditioning) else self.condition(cond)
        ada = iter(mods.blocks)
        h = self.in_proj(z) + self.pos[0]
        skips = []
        for l in range(self.levels):
            h = self.down_blocks[l](h, ada=next(ada))
            skips.append(h)
            h = self.downs[l](h) + self.pos[l + 1]
        for blk in self.mid_blocks:
            h = blk(h, ada=next(ada))
        for l in reversed(range(self.levels)):
            h = self.ups[l](h, skips[l])
            h = self.up_blocks[l](h, ada=next(ada))
        return self.final(h, ada=mods.final)

    def forward(self, z: Tensor, cond: Union[Tensor, Conditioning]) -> Tensor:
        """One step: ``z + f(z, cond)``."""
        return z + self.delta(z, cond)

    def set_attention_backend(self, backend: str) -> "PDETransformer":
        set_attention_backend(self, backend)
        return self
