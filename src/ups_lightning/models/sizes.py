"""The one scaling rule: latent width ``dim`` -> every other size of the latent models.

Every latent model (autoencoder, operator, residual flow, consistency student) takes its sizes from
:func:`model_sizes`, so a sweep over ``dim`` changes exactly one knob:

==========  =====================================================================================
field       rule
==========  =====================================================================================
dim         the latent width (token feature size); one of ``SUPPORTED_DIMS``
n_tokens    number of latent tokens; default 32 (8 cells per token on a 256-cell grid)
hidden      MLP hidden width = ``2 * dim``
heads       attention heads = ``max(1, min(8, dim // 16))`` (head width 16 up to dim 128, then 8
            heads of width dim/8); ``dim`` must be divisible by ``heads``
groups      GroupNorm groups for the conv parts = ``gcd(8, hidden)`` (always divides ``hidden``)
depth       transformer depth of the operator; default 4
==========  =====================================================================================

Resulting heads per supported dim: 8->1, 16->1, 24->1, 32->2, 48->3, 64->4, 128->8, 256->8, 512->8.

``hidden`` and ``heads`` can be set apart from the rule (``model.hidden``, ``model.heads``: the width
and head axes of a sweep); :func:`sizes_of` reads them from a model config.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

SUPPORTED_DIMS: tuple[int, ...] = (8, 16, 24, 32, 48, 64, 128, 256, 512)


@dataclass(frozen=True)
class ModelSizes:
    dim: int
    n_tokens: int
    hidden: int
    heads: int
    groups: int
    depth: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def model_sizes(dim: int, n_tokens: int = 32, depth: int = 4, hidden: Optional[int] = None,
                heads: Optional[int] = None) -> ModelSizes:
    """Sizes for latent width ``dim`` (see the module docstring for the rule); ``hidden`` and
    ``heads`` replace the rule's values when given.

    Raises ``ValueError`` for a non-positive ``dim``/``n_tokens``/``depth`` or a ``dim`` that the
    head count does not divide (e.g. dim 40 -> 2 heads of width 20 is fine, dim 50 -> 3 heads is not).
    """
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"model_sizes: dim must be a positive integer, got {dim!r}; "
                         f"supported dims are {SUPPORTED_DIMS}.")
    if n_tokens <= 0:
        raise ValueError(f"model_sizes: n_tokens must be positive, got {n_tokens}.")
    if depth <= 0:
        raise ValueError(f"model_sizes: depth must be positive, got {depth}.")
    if heads is not None and (heads <= 0 or dim % heads != 0):
        raise ValueError(f"model_sizes: heads={heads} must be a positive divisor of dim={dim}.")
    if hidden is not None and hidden <= 0:
        raise ValueError(f"model_sizes: hidden must be positive, got {hidden}.")
    heads = max(1, min(8, dim // 16)) if heads is None else heads
    if dim % heads != 0:
        raise ValueError(
            f"model_sizes: dim={dim} is not divisible by its head count heads={heads} "
            f"(heads = max(1, min(8, dim // 16))); pick a dim from {SUPPORTED_DIMS} or any dim "
            f"divisible by its head count."
        )
    hidden = 2 * dim if hidden is None else hidden
    groups = math.gcd(8, hidden)
    return ModelSizes(dim=dim, n_tokens=n_tokens, hidden=hidden, heads=heads, groups=groups, depth=depth)


def sizes_of(model_cfg: Mapping[str, Any]) -> ModelSizes:
    """The sizes a model config asks for (conf/model; configs of older checkpoints lack hidden/heads)."""
    return model_sizes(model_cfg["dim"], n_tokens=model_cfg["n_tokens"], depth=model_cfg["depth"],
                       hidden=model_cfg.get("hidden"), heads=model_cfg.get("heads"))
