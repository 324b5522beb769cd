"""Equations as specs: ``get_pde(name)`` is the only way the rest of the project learns about one.

Registered: burgers1d, advection1d, reacdiff1d (1D); reacdiff2d, swe2d (2D, PDEBench's
``2D_diff-react_NA_NA.h5`` and ``2D_rdb_NA_NA.h5``). Another equation is one module here with a
``PDE`` subclass, one line in ``_register``, one data config under ``conf/data/`` and its tests
(README "Adding an equation").
"""
from __future__ import annotations

from typing import Dict

from ups_lightning.errors import UserError
from ups_lightning.pdes.base import PDE, Parameter

__all__ = ["PDE", "Parameter", "get_pde", "registered", "pde_of_file_attrs"]

_REGISTRY: Dict[str, PDE] = {}


def _register() -> None:
    from ups_lightning.pdes.advection import Advection1D
    from ups_lightning.pdes.burgers import Burgers1D
    from ups_lightning.pdes.reacdiff import ReactionDiffusion1D
    from ups_lightning.pdes.reacdiff2d import ReactionDiffusion2D
    from ups_lightning.pdes.swe2d import ShallowWater2D

    for spec in (Burgers1D(), Advection1D(), ReactionDiffusion1D(), ReactionDiffusion2D(), ShallowWater2D()):
        _REGISTRY[spec.name] = spec


def registered() -> Dict[str, PDE]:
    if not _REGISTRY:
        _register()
    return dict(_REGISTRY)


def get_pde(name: str, what: str = "setting data.pde") -> PDE:
    specs = registered()
    if name not in specs:
        raise UserError(f"{what}={name!r} is not a known equation: known equations are "
                        f"{', '.join(sorted(specs))}.")
    return specs[name]


def pde_of_file_attrs(attrs: set[str]) -> list[str]:
    """Equations whose parameter attributes are all among ``attrs`` (most parameters first)."""
    hits = [s for s in registered().values()
            if s.params and all(any(a in attrs for a in p.attrs) for p in s.params)]
    return [s.name for s in sorted(hits, key=lambda s: -len(s.params))]
