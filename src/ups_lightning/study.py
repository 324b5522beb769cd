"""`python -m ups_lightning.study [sizes=[dim8,...]] [seeds=[0,1,2]] [epochs.operator=6]` (`make study`):
how far can test-time search stand in for model capacity? (issue 21, docs/STUDY.md)

A capacity sweep: every size of ``sizes`` trained ``len(seeds)`` times (autoencoder + operator, the plain
rollout's stages, on ``protocol``'s data) for the **same number of epochs** (``epochs``; no wall-clock
limit), so every size sees the same data equally often and a larger size spends more compute, which the
training-cost column and plot show. The operator saves its weights every ``snapshot_every`` epochs.

Rows, on the test split (each figure mean +- std over its member groups, among groups whose runs learned):

- ``plain``: each seed's guarded rollout (groups: the seeds);
- for each member kind (``members``: ``seeds``, b trained seeds, every b-subset a group; ``snapshots``, one
  run's final operator and its b-1 latest snapshots, each seed a group) and each search budget b:
  ``<kind>-<b> ttc`` (greedy search, its reward chosen on validation among ``rewards`` on the first
  group), and the same members without search, ``candidates_mean`` (their steps averaged at every step) and
  ``members_mean`` (their rollouts averaged); on validation also the oracle (the candidate nearest the
  truth: the headroom) and the share of it the chosen reward recovers;
- ``solver_hybrid``: each seed's rollout corrected by the consistency reward's coarse solve (blend weight
  chosen on validation among ``hybrid_weights``), and ``solver``: that coarse solver on its own.

Cost in every row: parameters held (all members; snapshots share one autoencoder), training wall-clock
summed over every model the row uses (one run for snapshot members), inference ms per trajectory
(batched). Verdict and claims follow the rules in :func:`verdict` and :func:`claims`.

Trained models of the same settings are reused (finished stages are skipped), so the study completes in
parts. Writes ``study.json``, ``study.csv``, ``study.md`` and ``study.png`` into ``out_dir``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import hydra
import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from ups_lightning.atomic import atomic_write_json, atomic_write_text
from ups_lightning.config import compose_config, model_overrides
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.provenance import reset_scored, scored
from ups_lightning.schema import setting, validate
from ups_lightning.tables import format_cell, write_csv

log = logging.getLogger("ups_lightning.study")

MEMBER_KINDS = ("seeds", "snapshots")


@dataclass
class Epochs:
    autoencoder: int = setting(1)    # the same for every size (docs/STUDY.md)
    operator: int = setting(1)


@dataclass
class StudySettings:
    """conf/study.yaml: its keys, types and ranges (ups_lightning.schema); check_config adds the
    rules between keys."""

    protocol: str = MISSING
    epochs: Epochs = field(default_factory=Epochs)
    snapshot_every: int = setting(1)
    sizes: List[str] = MISSING
    seeds: List[int] = MISSING
    members: List[str] = MISSING
    budgets: List[int] = MISSING
    rewards: List[str] = MISSING
    hybrid_weights: List[float] = MISSING
    n_test: Optional[int] = setting(1)
    eval_batch_size: int = setting(1)
    threads: Optional[int] = setting(1)
    train_overrides: List[str] = MISSING
    out_dir: str = MISSING
    report_only: bool = MISSING


def check_config(cfg: DictConfig) -> None:
    def fail(key: str, want: str) -> None:
        raise UserError(f"study setting {key}={OmegaConf.select(cfg, key)!r}: expected {want} (conf/study.yaml).")

    if not isinstance(cfg.get("report_only"), bool):    # the schema would read "yes" as true
        fail("report_only", "true or false")
    validate(cfg, StudySettings, "study", "conf/study.yaml")
    if not cfg.sizes or not all(isinstance(s, str) for s in cfg.sizes):
        fail("sizes", "a list of conf/model options, e.g. [dim8, dim16, dim32, dim64]")
    from ups_lightning.config import validate_train_config

    for size in cfg.sizes:   # every size is checked now, not when the sweep reaches it
        try:
            validate_train_config(compose_config("train", model_overrides(size)))
        except Exception as exc:
            fail("sizes", f"model sizes that compose (dim<N> with N >= 1, heads dividing N); {size!r} does "
                          f"not: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    if (not cfg.seeds or len(cfg.seeds) < 2 or len(set(cfg.seeds)) != len(cfg.seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.seeds)):
        fail("seeds", "a list of at least 2 distinct integer training seeds, e.g. [0, 1, 2]")
    if not cfg.members or not set(cfg.members) <= set(MEMBER_KINDS):
        fail("members", f"a list of member kinds among {list(MEMBER_KINDS)}")
    if not isinstance(cfg.snapshot_every, int) or isinstance(cfg.snapshot_every, bool) or cfg.snapshot_every < 1:
        fail("snapshot_every", "epochs between operator snapshots, an integer >= 1")
    most = len(cfg.seeds)
    if "snapshots" in cfg.members:   # the final operator and the snapshots before it
        most = min(most, cfg.epochs.operator // cfg.snapshot_every)
    if not cfg.budgets or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= most
                                  for b in cfg.budgets):
        fail("budgets", f"search budgets (candidates per step, one per member), integers in [2, {most}]: at most "
                        "one per seed and, with snapshot members, one per snapshot the operator's epochs leave")
    from ups_lightning.inference.rewards import REWARDS, parse_reward

    if not cfg.rewards:
        fail("rewards", "a list of rewards, e.g. [physics, 'consistency:32']")
    for r in cfg.rewards:
        name, _ = parse_reward(r)
        if name not in REWARDS or name == "verifier":
            fail("rewards", "physics or consistency:CELLS entries (the verifier is measured by bench.ttc_headroom)")
    if not any(parse_reward(r)[0] == "consistency" for r in cfg.rewards):
        fail("rewards", "at least one consistency:CELLS reward (its solver is the hybrid and solver rows' solver)")
    if not cfg.hybrid_weights or not all(isinstance(w, (int, float)) and 0 <= w <= 1 for w in cfg.hybrid_weights):
        fail("hybrid_weights", "blend weights in [0, 1] to choose the solver hybrid's among on validation")


# --- training ---------------------------------------------------------------------------------------
def _train(cfg: DictConfig, size: str, seed: int, out: Path) -> Dict[str, Any]:
    """One size and seed trained (or reused): its run directory, whether both stages beat their trivial
    references, and their summed training wall-clock."""
    from ups_lightning.training import run as train

    run_dir = out / "runs" / f"{size}-seed{seed}"
    stages = {s: f"stages.{s}" for s in ("autoencoder", "operator")}
    tcfg = compose_config("train", [f"experiment={cfg.protocol}", *model_overrides(size), f"seed={seed}",
                                    "stage=autoencoder_operator", f"run_dir={run_dir}", "callbacks.progress_bar=none",
                                    *[f"{k}.max_epochs={cfg.epochs[s]}" for s, k in stages.items()],
                                    *[f"{k}.max_minutes=null" for k in stages.values()],
                                    f"stages.operator.snapshot_every={cfg.snapshot_every}", *cfg.train_overrides])
    records = train(tcfg)
    return {"run_dir": run_dir, "seed": seed,
            "learned": all(records[s].get("learned") is not False for s in stages),
            "train_s": float(sum(records[s]["wall_clock_s"] for s in stages)),
            "epochs": {s: records[s]["epochs"] for s in stages}}


# --- evaluation -------------------------------------------------------------------------------------
class _Split:
    """One split's frames and physics, with every seed's model and its operator snapshots as surrogates
    (surs[k] = [seed k's model, its latest snapshot, the one before, ...])."""

    def __init__(self, runs: List[tuple], split: str, n: Optional[int], snapshots: int) -> None:
        from ups_lightning.evaluation import (build_surrogate, check_fits_model, eval_data, eval_member,
                                              file_physics, rollout_frames, snapshot_modules)
        from ups_lightning.inference.rollout import Guard

        train_cfg = runs[0][0]
        self.split = split
        member = eval_member(train_cfg, None)
        view = eval_data(member, None, split)
        self.physics = file_physics(view, member)
        guard = Guard(reencode=True, invariants=True)
        self.surs: List[List[Any]] = []
        for cfg_k, records_k, module_k, run_dir in runs:
            check_fits_model(view, cfg_k, module_k)
            mods = [module_k] + [m for _, m in snapshot_modules(run_dir, records_k, module_k)[:snapshots]]
            self.surs.append([build_surrogate(cfg_k, m, view, self.physics, guard) for m in mods])
        n_given = int(train_cfg.data.initial_step)
        fields = view.fields if n is None else view.fields[: int(n)]
        self.u0, self.truth = rollout_frames(fields, n_given)
        self.steps = self.truth.shape[1]
        t = np.asarray(view.meta.t, dtype=np.float64)
        self.t_rel = t[n_given - 1:] - t[n_given - 1]   # the solver's output times from the given frame

    def score(self, pred: torch.Tensor) -> float:
        from ups_lightning.eval.metrics import all_metrics

        p = self.physics
        scored(self.split)   # provenance.json counts every scoring
        return float(all_metrics(pred, self.truth, dx=p.dx, domain_length=p.domain_length, u0=self.u0)["nrmse"])


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], u0: torch.Tensor, batch: int) -> tuple:
    """(prediction, ms per trajectory) of ``fn`` over ``u0`` in batches of ``batch``."""
    start = time.perf_counter()
    out = torch.cat([fn(u0[i : i + batch]) for i in range(0, len(u0), batch)])
    return out, 1000.0 * (time.perf_counter() - start) / len(u0)


def _ttc(sp: _Split, members: Sequence[Any], reward: Any, batch: int) -> tuple:
    from ups_lightning.inference.candidates import Proposer
    from ups_lightning.inference.rollout import ttc_rollout
    from ups_lightning.inference.ttc import TTCConfig

    proposer, k = Proposer(list(members)), len(members)
    return _batched(lambda u: ttc_rollout(proposer, u, sp.steps, TTCConfig(n_candidates=k, beam_width=1), reward)[0],
                    sp.u0, batch)


def _oracle(sp: _Split, members: Sequence[Any]) -> float:
    """Validation nRMSE when each step keeps the candidate nearest the true next frame (reads the
    truth: the members' headroom, never a method); one batch, so the truth lines up with it."""
    from ups_lightning.bench.ttc_headroom import Oracle
    from ups_lightning.inference.candidates import Proposer
    from ups_lightning.inference.rollout import ttc_rollout
    from ups_lightning.inference.ttc import TTCConfig

    pred = ttc_rollout(Proposer(list(members)), sp.u0, sp.steps, TTCConfig(n_candidates=len(members), beam_width=1),
                       Oracle(sp.truth))[0]
    return sp.score(pred)


def _stats(values: Sequence[float]) -> Dict[str, float]:
    v = [float(x) for x in values]
    return {"nrmse": float(np.mean(v)) if v else math.nan,
            "nrmse_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def _row(size: str, method: str, kind: str, b: int, groups: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    """A row's figures over its member groups, counting only the groups whose runs all learned (all
    groups, flagged, when none did)."""
    learned = [g for g in groups if g["learned"]]
    use = learned or groups
    return {"size": size, "method": method, "members": kind, "budget": b, **_stats([g["nrmse"] for g in use]),
            "groups": len(groups), "groups_learned": len(learned), "learned": bool(learned),
            # each group's figure and runs, in the order every row of this member kind and budget shares
            "per_group": [g["nrmse"] for g in use], "group_runs": [list(g["runs"]) for g in use],
            "params_held": float(np.mean([g["params"] for g in use])),
            "train_s": float(np.mean([g["train_s"] for g in use])),
            "ms_per_traj": float(np.mean([g["ms"] for g in use])), **extra}


class _Size:
    """Every measurement of one size (module doc), test scored once per row and group."""

    def __init__(self, cfg: DictConfig, size: str, trained: List[Dict[str, Any]]) -> None:
        from ups_lightning.evaluation import load_run

        runs = [(*load_run(t["run_dir"]), t["run_dir"]) for t in trained]
        module = runs[0][2]
        self.ae = sum(p.numel() for p in module.autoencoder.parameters())
        self.op = sum(p.numel() for p in module.operator.parameters())
        snaps = max(cfg.budgets) - 1 if "snapshots" in cfg.members else 0
        self.val = _Split(runs, "val", None, snaps)
        self.test = _Split(runs, "test", cfg.n_test, snaps)
        self.cfg, self.size, self.trained, self.batch = cfg, size, trained, int(cfg.eval_batch_size)
        self.rows: List[Dict[str, Any]] = []

    def _member_groups(self, kind: str, b: int) -> List[tuple]:
        """[(seed indices whose runs it uses, (seed, model) pairs of its members)] of a member kind."""
        n = len(self.trained)
        if kind == "seeds":
            return [(combo, [(k, 0) for k in combo]) for combo in itertools.combinations(range(n), b)]
        return [((k,), [(k, j) for j in range(b)]) for k in range(n)
                if len(self.test.surs[k]) >= b]   # a run whose snapshots are too few is left out

    def _group(self, runs: Sequence[int], nrmse: float, ms: float, n_ops: int) -> Dict[str, Any]:
        return {"nrmse": nrmse, "ms": ms, "learned": all(self.trained[k]["learned"] for k in runs), "runs": tuple(runs),
                "params": len(runs) * self.ae + n_ops * self.op,
                "train_s": sum(self.trained[k]["train_s"] for k in runs)}

    def run(self, solvers: Dict[int, Dict[str, Any]]) -> List[Dict[str, Any]]:
        from ups_lightning.inference.baselines import (candidates_mean_rollout, choose_weight, solver_hybrid_rollout)
        from ups_lightning.inference.candidates import Proposer
        from ups_lightning.inference.rewards import make_reward, parse_reward
        from ups_lightning.inference.rollout import rollout

        cfg, B, te, va = self.cfg, self.batch, self.test, self.val
        plain: Dict[tuple, tuple] = {}   # (seed, model) -> (test prediction, ms): reused by members_mean

        def plain_test(k: int, j: int) -> tuple:
            if (k, j) not in plain:
                plain[k, j] = _batched(lambda u: rollout(te.surs[k][j], u, te.steps), te.u0, B)
            return plain[k, j]

        groups = [self._group([k], te.score(plain_test(k, 0)[0]), plain_test(k, 0)[1], 1)
                  for k in range(len(self.trained))]
        val_plain = [va.score(rollout(va.surs[k][0], va.u0, va.steps)) for k in range(len(self.trained))]
        self.rows.append(_row(self.size, "plain", "", 1, groups, val_nrmse=float(np.mean(val_plain))))
        log.info("study: %s plain test nRMSE %.4f +- %.4f", self.size, self.rows[-1]["nrmse"], self.rows[-1]["nrmse_std"])

        rewards = {r: make_reward(parse_reward(r)[0], te.physics, cells=parse_reward(r)[1]) for r in cfg.rewards}
        val_rewards = {r: make_reward(parse_reward(r)[0], va.physics, cells=parse_reward(r)[1]) for r in cfg.rewards}
        for kind in cfg.members:
            for b in cfg.budgets:
                member_groups = self._member_groups(kind, b)
                if not member_groups:
                    continue
                first = [va.surs[k][j] for k, j in member_groups[0][1]]
                val_by = {r: va.score(_ttc(va, first, val_rewards[r], B)[0]) for r in cfg.rewards}   # choose on val
                chosen = min(val_by, key=lambda r: val_by[r] if math.isfinite(val_by[r]) else math.inf)
                oracle = _oracle(va, first)
                first_plain = val_plain[member_groups[0][0][0]]
                head = first_plain - oracle
                recovered = (first_plain - val_by[chosen]) / head if head > 0 else math.nan
                n_ops = 1 if kind == "seeds" else b
                ttc, cmean, mmean = [], [], []
                for runs, pairs in member_groups:   # ... test scored once per group
                    members = [te.surs[k][j] for k, j in pairs]
                    n_models = len(runs) if kind == "seeds" else 1
                    pred, ms = _ttc(te, members, rewards[chosen], B)
                    ttc.append(self._group(runs, te.score(pred), ms, n_ops * n_models))
                    pred, ms = _batched(lambda u: candidates_mean_rollout(Proposer(members), u, te.steps, b), te.u0, B)
                    cmean.append(self._group(runs, te.score(pred), ms, n_ops * n_models))
                    preds = [plain_test(k, j) for k, j in pairs]
                    mmean.append(self._group(runs, te.score(torch.stack([p for p, _ in preds]).mean(0)),
                                             sum(ms for _, ms in preds), n_ops * n_models))
                tag = f"{kind}-{b}"
                self.rows.append(_row(self.size, "ttc", kind, b, ttc, reward=chosen, val_nrmse=val_by[chosen],
                                      val_by_reward={r: round(v, 4) for r, v in val_by.items()},
                                      val_oracle=oracle, val_plain=first_plain, recovered=recovered))
                self.rows.append(_row(self.size, "candidates_mean", kind, b, cmean))
                self.rows.append(_row(self.size, "members_mean", kind, b, mmean))
                log.info("study: %s %s TTC (%s, chosen on val) test nRMSE %.4f +- %.4f; val headroom %.4f -> "
                         "oracle %.4f, %.0f%% recovered", self.size, tag, chosen, self.rows[-3]["nrmse"],
                         self.rows[-3]["nrmse_std"], first_plain, oracle, 100 * recovered)

        # the consistency reward's solver: beside the model as a hybrid, and on its own
        spec = next(r for r in cfg.rewards if parse_reward(r)[0] == "consistency")
        reward, val_reward = rewards[spec], val_rewards[spec]
        cells = reward.solver_cells
        k0 = next((k for k, t in enumerate(self.trained) if t["learned"]), 0)
        weight, by_weight = choose_weight(lambda w: va.score(solver_hybrid_rollout(
            va.surs[k0][0], va.u0, va.steps, val_reward.solve, cells, w)), list(cfg.hybrid_weights))
        hybrid = []
        for k in range(len(self.trained)):
            pred, ms = _batched(lambda u: solver_hybrid_rollout(te.surs[k][0], u, te.steps, reward.solve, cells, weight),
                                te.u0, B)
            hybrid.append(self._group([k], te.score(pred), ms, 1))
        self.rows.append(_row(self.size, "solver_hybrid", "", 1, hybrid, weight=weight,
                              val_by_weight={str(w): round(v, 4) for w, v in by_weight.items()}))
        if cells not in solvers:
            solvers[cells] = _solver_alone(te, cells)
        return self.rows


def _solver_alone(sp: _Split, cells: int) -> Dict[str, Any]:
    from ups_lightning.pdes.coarse import solve_on_grid

    p = sp.physics
    sol, wall = solve_on_grid(sp.u0.double().numpy(), cells, p.pde, p.params, sp.t_rel, p.domain_length)
    return {"size": f"solver {cells} cells", "method": "solver", "members": "", "budget": 0,
            "nrmse": sp.score(torch.from_numpy(sol).float()), "nrmse_std": 0.0, "groups": 1, "groups_learned": 1,
            "learned": True, "params_held": 0.0, "train_s": 0.0, "ms_per_traj": 1000.0 * wall / len(sp.u0)}


def run_study(cfg: DictConfig) -> Dict[str, Any]:
    check_config(cfg)
    reset_scored()      # this run's scorings only (provenance.json): none with report_only
    if cfg.report_only:
        return rewrite_report(cfg)
    from ups_lightning.runtime import configure_cpu

    threads = configure_cpu(cfg.threads, "threads")   # the idle cores now, as training picks them
    out = Path(cfg.out_dir)
    start = time.time()
    rows: List[Dict[str, Any]] = []
    solvers: Dict[int, Dict[str, Any]] = {}
    trained_all: Dict[str, List[Dict[str, Any]]] = {}
    for size in cfg.sizes:
        trained = []
        for seed in cfg.seeds:
            log.info("study: training %s seed %d (%d + %d epochs), %.0f s into the study", size, seed,
                     cfg.epochs.autoencoder, cfg.epochs.operator, time.time() - start)
            trained.append(_train(cfg, size, int(seed), out))
        trained_all[size] = trained
        torch.set_num_threads(threads)   # training may have changed it; every figure is timed alike
        rows.extend(_Size(cfg, size, trained).run(solvers))
    rows.extend(solvers[c] for c in sorted(solvers))
    for r in rows:
        r["single_params"] = _single_params(rows, r)
    summary = {"rows": rows, "seconds": time.time() - start, "threads": threads,
               "trained": {s: [{**t, "run_dir": str(t["run_dir"])} for t in ts] for s, ts in trained_all.items()},
               "test_scored": "once per row and member group (choices on the validation split)"}
    summary["verdict"] = verdict(rows)
    summary["claims"] = claims(rows)
    _write(out, cfg, summary)
    return summary


def rewrite_report(cfg: DictConfig) -> Dict[str, Any]:
    """``report_only=true``: the verdict, claims and reports of ``out_dir/study.json`` recomputed from its
    rows (after a change to the rules or the report), training and scoring nothing."""
    import json

    path = Path(cfg.out_dir) / "study.json"
    try:
        saved = json.loads(path.read_text())
        rows = saved["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"report_only=true reads {path}, the study's own results: {exc}. Run the study first "
                        "(without report_only).") from None
    summary = {k: saved[k] for k in ("rows", "seconds", "threads", "trained", "test_scored") if k in saved}
    summary["verdict"], summary["claims"] = verdict(rows), claims(rows)
    summary["report_from"] = {"git_commit": saved.get("git_commit"), "settings": saved.get("settings")}
    _write(Path(cfg.out_dir), OmegaConf.merge(cfg, {k: v for k, v in (saved.get("settings") or {}).items()
                                                    if k in ("protocol", "epochs", "seeds")}), summary)
    return summary


def _single_params(rows: List[Dict[str, Any]], r: Dict[str, Any]) -> float:
    plain = next((p for p in rows if p["method"] == "plain" and p["size"] == r["size"]), None)
    return plain["params_held"] if plain else 0.0


# --- the rules ---------------------------------------------------------------------------------------
def below(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """a's nRMSE is below b's by more than their error bars (mean + std of a under mean - std of b)."""
    sa = a["nrmse_std"] if math.isfinite(a.get("nrmse_std", math.nan)) else 0.0
    sb = b["nrmse_std"] if math.isfinite(b.get("nrmse_std", math.nan)) else 0.0
    return a["nrmse"] + sa < b["nrmse"] - sb


def beats(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """a beats b by more than the noise. Rows over the same member groups are compared pairwise (the
    mean of a - b over the groups plus its std is below 0: the same members with and without search);
    other rows by their error bars (:func:`below`)."""
    pa, pb = a.get("per_group"), b.get("per_group")
    if pa and pb and len(pa) == len(pb) >= 2 and a.get("group_runs") == b.get("group_runs"):
        d = np.asarray(pa) - np.asarray(pb)
        return float(d.mean() + d.std(ddof=1)) < 0.0
    return below(a, b)


def _rivals(rows: List[Dict[str, Any]], t: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows a search row must beat to be credited (issue 21's rule): the same members without
    search (their steps' mean and their rollouts' mean) and the reward's solver on its own."""
    same = [r for r in rows if r["size"] == t["size"] and r["members"] == t["members"] and r["budget"] == t["budget"]
            and r["method"] in ("candidates_mean", "members_mean")]
    return same + [r for r in rows if r["method"] == "solver"]


def _hybrid(rows: List[Dict[str, Any]], size: str) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if r["method"] == "solver_hybrid" and r["size"] == size), None)


def credited(rows: List[Dict[str, Any]], t: Dict[str, Any]) -> bool:
    """A search row counts only if its models learned, it has at least two member groups (an error
    bar), and it beats every rival (:func:`_rivals`, :func:`beats`): a search that only matches its
    members' mean is not credited."""
    rivals = _rivals(rows, t)
    return (t["method"] == "ttc" and t["learned"] and t.get("groups_learned", 0) >= 2 and bool(rivals)
            and all(beats(t, r) for r in rivals))


def beyond_baselines(rows: List[Dict[str, Any]], t: Dict[str, Any]) -> float:
    """The search's nRMSE gain beyond the best of every baseline, the solver hybrid included (the figure
    docs/TTC.md credits a search with): > 0 only if it beats them all."""
    h = _hybrid(rows, t["size"])
    return min(r["nrmse"] for r in _rivals(rows, t) + ([h] if h else [])) - t["nrmse"]


def _plains(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return sorted((r for r in rows if r["method"] == "plain"), key=lambda r: r["params_held"])


def verdict(rows: List[Dict[str, Any]]) -> str:
    """Does a smaller model with a credited search beat a larger plain model that learned, by more than
    the error bars, at no more inference cost? Rows whose models did not learn are never compared."""
    plains = _plains(rows)
    skipped = [p["size"] for p in plains if not p["learned"]]
    note = f" Not compared (no seed learned): {', '.join(skipped)}." if skipped else ""
    searches = [t for t in rows if t["method"] == "ttc"]
    counted = [t for t in searches if credited(rows, t)]
    found = [f"{t['size']} {t['members']}-{t['budget']} search ({_pm(t)}, {t['ms_per_traj']:.1f} ms) beats {p['size']} "
             f"plain ({_pm(p)}, {p['ms_per_traj']:.1f} ms)"
             for t in counted for p in plains
             if p["learned"] and p["params_held"] > t["single_params"] and t["ms_per_traj"] <= p["ms_per_traj"]
             and below(t, p)]
    over_hybrid = [t for t in counted if (h := _hybrid(rows, t["size"])) is not None and below(t, h)]
    head = (f"{len(counted)} of {len(searches)} search rows are credited (beat their members' step mean and "
            "rollout mean, paired over at least two member groups, and the reward's solver alone); "
            f"{len(over_hybrid)} of them also beat the solver hybrid, which needs no search.")
    if not found:
        return (f"**Verdict:** {head} No smaller model with a credited search beats a larger plain model that "
                "learned, at equal or lower inference cost." + note)
    return f"**Verdict:** {head} Search stands in for capacity here: " + "; ".join(found) + "." + note


def _best_search(rows: List[Dict[str, Any]], size: str, only_credited: bool = True) -> Optional[Dict[str, Any]]:
    ts = [t for t in rows if t["method"] == "ttc" and t["size"] == size and t["learned"]
          and (credited(rows, t) or not only_credited)]
    return min(ts, key=lambda t: t["nrmse"]) if ts else None


def _plain(rows: List[Dict[str, Any]], size: str) -> Optional[Dict[str, Any]]:
    return next((p for p in _plains(rows) if p["size"] == size and p["learned"]), None)


def _credit(rows: List[Dict[str, Any]], t: Dict[str, Any]) -> float:
    """The search's nRMSE gain beyond the best of its rivals, relative to its size's plain figure."""
    best = min(r["nrmse"] for r in _rivals(rows, t))
    p = _plain(rows, t["size"])
    return (best - t["nrmse"]) / p["nrmse"] if p else math.nan


def claims(rows: List[Dict[str, Any]], small: str = "dim32", large: str = "dim64") -> List[Dict[str, Any]]:
    """The seeds' four claims, each {claim, figures, holds (True/False/None: not testable here)}."""
    out = []
    t32, p64 = _best_search(rows, small), _plain(rows, large)
    if t32 is None or p64 is None:
        out.append({"claim": f"a {small[3:]}-dim model with TTC beats a {large[3:]}-dim model without it",
                    "figures": f"{'no credited search at ' + small if t32 is None else ''}"
                               f"{'; ' if t32 is None and p64 is None else ''}{'' if p64 else large + ' plain did not learn'}",
                    "holds": False if p64 is not None else None})
    else:
        out.append({"claim": f"a {small[3:]}-dim model with TTC beats a {large[3:]}-dim model without it",
                    "figures": f"{small} {t32['members']}-{t32['budget']} search {_pm(t32)} vs {large} plain {_pm(p64)}",
                    "holds": below(t32, p64)})

    sizes = [p["size"] for p in _plains(rows) if p["learned"]]
    best = {s: _best_search(rows, s, only_credited=False) for s in sizes}
    gains = {s: _credit(rows, t) for s, t in best.items() if t is not None}
    ordered = [gains[s] for s in sizes if s in gains]
    out.append({"claim": "smaller models gain more from TTC than larger ones",
                "figures": ", ".join(f"{s} {100 * g:+.1f}%" for s, g in gains.items()) +
                           " (best search's nRMSE gain beyond its members without search and the solver alone, "
                           "relative to plain)",
                "holds": (len(ordered) >= 2 and all(a > b for a, b in zip(ordered, ordered[1:]))) if ordered else None})

    p32, s32, s64 = _plain(rows, small), best.get(small), best.get(large)
    if p32 and p64 and s32 and s64:
        cap_plain, cap_ttc = below(p64, p32), below(s64, s32)
        why = "" if cap_plain else (f" ({large} plain is not below {small} plain by more than the seeds' error "
                                      "bars: no capacity gain to disappear)")
        out.append({"claim": f"capacity gains disappear once TTC is on ({small[3:]} -> {large[3:]} with TTC)",
                    "figures": f"plain {_pm(p32)} -> {_pm(p64)}; best search {_pm(s32)} -> {_pm(s64)}" + why,
                    "holds": (cap_plain and not cap_ttc) if cap_plain else None})
    else:
        out.append({"claim": f"capacity gains disappear once TTC is on ({small[3:]} -> {large[3:]} with TTC)",
                    "figures": "a size did not learn or has no search row", "holds": None})

    pairs = []   # (smaller size's best credited search or None, larger plain, match?) for 4x parameter ratios
    for lo in sizes:
        t, p_lo = _best_search(rows, lo), _plain(rows, lo)
        for hi in sizes:
            p = _plain(rows, hi)
            if p_lo and p and p["params_held"] >= 4 * p_lo["params_held"]:
                pairs.append((t, p, t is not None and t["nrmse"] - t["nrmse_std"] <= p["nrmse"] + p["nrmse_std"]
                              and t["ms_per_traj"] < p["ms_per_traj"]))
    hit = next((x for x in pairs if x[2]), next((x for x in pairs if x[0] is not None), None))
    if hit:
        figures = (f"{hit[0]['size']} {hit[0]['members']}-{hit[0]['budget']} search {_pm(hit[0])} at "
                   f"{hit[0]['ms_per_traj']:.1f} ms vs {hit[1]['size']} plain {_pm(hit[1])} at {hit[1]['ms_per_traj']:.1f} ms")
    elif pairs:
        larger = sorted({x[1]["size"] for x in pairs})
        figures = ("no credited search at a size with a quarter of the parameters of a larger learned size "
                   f"({', '.join(larger)}) or fewer")
    else:
        figures = "no two learned sizes 4x apart in parameters"
    out.append({"claim": "TTC lets a model 4x smaller match a larger one at lower inference cost",
                "figures": figures, "holds": any(x[2] for x in pairs) if pairs else None})
    return out


# --- reports ----------------------------------------------------------------------------------------
def _f4(v: Any) -> str:
    return format_cell(v, "{:.4f}")


def _pm(r: Dict[str, Any]) -> str:
    return _f4(r["nrmse"]) + (f" ± {_f4(r['nrmse_std'])}" if r.get("nrmse_std") else "")


COLUMNS = ("size", "method", "members", "budget", "params_held", "train_s", "ms_per_traj", "nrmse", "nrmse_std",
           "groups", "groups_learned", "val_nrmse", "val_oracle", "recovered", "reward", "weight")


def _write(out: Path, cfg: DictConfig, s: Dict[str, Any]) -> None:
    from ups_lightning.provenance import git_commit, write_provenance

    out.mkdir(parents=True, exist_ok=True)
    if cfg.report_only:   # nothing scored now: the scoring run's provenance is kept inside the new one
        old = out / "provenance.json"
        earlier = json.loads(old.read_text()) if old.is_file() else None
        write_provenance(out, "study (report_only)", cfg, seeds=list(cfg.seeds), report_of=earlier)
    else:
        write_provenance(out, "study", cfg, seeds=list(cfg.seeds))
    rows = s["rows"]
    write_csv(out / "study.csv", [{k: r.get(k) for k in COLUMNS} for r in rows], COLUMNS)
    atomic_write_json(out / "study.json", {"settings": OmegaConf.to_container(cfg), "git_commit": git_commit(), **s})
    lines = [f"# Capacity x TTC study: {cfg.protocol}, {cfg.epochs.autoencoder} + {cfg.epochs.operator} epochs per "
             f"model (autoencoder + operator), seeds {list(cfg.seeds)}; git {git_commit()}"
             f"{' (report rewritten; scored at git ' + str(s['report_from']['git_commit']) + ')' if 'report_from' in s else ''}; "
             f"{time.strftime('%Y-%m-%d %H:%M')}; {s['threads']} torch threads; {s['seconds']:.0f} s in all", "",
             "Test split, scored once per row and member group; every choice (reward, blend weight) on the "
             "validation split. nRMSE: mean ± std over the row's member groups whose runs learned (groups column: "
             "learned of all). members: seeds-b = b trained seeds (every b-subset), snapshots-b = one run's "
             "final operator and its b-1 latest snapshots (each seed). ttc: greedy search; candidates_mean and "
             "members_mean: the same members without search; val oracle: the candidate nearest the truth at "
             "each step (the headroom), recovered: the share of it the chosen reward recovers on validation.", "",
             "| size | method | members | params held | train s | ms/traj | nRMSE | beyond baselines | groups | val nRMSE | val oracle | recovered | reward / weight |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        members = f"{r['members']}-{r['budget']}" if r["members"] else ""
        rec = f"{100 * r['recovered']:.0f}%" if math.isfinite(r.get("recovered", math.nan)) else ""
        choice = r.get("reward") or (f"w={r['weight']:g}" if "weight" in r else "")
        beyond = f"{beyond_baselines(rows, r):+.4f}" if r["method"] == "ttc" else ""
        lines.append(f"| {r['size']} | {r['method']}{' ✓' if credited(rows, r) else ''} | {members} | "
                     f"{r['params_held']:,.0f} | {r['train_s']:.0f} | {r['ms_per_traj']:.2f} | {_pm(r)} | {beyond} | "
                     f"{r['groups_learned']} of {r['groups']} | {_f4(r.get('val_nrmse', math.nan))} | "
                     f"{_f4(r.get('val_oracle', math.nan))} | {rec} | {choice} |")
    lines += ["", "✓: a search credited by the verdict's rule (study.credited: it beats its members' step mean and "
              "rollout mean, paired over its member groups, and the solver alone). beyond baselines: the best of "
              "those and the solver hybrid minus the search (docs/TTC.md's credit; > 0 only if it beats them all).",
              "", s["verdict"], "",
              "| claim | measured | holds |", "|---|---|---|"]
    for c in s["claims"]:
        holds = {True: "yes", False: "no", None: "not testable"}[c["holds"]]
        lines.append(f"| {c['claim']} | {c['figures']} | {holds} |")
    lines += ["", "![nRMSE against inference cost and training cost](study.png)", ""]
    atomic_write_text(out / "study.md", "\n".join(lines))
    _plot(out / "study.png", rows)
    print("\n".join(lines))


def _plot(path: Path, rows: List[Dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    series = sorted({(r["method"], r["members"], r["budget"]) for r in rows if r["method"] != "solver"},
                    key=lambda m: (m[0] != "plain", m[0] != "ttc", m))
    for method, kind, b in series:
        rs = [r for r in rows if (r["method"], r["members"], r["budget"]) == (method, kind, b)]
        label = method if not kind else f"{method}, {kind}-{b}"
        style = "-" if method in ("plain", "ttc") else ":"
        for ax, xk in zip(axes, ("ms_per_traj", "train_s")):
            line = ax.errorbar([r[xk] for r in rs], [r["nrmse"] for r in rs], yerr=[r["nrmse_std"] for r in rs],
                               marker="o", capsize=3, linestyle=style, label=label, alpha=1.0 if style == "-" else 0.6)
            for r in rs:
                if not r["learned"]:
                    ax.scatter([r[xk]], [r["nrmse"]], marker="s", facecolors="none", edgecolors="r", s=80)
            if method == "plain":
                for r in rs:
                    ax.annotate(r["size"], (r[xk], r["nrmse"]), fontsize=7, xytext=(3, 3), textcoords="offset points",
                                color=line[0].get_color())
    for r in (r for r in rows if r["method"] == "solver"):
        axes[0].scatter([r["ms_per_traj"]], [r["nrmse"]], marker="x", color="k", zorder=5)
        axes[0].annotate(r["size"], (r["ms_per_traj"], r["nrmse"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for ax, xl in zip(axes, ("inference ms per trajectory (batched)", "training wall-clock, s (summed over the models used)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("test nRMSE")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Can test-time search stand in for capacity? (error bars: std over member groups; red square: not learned)")
    fig.tight_layout()
    from ups_lightning.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="study", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_study(cfg)


if __name__ == "__main__":
    main()
