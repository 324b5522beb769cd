"""Stages as specs: ``get_stage(name)`` is the only way the rest of the project learns about one.

A stage is one module here holding its LightningModule (``STAGE``), its settings dataclass
(``Settings``: the keys of ``stages.<name>``, their ranges in field metadata), how it gets its data
from the run's data and the upstream stage (``prepare``), and which networks it trains (``trains``);
plus one line in ``_REGISTRY`` (its name, the stage it follows, its module) and its defaults in
conf/stages/default.yaml (conf/ holds every default). README "Adding a stage".

This module imports neither torch nor Lightning: the schema (``ups_lightning.config``) and the
command lines read the order and the chain from here; a stage's module is imported when its
class or settings are first needed.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional

__all__ = ["STAGE_ORDER", "UPSTREAM", "chain", "get_stage", "register", "unregister", "with_role"]

# name: (the stage it follows, or None; its module), in pipeline order
_REGISTRY: Dict[str, tuple] = {
    "autoencoder": (None, "ups_lightning.stages.autoencoder"),
    "operator": ("autoencoder", "ups_lightning.stages.operator"),
    "diffusion": ("operator", "ups_lightning.stages.diffusion"),
    "distill": ("diffusion", "ups_lightning.stages.distill"),
}

#: the registered stages, each after its upstream (updated in place by ``register``)
STAGE_ORDER: List[str] = list(_REGISTRY)
#: each stage's upstream stage (None for the first)
UPSTREAM: Dict[str, Optional[str]] = {name: up for name, (up, _) in _REGISTRY.items()}


def chain(name: str) -> List[str]:
    """The stages a model up to ``name`` is made of, along the upstream links, the first first."""
    out = [name]
    while UPSTREAM[out[-1]] is not None:
        out.append(UPSTREAM[out[-1]])
    return out[::-1]


def register(name: str, upstream: Optional[str], module: str) -> None:
    """Add a stage after the registered ones (its upstream registered before it)."""
    if name in _REGISTRY:
        raise ValueError(f"stage {name!r} is already registered")
    if upstream is not None and upstream not in _REGISTRY:
        raise ValueError(f"stage {name!r}: its upstream {upstream!r} must be registered first")
    _REGISTRY[name] = (upstream, module)
    STAGE_ORDER.append(name)
    UPSTREAM[name] = upstream


def unregister(name: str) -> None:
    """Remove a stage that no registered stage follows (the inverse of ``register``)."""
    if any(up == name for up, _ in _REGISTRY.values()):
        raise ValueError(f"stage {name!r} is upstream of another stage")
    del _REGISTRY[name]
    STAGE_ORDER.remove(name)
    del UPSTREAM[name]


def get_stage(name: str) -> type:
    """The LightningModule class of stage ``name`` (its module's ``STAGE``)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; known stages are {STAGE_ORDER}")
    cls = importlib.import_module(_REGISTRY[name][1]).STAGE
    if cls.name != name:
        raise TypeError(f"{_REGISTRY[name][1]}.STAGE is stage {cls.name!r}, registered as {name!r}")
    return cls


def with_role(role: str) -> List[str]:
    """The stages (in order) whose class declares ``role`` (``StageModule.role``: encoder,
    stepper, corrector), for code that must find a stage by what it does rather than by name."""
    return [name for name in STAGE_ORDER if get_stage(name).role == role]
