"""The benchmark's settings (conf/bench.yaml), checked: a bad one is a UserError naming it."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from ups_lightning import CONF_DIR

__all__ = ["check_config", "STAGE_SHARES", "METHODS", "METRIC_KEYS"]

CONF = CONF_DIR
STAGE_SHARES = ("autoencoder", "operator")   # our stages the benchmark trains (the plain rollout's)
METHODS = ("ours", "fno", "unet")
METRIC_KEYS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "frmse_low", "frmse_mid",
               "frmse_high", "correlation_horizon", "rmse", "brmse", "max_err", "mass_drift",
               "energy_increase", "tv_increase", "spectral_energy_error", "nrmse_pdebench")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def _num(cfg: Any, key: str, *, integer: bool = False, positive: bool = True, allow_none: bool = False,
         minimum: Optional[float] = None, where: str = "") -> Any:
    from ups_lightning.errors import UserError

    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key)
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer and isinstance(value, float):
        ok = value.is_integer()
    if ok and not math.isfinite(float(value)):
        ok = False
    if ok and positive and value <= 0:
        ok = False
    if ok and minimum is not None and value < minimum:
        ok = False
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        if minimum is not None:
            kind = f"{'an integer' if integer else 'a number'} >= {minimum}"
        raise UserError(f"bench setting {where}{key}={value!r} must be {kind}"
                        f"{' or null' if allow_none else ''} (conf/bench.yaml).")
    return int(value) if integer else float(value)


def _settings(cfg: Any, name: str, cls: type) -> Any:
    """A peer's architecture settings (``fno:`` / ``unet:`` in conf/bench.yaml), checked."""
    from ups_lightning.errors import UserError

    given = dict(cfg.get(name) or {})
    unknown = set(given) - set(cls.__dataclass_fields__)
    if unknown:
        raise UserError(f"bench setting {name} has unknown key(s) {sorted(unknown)}; known: "
                        f"{sorted(cls.__dataclass_fields__)}.")
    for k in given:   # every architecture setting is a count (None: "all", where the default is None)
        _num(given, k, integer=True, allow_none=cls.__dataclass_fields__[k].default is None, where=f"{name}.")
    return cls.from_mapping(given)


def _seeds(cfg: Any, key: str) -> List[int]:
    from ups_lightning.errors import UserError

    seeds = list(cfg.get(key) or [])
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"bench setting {key}={seeds!r} must be a non-empty list of distinct integers >= 0 "
                        "(training seeds).")
    return [int(s) for s in seeds]


def _search_settings(given: Any):
    """``search:`` of conf/bench.yaml as bench.search.SearchSettings, checked."""
    from ups_lightning.bench.search import SearchSettings
    from ups_lightning.errors import UserError

    given = dict(given or {})
    known = set(SearchSettings.__dataclass_fields__)
    if set(given) != known:
        raise UserError(f"bench setting search must give exactly {sorted(known)}; got {sorted(given)}.")
    rates = _num(given, "rates", integer=True, where="search.")
    widen = _num(given, "widen", integer=True, positive=False, minimum=0, where="search.")
    keep = _num(given, "keep", integer=True, where="search.")
    step = _num(given, "step", where="search.")
    if step <= 1.0:
        raise UserError(f"bench setting search.step={step:g} must be > 1 (the ratio between neighbouring rates).")
    rungs = given["rungs"]
    ok = rungs is not None and not isinstance(rungs, str) and hasattr(rungs, "__iter__") and len(rungs) > 0
    vals = [_num({"rung": r}, "rung", where="search.rungs.") for r in rungs] if ok else []
    if not ok or any(b <= a for a, b in zip(vals, vals[1:])) or abs(vals[-1] - 1.0) > 1e-9 or vals[0] <= 0:
        raise UserError(f"bench setting search.rungs={rungs!r} must be increasing fractions of budget_min in "
                        "(0, 1] ending at 1 (the last rung trains at the budget itself), e.g. [0.25, 1.0].")
    return SearchSettings(rates=rates, step=step, widen=widen, rungs=tuple(vals), keep=keep)


def _given_choices(given: Any, out: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``given:`` of conf/bench.yaml: per method, a recipe, rate and optionally guard that an
    earlier run chose on validation (its search is then skipped), checked."""
    from ups_lightning.errors import UserError

    choices = {}
    for method, g in dict(given or {}).items():
        g = dict(g or {})
        if method not in out["methods"]:
            raise UserError(f"bench setting given.{method}: {method!r} is not among methods={out['methods']}.")
        if set(g) - {"recipe", "lr", "guard"} or not {"recipe", "lr"} <= set(g):
            raise UserError(f"bench setting given.{method}={g!r} must give recipe and lr (and optionally guard: "
                            "true/false), e.g. given.fno={recipe: pdebench, lr: 0.00316}.")
        if g["recipe"] not in out["recipes"][method]:
            raise UserError(f"bench setting given.{method}.recipe={g['recipe']!r} must be one of "
                            f"recipes.{method}={out['recipes'][method]}.")
        guard = g.get("guard")
        if guard is not None and not isinstance(guard, bool):
            raise UserError(f"bench setting given.{method}.guard={guard!r} must be true, false or absent "
                            "(absent: chosen on validation).")
        choices[method] = {"recipe": str(g["recipe"]), "lr": _num(g, "lr", where=f"given.{method}."),
                           "guard": guard}
    return choices


def check_config(cfg: Any) -> Dict[str, Any]:
    """Validate the bench config; a bad setting is a UserError naming it. Returns checked values."""
    from ups_lightning.bench.peers import PEERS, RECIPES
    from ups_lightning.errors import UserError

    out: Dict[str, Any] = {}
    out["budget_min"] = _num(cfg, "budget_min")
    out["n_test"] = _num(cfg, "n_test", integer=True, allow_none=True)
    out["threads"] = _num(cfg, "threads", integer=True, allow_none=True)
    out["eval_batch_size"] = _num(cfg, "eval_batch_size", integer=True)
    for flag in ("skip_solver", "reuse", "relative_loss"):
        if not isinstance(cfg.get(flag), bool):
            raise UserError(f"bench setting {flag}={cfg.get(flag)!r} must be true or false.")
        out[flag] = bool(cfg.get(flag))
    methods = list(cfg.get("methods") or [])
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise UserError(f"bench setting methods={methods!r} must be a non-empty list of distinct names "
                        f"from {list(METHODS)} (e.g. methods=[ours,fno]).")
    out["methods"] = methods
    out["seeds"] = _seeds(cfg, "seeds")
    out["curve_seeds"] = _seeds(cfg, "curve_seeds")
    curve = cfg.get("curve_budgets")
    if curve is None or isinstance(curve, str) or not hasattr(curve, "__iter__"):
        raise UserError(f"bench setting curve_budgets={curve!r} must be a list of budgets in minutes "
                        "(e.g. curve_budgets=[2.5,5,10,20,40]; [] for none).")
    out["curve_budgets"] = sorted({_num({"budget": v}, "budget", where="curve_budgets.") for v in curve})
    out["lr_default"], out["recipes"] = {}, {}
    for m in methods:
        out["lr_default"][m] = _num(cfg.get("lr_default") or {}, m, where="lr_default.")
        recipes = list((cfg.get("recipes") or {}).get(m) or [])
        allowed = ["project"] if m == "ours" else list(RECIPES)
        if not recipes or len(set(recipes)) != len(recipes) or any(r not in allowed for r in recipes):
            raise UserError(f"bench setting recipes.{m}={recipes!r} must be a non-empty list of distinct "
                            f"recipes from {allowed} (bench/peers.py).")
        out["recipes"][m] = recipes
    frm = cfg.get("curves_from")
    if frm is None or isinstance(frm, str) or not all(isinstance(x, str) and x.strip() for x in frm):
        raise UserError(f"bench setting curves_from={frm!r} must be a list of results directories of earlier "
                        "benchmark runs (e.g. curves_from=[results/issue22/DIR]; [] for none).")
    out["curves_from"] = [str(x) for x in frm]
    if not isinstance(cfg.get("curves_only"), bool):
        raise UserError(f"bench setting curves_only={cfg.get('curves_only')!r} must be true or false.")
    out["curves_only"] = bool(cfg.get("curves_only"))
    if out["curves_only"] and not out["curves_from"]:
        raise UserError("bench setting curves_only=true merges the curves of curves_from=[...] and trains "
                        "nothing: name the results directories to merge.")
    out["search"] = _search_settings(cfg.get("search"))
    out["given"] = _given_choices(cfg.get("given"), out)
    shares = cfg.get("shares")
    if shares is None or not hasattr(shares, "keys") or set(shares.keys()) != set(STAGE_SHARES):
        raise UserError(f"bench setting shares={shares!r} must map each of {', '.join(STAGE_SHARES)} to "
                        "its fraction of budget_min (e.g. shares.autoencoder=0.375).")
    for k in STAGE_SHARES:
        _num(shares, k, where="shares.")
    total = sum(float(shares[k]) for k in STAGE_SHARES)
    if total > 1.0 + 1e-6:
        raise UserError(f"bench setting shares sum to {total:.3f}: our stages' fractions of budget_min "
                        "must add up to at most 1 (the same wall-clock as every peer gets).")
    out["shares"] = {k: float(shares[k]) for k in STAGE_SHARES}
    grids_cells = cfg.get("solver_grids")
    if grids_cells is None or not hasattr(grids_cells, "__iter__") or isinstance(grids_cells, str) \
            or len(grids_cells) == 0:
        raise UserError(f"bench setting solver_grids={grids_cells!r} must be a non-empty list of cell counts.")
    for g in grids_cells:
        if isinstance(g, bool) or not isinstance(g, int) or g < 4:
            raise UserError(f"bench setting solver_grids={list(grids_cells)}: {g!r} is not a cell count (an "
                            "integer >= 4 that divides the evaluation grid).")
    out["solver_grids"] = [int(g) for g in grids_cells]
    out["peers"] = {name: _settings(cfg, name, cls) for name, (_, cls, _) in PEERS.items()}
    if not str(cfg.get("out_dir") or "").strip():
        raise UserError("bench setting out_dir must name a directory (default outputs/bench).")
    return out
