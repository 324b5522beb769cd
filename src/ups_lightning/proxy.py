"""`python -m ups_lightning.proxy [budget_min.small=1] [budget_min.full=2] [configs=...]`: does the
small evaluation rank configurations the way the full one does?

The seeds' playbook promotes a configuration on the small protocol (`experiment=eval_small`) and
confirms it on the full one (`experiment=eval_full`). This command trains each configuration of
`conf/proxy.yaml` (at least 6) under both protocols with the same wall-clock budget per protocol
(autoencoder + operator, the plain rollout), evaluates every model on its protocol's *validation*
split (choices are never made on test) and reports the Spearman rank correlation between the two
columns, the small protocol's winner beside its full result, and the command that promotes it.
Configurations of the same model size share their autoencoder by reference (reuse_runs). Writes
`proxy.csv` and `proxy.md` into `out_dir`; the evaluations also go to `out_dir/leaderboard.csv`,
each row noted with its protocol and configuration, so small and full rows meet on one board.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import hydra
from omegaconf import MISSING, DictConfig, OmegaConf

from ups_lightning.atomic import atomic_write_text
from ups_lightning.config import compose_config
from ups_lightning.errors import UserError, report_user_errors, command
from ups_lightning.provenance import reset_scored
from ups_lightning.schema import setting, validate
from ups_lightning.stages.settings import BudgetShares
from ups_lightning.tables import format_cell, write_csv

log = logging.getLogger("ups_lightning.proxy")
PROTOCOLS = ("small", "full")


def ranks(values: Sequence[float]) -> List[float]:
    """Ranks 1..n, ties sharing their average rank (what Spearman's correlation needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman: two sequences of the same length >= 2 are needed")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else math.nan


@dataclass
class Protocols:
    small: str = MISSING       # conf/experiment option of each protocol
    full: str = MISSING


@dataclass
class Budgets:
    small: float = setting(0.0, low_ok=False)   # minutes per configuration (autoencoder + operator)
    full: float = setting(0.0, low_ok=False)


@dataclass
class ProxySettings:
    """conf/proxy.yaml: its keys, types and ranges (ups_lightning.schema)."""

    experiments: Protocols = field(default_factory=Protocols)
    budget_min: Budgets = field(default_factory=Budgets)
    shares: BudgetShares = field(default_factory=BudgetShares)
    configs: List[List[str]] = MISSING     # each a list of training overrides
    train_overrides: List[str] = MISSING
    out_dir: str = MISSING


def check_config(cfg: DictConfig) -> Dict[str, Any]:
    """The settings checked against ProxySettings; a bad one is "proxy setting key=value: ..."."""
    merged = validate(cfg, ProxySettings, "proxy", "conf/proxy.yaml")
    if len(merged.configs) < 2:
        raise UserError(f"proxy setting configs={list(merged.configs)!r}: expected a list of configurations, each a "
                        "list of training overrides (conf/proxy.yaml ships 6; a rank correlation needs at least 2).")
    if not all(merged.experiments[p].strip() for p in PROTOCOLS):
        raise UserError("proxy setting experiments: name the conf/experiment option of each protocol "
                        f"({', '.join(PROTOCOLS)}).")
    return {"configs": [[str(o) for o in c] for c in merged.configs],
            "budgets": {p: float(merged.budget_min[p]) for p in PROTOCOLS}}


def _train_and_validate(cfg: DictConfig, protocol: str, i: int, overrides: List[str], budget: float,
                        out: Path) -> Dict[str, Any]:
    from ups_lightning.evaluation import evaluate
    from ups_lightning.training import run as train

    run_dir = out / protocol / str(i)
    shares = cfg.shares
    tcfg = compose_config("train", [f"experiment={cfg.experiments[protocol]}", "stage=autoencoder_operator",
                                    f"run_dir={run_dir}", f"reuse_runs=['{out / protocol}/*']",
                                    "callbacks.progress_bar=none",
                                    *[f"stages.{k}.max_minutes={budget * shares[k]:.6g}" for k in shares],
                                    *cfg.train_overrides, *overrides])
    records = train(tcfg)
    ecfg = compose_config("evaluate", [f"run_dir={run_dir}", "ttc=off", "upto=operator", "split=val", "n_show=0",
                                       f"leaderboard={out / 'leaderboard.csv'}", f"html={out / 'leaderboard.html'}"])
    ecfg.note = f"proxy {protocol} config {i}: {' '.join(overrides) or '(defaults)'}"
    row = evaluate(ecfg)
    return {"val_nrmse": row["nrmse"], "run_dir": str(run_dir), "run_id": row["run_id"],
            "train_s": sum(float(r["wall_clock_s"]) for r in records.values()),
            "learned": all(r.get("learned") is not False for r in records.values())}


def run_proxy(cfg: DictConfig) -> Dict[str, Any]:
    checked = check_config(cfg)
    reset_scored()
    out = Path(cfg.out_dir)
    start = time.time()
    rows: List[Dict[str, Any]] = []
    for i, overrides in enumerate(checked["configs"]):
        row: Dict[str, Any] = {"config": i, "overrides": " ".join(overrides) or "(defaults)"}
        for p in PROTOCOLS:
            log.info("proxy: config %d (%s), %s protocol, %g min", i, row["overrides"], p, checked["budgets"][p])
            try:
                got = _train_and_validate(cfg, p, i, overrides, checked["budgets"][p], out)
            except UserError as exc:   # a diverged configuration is a result, not the end of the study
                log.warning("proxy: config %d failed under the %s protocol: %s", i, p, exc)
                got = {"val_nrmse": math.nan, "failed": str(exc)}
            row.update({f"{p}_{k}": v for k, v in got.items()})
        rows.append(row)
    ok = [r for r in rows if all(math.isfinite(r[f"{p}_val_nrmse"]) for p in PROTOCOLS)]
    correlation = spearman([r["small_val_nrmse"] for r in ok], [r["full_val_nrmse"] for r in ok]) if len(ok) >= 2 else math.nan
    for p in PROTOCOLS:
        for r, k in zip(ok, ranks([r[f"{p}_val_nrmse"] for r in ok])):
            r[f"{p}_rank"] = k
    summary = {"spearman": correlation, "n": len(ok), "rows": rows, "seconds": time.time() - start}
    _write(out, cfg, checked, summary)
    return summary


def _write(out: Path, cfg: DictConfig, checked: Dict[str, Any], s: Dict[str, Any]) -> None:
    from ups_lightning.provenance import git_commit, write_provenance

    write_provenance(out, "proxy", cfg, seeds=None, seconds=round(s["seconds"]))
    rows = s["rows"]
    write_csv(out / "proxy.csv", rows, ["config", "overrides", "small_val_nrmse", "full_val_nrmse", "small_rank",
                                        "full_rank"])
    b = checked["budgets"]
    md = [f"# Proxy fidelity: {cfg.experiments.small} against {cfg.experiments.full}", "",
          f"{len(rows)} configurations, each trained for {b['small']:g} min (small) and {b['full']:g} min (full), "
          f"autoencoder + operator; validation nRMSE of the plain rollout; git {git_commit()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {s['seconds'] / 60:.1f} min in all.", "",
          "| config | overrides | small val nRMSE | full val nRMSE | small rank | full rank |",
          "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['config']} | {r['overrides']} | {format_cell(r.get('small_val_nrmse'), '{:.4f}')} | "
                  f"{format_cell(r.get('full_val_nrmse'), '{:.4f}')} | {format_cell(r.get('small_rank'), '{:g}')} | "
                  f"{format_cell(r.get('full_rank'), '{:g}')} |")
    md += ["", f"**Spearman rank correlation (small vs full): {format_cell(s['spearman'], '{:.3f}')}** "
               f"over {s['n']} configurations that finished under both protocols."]
    ok = [r for r in rows if r.get("small_rank") is not None]
    if ok:
        small_best = min(ok, key=lambda r: r["small_val_nrmse"])
        full_best = min(ok, key=lambda r: r["full_val_nrmse"])
        promote = " ".join([command("ups_lightning.pipeline"), "full", *checked["configs"][small_best["config"]]])
        md += ["", f"- Small-protocol winner: config {small_best['config']} ({small_best['overrides']}); on the full "
                   f"protocol it ranks {small_best['full_rank']:g} of {len(ok)} (val nRMSE "
                   f"{small_best['full_val_nrmse']:.4f}; the full winner, config {full_best['config']}, "
                   f"{full_best['full_val_nrmse']:.4f}).",
               f"- Promote it (the full protocol, every stage, scored on test): `{promote}`"]
    atomic_write_text(out / "proxy.md", "\n".join(md) + "\n")
    print("\n".join(md))


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="proxy", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_proxy(cfg)


if __name__ == "__main__":
    main()
