"""The benchmark's settings (conf/bench.yaml), declared as a schema (``BenchSettings``: the same
machinery as training's and every other driver's, ups_lightning.schema) plus the rules between keys;
a bad one is a UserError naming it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from ups_lightning import CONF_DIR
from ups_lightning.errors import UserError
from ups_lightning.schema import check_ranges, setting, validate
from ups_lightning.stages.settings import BudgetShares

__all__ = ["check_config", "BenchSettings", "STAGE_SHARES", "METHODS", "METRIC_KEYS"]

CONF = CONF_DIR
WHERE = "conf/bench.yaml"
STAGE_SHARES = ("autoencoder", "operator")   # our stages the benchmark trains (the plain rollout's)
METHODS = ("ours", "fno", "unet")
METRIC_KEYS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "frmse_low", "frmse_mid",
               "frmse_high", "correlation_horizon", "rmse", "brmse", "max_err", "mass_drift",
               "energy_increase", "tv_increase", "spectral_energy_error", "nrmse_pdebench")
FLAGS = ("skip_solver", "reuse", "relative_loss", "curves_only")   # true/false only (not "yes", not 2)


@dataclass
class Search:
    """bench/search.py's successive halving (search.SearchSettings once checked)."""
    rates: int = setting(1)              # ladder rates on the first rung
    step: float = setting(1.0, low_ok=False)   # their ratio
    widen: int = setting(0)              # rates added beyond an edge pick
    rungs: List[float] = MISSING         # increasing fractions of budget_min ending at 1
    keep: int = setting(1)               # pairs promoted per rung


@dataclass
class BenchSettings:
    """conf/bench.yaml: its keys, types and ranges; check_config adds the rules between keys."""

    data: Any = MISSING                  # a conf/data option (checked by training when ours trains)
    model: Any = MISSING                 # a conf/model option
    budget_min: float = setting(0.0, low_ok=False)
    methods: List[str] = MISSING
    seeds: List[int] = MISSING
    recipes: Dict[str, List[str]] = MISSING
    lr_default: Dict[str, float] = MISSING
    search: Search = field(default_factory=Search)
    given: Dict[str, Any] = MISSING
    curve_budgets: List[float] = MISSING
    curve_seeds: List[int] = MISSING
    curves_from: List[str] = MISSING
    curves_only: bool = MISSING
    relative_loss: bool = MISSING
    experiment: str = MISSING
    shares: BudgetShares = field(default_factory=BudgetShares)
    train_overrides: List[str] = MISSING
    n_test: Optional[int] = setting(1)
    threads: Optional[int] = setting(1)
    eval_batch_size: int = setting(1)
    skip_solver: bool = MISSING
    reuse: bool = MISSING
    solver_grids: List[int] = MISSING
    fno: Any = MISSING                   # the peers' architecture settings: checked against their classes
    unet: Any = MISSING
    out_dir: str = MISSING
    leaderboard: str = MISSING
    html: str = MISSING


def _fail(key: str, value: Any, want: str) -> UserError:
    return UserError(f"bench setting {key}={value!r}: expected {want} ({WHERE}).")


def _seeds(values: List[int], key: str) -> List[int]:
    seeds = list(values)
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise _fail(key, seeds, "a non-empty list of distinct integers >= 0 (training seeds)")
    return [int(s) for s in seeds]


#: what null means for a peer setting whose null is not "all" (t_train, grad_frames)
NULL_MEANS = {"batch_size": "PDEBench's batch for the data's dimension"}


def _peer_settings(cfg: DictConfig, name: str, cls: type) -> Any:
    """A peer's architecture settings (``fno:`` / ``unet:``): every key of its class given (its
    defaults never fill a gap), each a count >= 1 (or null where the class means "all" by None)."""
    given = cfg[name]
    known = {f.name: f for f in fields(cls)}
    if not OmegaConf.is_dict(given) or set(given) != set(known):
        have = sorted(given) if OmegaConf.is_dict(given) else given
        raise UserError(f"bench setting {name}={have!r}: expected exactly the keys {sorted(known)} ({WHERE}; "
                        f"{cls.__name__} in bench/{name}.py).")
    for k, f in known.items():
        v = given[k]
        if v is None and f.default is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            null = f" or null ({NULL_MEANS.get(k, 'all')})" if f.default is None else ""
            raise _fail(f"{name}.{k}", v, "an integer >= 1" + null)
    return cls.from_mapping(OmegaConf.to_container(given))


def _search(s: DictConfig):
    from ups_lightning.bench.search import SearchSettings

    rungs = list(s.rungs)
    if not rungs or any(b <= a for a, b in zip(rungs, rungs[1:])) or abs(rungs[-1] - 1.0) > 1e-9 or rungs[0] <= 0:
        raise _fail("search.rungs", rungs, "increasing fractions of budget_min in (0, 1] ending at 1 (the last "
                                           "rung trains at the budget itself), e.g. [0.25, 1.0]")
    return SearchSettings(rates=int(s.rates), step=float(s.step), widen=int(s.widen), rungs=tuple(rungs),
                          keep=int(s.keep))


def _given_choices(given: DictConfig, out: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``given:``: per method, a recipe, rate and optionally guard that an earlier run chose on
    validation (its search is then skipped)."""
    choices = {}
    for method, g in given.items():
        if method not in out["methods"]:
            raise _fail(f"given.{method}", g, f"a method among methods={out['methods']}")
        g = dict(g) if OmegaConf.is_dict(g) else {}
        if set(g) - {"recipe", "lr", "guard"} or not {"recipe", "lr"} <= set(g):
            raise _fail(f"given.{method}", g, "a recipe and an lr (and optionally guard: true/false), e.g. "
                                              "given.fno={recipe: pdebench, lr: 0.00316}")
        if g["recipe"] not in out["recipes"][method]:
            raise _fail(f"given.{method}.recipe", g["recipe"], f"one of recipes.{method}={out['recipes'][method]}")
        guard = g.get("guard")
        if guard is not None and not isinstance(guard, bool):
            raise _fail(f"given.{method}.guard", guard, "true, false or absent (absent: chosen on validation)")
        lr = g["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise _fail(f"given.{method}.lr", lr, "a positive learning rate")
        choices[method] = {"recipe": str(g["recipe"]), "lr": float(lr), "guard": guard}
    return choices


def check_config(cfg: DictConfig) -> Dict[str, Any]:
    """Validate the bench config; a bad setting is a UserError naming it. Returns checked values."""
    from ups_lightning.bench.peers import PEERS, RECIPES

    for flag in FLAGS:    # the schema would read "yes" or 2 as true
        if not isinstance(cfg.get(flag), bool):
            raise _fail(flag, cfg.get(flag), "true or false")
    s = validate(cfg, BenchSettings, "bench", WHERE)
    out: Dict[str, Any] = {k: s[k] for k in ("budget_min", "n_test", "threads", "eval_batch_size", *FLAGS)}
    methods = list(s.methods)
    if not methods or len(set(methods)) != len(methods) or not set(methods) <= set(METHODS):
        raise _fail("methods", methods, f"a non-empty list of distinct names from {list(METHODS)} (e.g. methods=[ours,fno])")
    out["methods"] = methods
    out["seeds"] = _seeds(s.seeds, "seeds")
    out["curve_seeds"] = _seeds(s.curve_seeds, "curve_seeds")
    if any(b <= 0 for b in s.curve_budgets):
        raise _fail("curve_budgets", list(s.curve_budgets), "budgets in minutes > 0 (e.g. [2.5,5,10,20,40]; [] for none)")
    out["curve_budgets"] = sorted({float(b) for b in s.curve_budgets})
    out["lr_default"], out["recipes"] = {}, {}
    for m in methods:
        check_ranges(s, [(f"lr_default.{m}", 0.0, False, None)], "bench")
        if s.lr_default.get(m) is None:
            raise _fail(f"lr_default.{m}", None, f"{m}'s published learning rate (the centre of its search ladder)")
        out["lr_default"][m] = float(s.lr_default[m])
        recipes = list(s.recipes.get(m) or [])
        allowed = ["project"] if m == "ours" else list(RECIPES)
        if not recipes or len(set(recipes)) != len(recipes) or not set(recipes) <= set(allowed):
            raise _fail(f"recipes.{m}", recipes, f"a non-empty list of distinct recipes from {allowed} (bench/peers.py)")
        out["recipes"][m] = recipes
    out["curves_from"] = [str(x) for x in s.curves_from]
    if not all(x.strip() for x in out["curves_from"]):
        raise _fail("curves_from", out["curves_from"], "results directories of earlier benchmark runs")
    if out["curves_only"] and not out["curves_from"]:
        raise UserError("bench setting curves_only=true merges the curves of curves_from=[...] and trains "
                        "nothing: name the results directories to merge.")
    out["search"] = _search(s.search)
    out["given"] = _given_choices(s.given, out)
    out["shares"] = {k: float(s.shares[k]) for k in STAGE_SHARES}
    total = sum(out["shares"].values())
    if total > 1.0 + 1e-6:
        raise UserError(f"bench setting shares sum to {total:.3f}: our stages' fractions of budget_min "
                        "must add up to at most 1 (the same wall-clock as every peer gets).")
    if not s.solver_grids or any(g < 4 for g in s.solver_grids):
        raise _fail("solver_grids", list(s.solver_grids), "a non-empty list of cell counts (integers >= 4 that "
                                                          "divide the evaluation grid)")
    out["solver_grids"] = [int(g) for g in s.solver_grids]
    out["peers"] = {name: _peer_settings(s, name, cls) for name, (_, cls, _) in PEERS.items()}
    if not str(s.out_dir).strip():
        raise UserError("bench setting out_dir must name a directory (default outputs/bench).")
    return out
