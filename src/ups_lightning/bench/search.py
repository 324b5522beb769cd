"""The benchmark's learning-rate and recipe search: successive halving on a geometric ladder, with
an interior optimum and the same number of trials for every method.

For each method, every recipe it may train with (``bench/peers.py``: ``RECIPES``) gets a ladder of
``rates`` learning rates around the method's published default, ``step`` apart (5 rates, step
sqrt(10): a span of 100x). The first rung trains each (recipe, rate) for ``rungs[0]`` of the budget
and scores it on validation. Where a ladder's best rate lies on its edge, the ladder is widened
beyond that edge, one rate at a time, up to ``widen`` rates; then every ladder that widened less is
padded to the same length (on the side of its better edge), so that every (method, recipe) ends the
first rung with the same number of trials. The best ``keep`` (recipe, rate) of each method go on to
the next rung, and so on; the last rung is the full budget, and its best on validation is the
method's choice (and the first seed's run). Nothing here reads the test split.

``search`` takes a ``train(method, recipe, lr, budget_fraction) -> validation figure`` callable, so
the same rules run (and are tested) without training anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

__all__ = ["SearchSettings", "Trial", "search", "ladder_rate"]


@dataclass(frozen=True)
class SearchSettings:
    rates: int = 5                 # rates per (method, recipe) on the first rung
    step: float = math.sqrt(10.0)  # ratio between neighbouring rates
    widen: int = 2                 # at most this many rates added beyond an edge pick
    rungs: Tuple[float, ...] = (0.25, 1.0)   # budget fractions; the last is 1 (the budget itself)
    keep: int = 2                  # (recipe, rate) pairs of a method promoted to the next rung


@dataclass
class Trial:
    method: str
    recipe: str
    lr: float
    index: int          # position on the ladder: lr = default * step ** index
    rung: int
    fraction: float     # of the budget
    val: float          # validation figure (lower is better; inf: failed)
    extra: Dict = field(default_factory=dict)   # whatever train() returned beside the figure


def ladder_rate(default: float, step: float, index: int) -> float:
    """The ladder's rate ``index`` steps from ``default``, rounded to 3 significant digits so that
    run names and records stay readable (1e-3 * sqrt(10) -> 0.00316)."""
    return float(f"{default * step ** index:.3g}")


def _edge_side(trials: Sequence[Trial]) -> int:
    """-1 / +1 where the best trial sits on the low / high edge of its ladder, 0 when interior."""
    best = min(trials, key=lambda t: t.val)
    lo, hi = min(t.index for t in trials), max(t.index for t in trials)
    if best.index == lo and best.index != hi:
        return -1
    if best.index == hi and best.index != lo:
        return +1
    return 0 if lo != hi else -1


def search(methods: Dict[str, Tuple[float, Sequence[str]]], settings: SearchSettings,
           train: Callable[[str, str, float, float], Tuple[float, Dict]],
           say: Callable[[str], None] = print) -> Dict[str, Dict]:
    """Run the search. ``methods``: name -> (published default rate, recipes). Returns per method
    {"trials": [Trial], "chosen": Trial, "interior": {recipe: bool}, "first_rung_trials": n}."""
    s = settings
    half = s.rates // 2
    ladders: Dict[Tuple[str, str], Dict[int, Trial]] = {}

    def run(method: str, recipe: str, index: int, rung: int) -> Trial:
        default = methods[method][0]
        lr = ladder_rate(default, s.step, index)
        val, extra = train(method, recipe, lr, s.rungs[rung])
        val = float(val) if val is not None and math.isfinite(float(val)) else math.inf
        return Trial(method, recipe, lr, index, rung, s.rungs[rung], val, dict(extra or {}))

    # rung 0: the ladders, widened beyond an edge pick
    widened: Dict[Tuple[str, str], int] = {}
    for method, (_, recipes) in methods.items():
        for recipe in recipes:
            key = (method, recipe)
            ladders[key] = {i: run(method, recipe, i, 0) for i in range(-half, s.rates - half)}
            widened[key] = 0
            while widened[key] < s.widen:
                side = _edge_side(list(ladders[key].values()))
                if side == 0:
                    break
                idx = (min(ladders[key]) - 1) if side < 0 else (max(ladders[key]) + 1)
                say(f"search: {method} ({recipe}) is best at the {'lowest' if side < 0 else 'highest'} rate; "
                    f"adding lr {ladder_rate(methods[method][0], s.step, idx):g}")
                ladders[key][idx] = run(method, recipe, idx, 0)
                widened[key] += 1
    # equal trials: every ladder as long as the longest
    most = max(len(v) for v in ladders.values())
    for key, ladder in ladders.items():
        while len(ladder) < most:
            lo, hi = min(ladder), max(ladder)
            side = -1 if ladder[lo].val <= ladder[hi].val else +1
            idx = lo - 1 if side < 0 else hi + 1
            say(f"search: {key[0]} ({key[1]}) gets lr {ladder_rate(methods[key[0]][0], s.step, idx):g} too "
                f"(every method and recipe gets {most} first-rung trials)")
            ladder[idx] = run(key[0], key[1], idx, 0)

    out: Dict[str, Dict] = {}
    for method, (_, recipes) in methods.items():
        trials = [t for r in recipes for t in ladders[(method, r)].values()]
        interior = {r: _edge_side(list(ladders[(method, r)].values())) == 0 for r in recipes}
        alive = sorted(trials, key=lambda t: t.val)
        for rung in range(1, len(s.rungs)):
            alive = [t for t in alive[:s.keep] if math.isfinite(t.val)] or alive[:1]
            promoted = [run(method, t.recipe, t.index, rung) for t in alive]
            trials += promoted
            alive = sorted(promoted, key=lambda t: t.val)
        chosen = alive[0]
        say(f"search: {method} chose {chosen.recipe} lr {chosen.lr:g} on validation ({chosen.val:.4f}); "
            + ", ".join(f"{r}: {'interior' if ok else 'ON THE EDGE'}" for r, ok in interior.items()))
        out[method] = {"trials": trials, "chosen": chosen, "interior": interior,
                       "first_rung_trials": {r: len(ladders[(method, r)]) for r in recipes}}
    return out
