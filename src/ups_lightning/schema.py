"""The one way a command's settings are declared and checked: a dataclass schema whose fields hold
no defaults (every value comes from conf/) and state their ranges once (``setting``); ``validate``
merges a composed config onto it, so an unknown key, a wrong type, an unset value or a number out of
range is one paragraph naming the setting. Training's schema (``config.py``), the stages' settings
(``stages/``) and the experiment drivers (``proxy.py``, ...) all use it. Torch-free.
"""
from __future__ import annotations

import math
from dataclasses import MISSING as NO_FACTORY, field, fields, is_dataclass
from typing import Any, Iterator, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ups_lightning.errors import UserError

__all__ = ["setting", "settings_rules", "check_settings", "check_ranges", "schema_error", "validate"]


def setting(low: Optional[float] = None, *, low_ok: bool = True, high: Optional[float] = None,
            choices: Optional[Sequence[Any]] = None, later: Any = MISSING) -> Any:
    """A schema field (no default: conf/ sets it) with the numbers a run can work with: at least
    ``low`` (more than it with ``low_ok=False``), at most ``high``, or one of ``choices``. ``later``:
    the value that means "as before" for a key added after runs were trained without it (their
    records are read with it, and a stage hash is unchanged at it: config.neutral_later_keys)."""
    meta = {"low": low, "low_ok": low_ok, "high": high, "choices": tuple(choices) if choices else None}
    if later is not MISSING:
        meta["later"] = later
    return field(default=MISSING, metadata=meta)


def settings_rules(cls: type, prefix: str = "") -> Iterator[tuple]:
    """(key, metadata) of every field of the settings dataclass ``cls`` (nested ones included),
    keys under ``prefix``."""
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.metadata:
            yield key, dict(f.metadata)
        if f.default_factory is not NO_FACTORY and is_dataclass(f.default_factory):
            yield from settings_rules(f.default_factory, key)


def check_ranges(cfg: DictConfig, ranges: List[tuple], what: str = "") -> None:
    """Each listed number (key, lower bound, lower bound included, upper bound or None; None values
    skipped) lies in its range and is finite; else a UserError naming the key, value and range."""
    for key, low, low_ok, high in ranges:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value >= low if low_ok else value > low) and (high is None or value <= high)
        if not ok:
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise UserError(f"{what + ' ' if what else ''}setting {key}={value!r} is out of range: expected a "
                            f"finite number {bound}.")


def check_settings(cfg: DictConfig, cls: type, prefix: str = "", what: str = "") -> None:
    """The ranges and choices the dataclass ``cls`` states in its fields' metadata (``setting``),
    for the values under ``prefix``."""
    for key, meta in settings_rules(cls, prefix):
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if meta.get("choices") is not None:
            if value not in meta["choices"]:
                *rest, last = [repr(c) for c in meta["choices"]]
                raise UserError(f"{what + ' setting ' if what else ''}{key}={value!r}: expected "
                                f"{' or '.join([', '.join(rest), last] if rest else [last])}.")
        elif meta.get("low") is not None or meta.get("high") is not None:
            low = -math.inf if meta["low"] is None else meta["low"]
            check_ranges(cfg, [(key, low, meta["low_ok"], meta["high"])], what)


def schema_error(exc: OmegaConfBaseException, what: str, where: str, cfg: Any = None) -> UserError:
    """One paragraph from OmegaConf's multi-line message: the key (and its value in ``cfg``), the
    first line, where to look."""
    key = getattr(exc, "full_key", None) or "?"
    first = str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
    if cfg is not None:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:   # the key is what is wrong: no value to show
            value = None
        return UserError(f"{what} setting {key}={value!r}: {first}. Check the spelling of the key and the type "
                         f"of its value against {where}.")
    return UserError(f"invalid {what} config at key '{key}': {first}. Check the spelling of the key and "
                     f"the type of its value against {where}.")


def validate(cfg: DictConfig, cls: type, what: str, where: str) -> DictConfig:
    """``cfg`` (Hydra's own node left out) merged onto the schema ``cls``: unknown keys, wrong
    types, unset values and the ranges ``cls`` states are UserErrors "<what> setting key=value: ...";
    returns the merged, resolved config."""
    cfg = cfg.copy()
    if "hydra" in cfg:
        OmegaConf.set_struct(cfg, False)
        del cfg["hydra"]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise schema_error(exc, what, where, cfg) from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise UserError(f"{what} setting {missing[0]} is unset{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                        f"set it in {where} or on the command line (key=value).")
    check_settings(merged, cls, what=what)
    return merged
