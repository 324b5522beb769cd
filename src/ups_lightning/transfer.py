"""`python -m ups_lightning.transfer [fractions=[0.1,0.3,1.0]] [seeds=[0,1]]` (`make transfer`): does
pretraining on other equations pay on an equation the model never saw? (issue 25, docs/TRANSFER.md)

1. **Pretrain** the plain rollout's stages (autoencoder + operator) once on ``pretrain``, a mixed data
   config of other equations, under ``protocol``'s stage limits.
2. For each fraction f of ``target``'s training split and each seed, train the same stages on the first
   round(f * n_train) training trajectories of ``target`` twice, under the same limits (the same
   fine-tuning budget): **from scratch**, and **fine-tuned** (``init_from`` the pretrained run: every
   tensor whose name and shape match starts there; the conditioning layers, sized for other equations,
   start fresh).
3. Score each once on ``target``'s test split (the guarded plain rollout). Pretrained beats scratch at a
   fraction only when its mean is below by more than two standard errors of the difference.

Finished stages are reused (their config hashes), so it completes in parts; a finished run's test
figures are read back (``scores.json``, by checkpoint), never scored twice. Writes transfer.json,
transfer.csv, transfer.md and transfer.png (the data-efficiency curve) into ``out_dir``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from omegaconf import MISSING, DictConfig, OmegaConf

from ups_lightning.atomic import atomic_write_json, atomic_write_text
from ups_lightning.config import compose_config, model_overrides
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.provenance import reset_scored, write_provenance
from ups_lightning.schema import setting, validate
from ups_lightning.tables import write_csv

log = logging.getLogger("ups_lightning.transfer")

STAGES = ("autoencoder", "operator")   # the plain rollout's stages
ARMS = ("scratch", "pretrained")


@dataclass
class TransferSettings:
    """conf/transfer.yaml: its keys, types and ranges (ups_lightning.schema)."""

    protocol: str = MISSING
    pretrain: str = MISSING
    target: str = MISSING
    model: str = MISSING
    fractions: List[float] = MISSING
    seeds: List[int] = MISSING
    pretrain_seed: int = setting(0)
    eval_batch_size: int = setting(1)
    threads: Optional[int] = setting(1)
    train_overrides: List[str] = MISSING
    out_dir: str = MISSING


def check_config(cfg: DictConfig) -> DictConfig:
    def fail(key: str, want: str) -> None:
        raise UserError(f"transfer setting {key}={OmegaConf.select(cfg, key)!r}: expected {want} (conf/transfer.yaml).")

    cfg = validate(cfg, TransferSettings, "transfer", "conf/transfer.yaml")
    if not cfg.fractions or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in cfg.fractions):
        fail("fractions", "fractions of the target's training split in (0, 1], e.g. [0.1, 0.3, 1.0]")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        fail("seeds", "distinct integer training seeds, e.g. [0, 1]")
    pre, tgt = (compose_config("train", [f"data={cfg[k]}"]).data for k in ("pretrain", "target"))
    if not pre.get("members"):
        fail("pretrain", "a mixed data config (pde: mixed) of the equations to pretrain on")
    seen = sorted(m.pde for m in pre.members.values())
    if tgt.pde == "mixed" or tgt.pde in seen:
        fail("target", f"one data config of an equation the pretraining mixture ({', '.join(seen)}) does "
                       "not hold: the point is an equation the model never saw")
    return cfg


def _train(cfg: DictConfig, run_dir: Path, data: List[str], seed: int, init: Optional[Path] = None) -> Dict[str, Any]:
    """One run of the plain rollout's stages (trained or reused): its directory and figures."""
    from ups_lightning.data.datamodule import member_configs
    from ups_lightning.training import run as train

    tcfg = compose_config("train", [f"experiment={cfg.protocol}", *model_overrides(cfg.model), *data,
                                    f"seed={seed}", "stage=autoencoder_operator", f"run_dir={run_dir}",
                                    "callbacks.progress_bar=none", *([f"init_from={init}"] if init else []),
                                    *cfg.train_overrides])
    records = train(tcfg)
    n_train = sum(int(m.n_train) for m in member_configs(tcfg.data).values())   # a mixed config: its members'
    return {"run_dir": str(run_dir), "seed": seed, "n_train": n_train,
            "learned": all(records[s].get("learned") is not False for s in STAGES),
            "train_s": round(sum(records[s]["wall_clock_s"] + records[s].get("prep_s", 0.0) for s in STAGES), 1),
            "val_nrmse": records["operator"]["best_val_nrmse"], "ckpt_sha256": records["operator"].get("ckpt_sha256"),
            "fresh": {s: (records[s].get("init_from") or {}).get("fresh", []) for s in STAGES} if init else None}


SCORES = "scores.json"   # each run's test figures, by its operator checkpoint: a rerun does not score test again


def _scored(cfg: DictConfig, run: Dict[str, Any]) -> Dict[str, Any]:
    """The run's test figures: scored once per checkpoint (a rerun of the study, e.g. one that
    completes an interrupted sitting, reads them back from ``scores.json`` instead of scoring test again)."""
    path = Path(cfg.out_dir) / SCORES
    known = json.loads(path.read_text()) if path.is_file() else {}
    old = known.get(run["run_dir"])
    if old and run.get("ckpt_sha256") and old.get("ckpt_sha256") == run["ckpt_sha256"]:
        return {**old["scores"], "reused_score": True}
    scores = _score(cfg, run["run_dir"])
    known[run["run_dir"]] = {"ckpt_sha256": run.get("ckpt_sha256"), "scores": scores,
                             "scored_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    atomic_write_json(path, known)
    return {**scores, "reused_score": False}


def _score(cfg: DictConfig, run_dir: str) -> Dict[str, Any]:
    from ups_lightning.evaluation import evaluate

    out = Path(cfg.out_dir)
    ecfg = compose_config("evaluate", [f"run_dir={run_dir}", "ttc=off", "upto=operator", "split=test",
                                       f"leaderboard={out / 'leaderboard.csv'}", f"html={out / 'leaderboard.html'}",
                                       f"batch_size={cfg.eval_batch_size}", "note=transfer"])
    if cfg.threads:
        ecfg.num_threads = cfg.threads
    row = evaluate(ecfg)
    return {"nrmse": row["nrmse"], "nrmse_pdebench": row["nrmse_pdebench"], "persistence_nrmse": row["persistence_nrmse"]}


def _mean_se(values: List[float]) -> tuple:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, sd / math.sqrt(len(v)) if len(v) > 1 else math.nan


def summarise(runs: List[Dict[str, Any]], fractions: List[float]) -> List[Dict[str, Any]]:
    """One row per fraction: each arm's mean and standard error over seeds, and the verdict (a win needs
    a gap beyond 2 SE of the difference; one seed per arm decides nothing)."""
    rows = []
    for f in fractions:
        row: Dict[str, Any] = {"fraction": f}
        for arm in ARMS:
            rs = [r for r in runs if r["fraction"] == f and r["arm"] == arm]
            row[f"{arm}_nrmse"], row[f"{arm}_se"] = _mean_se([r["nrmse"] for r in rs])
            row[f"{arm}_n"] = len(rs)
            row["n_train"] = rs[0]["n_train"] if rs else None
        gap = row["scratch_nrmse"] - row["pretrained_nrmse"]
        se = math.sqrt(row["scratch_se"] ** 2 + row["pretrained_se"] ** 2)
        row["gap"], row["two_se"] = gap, 2 * se
        row["verdict"] = ("not decided (one seed per arm)" if not math.isfinite(se) else
                          "pretrained better" if gap > 2 * se else "scratch better" if -gap > 2 * se else
                          "no clear difference")
        rows.append(row)
    return rows


def run_transfer(cfg: DictConfig) -> Dict[str, Any]:
    cfg = check_config(cfg)
    reset_scored()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pre_dir = out / "runs" / f"pretrain-{cfg.pretrain}-seed{cfg.pretrain_seed}"
    log.info("transfer: pretraining on %s (%s)", cfg.pretrain, pre_dir)
    pre = _train(cfg, pre_dir, [f"data={cfg.pretrain}"], cfg.pretrain_seed)
    full = int(compose_config("train", [f"data={cfg.target}"]).data.n_train)
    runs: List[Dict[str, Any]] = []
    for f in cfg.fractions:
        n = max(1, round(f * full))
        for seed in cfg.seeds:
            for arm in ARMS:
                run_dir = out / "runs" / f"{cfg.target}-{arm}-n{n}-seed{seed}"
                log.info("transfer: %s on %d of %d %s training trajectories, seed %d", arm, n, full, cfg.target, seed)
                r = _train(cfg, run_dir, [f"data={cfg.target}", f"data.n_train={n}"], seed,
                           init=pre_dir if arm == "pretrained" else None)
                r.update(arm=arm, fraction=f, **_scored(cfg, r))
                runs.append(r)
    rows = summarise(runs, list(cfg.fractions))
    result = {"command": "python -m ups_lightning.transfer", "settings": OmegaConf.to_container(cfg),
              "pretrain": pre, "runs": runs, "summary": rows, "seconds": round(time.time() - start)}
    atomic_write_json(out / "transfer.json", result)
    write_csv(out / "transfer.csv", runs)
    atomic_write_text(out / "transfer.md", report(result))
    plot(result, out / "transfer.png")
    write_provenance(out, "transfer", cfg, seeds=list(cfg.seeds), pretrain_seed=cfg.pretrain_seed)
    print(report(result))
    return result


def plot(result: Dict[str, Any], path: Path) -> Path:
    """The data-efficiency curve: test nRMSE against the target's training trajectories, both arms
    (mean, error bars one SE over seeds), beside persistence."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    s, rows = result["settings"], result["summary"]
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["n_train"] for r in rows]
    for arm, style in (("scratch", "o-"), ("pretrained", "s-")):
        ax.errorbar(xs, [r[f"{arm}_nrmse"] for r in rows], yerr=[r[f"{arm}_se"] for r in rows], fmt=style,
                    capsize=3, label=f"{arm} ({'from ' + s['pretrain'] if arm == 'pretrained' else 'random init'})")
    persistence = [r["persistence_nrmse"] for r in result["runs"] if math.isfinite(r.get("persistence_nrmse", math.nan))]
    if persistence:
        ax.axhline(persistence[0], ls="--", lw=1, color="grey", label="persistence")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())   # the log axis' own labels overlap the fractions'
    ax.set_xlabel(f"{s['target']} training trajectories")
    ax.set_ylabel("test nRMSE (guarded plain rollout)")
    ax.set_title(f"fine-tuned from {s['pretrain']} vs from scratch, {len(s['seeds'])} seeds", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def report(result: Dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Transfer: pretrained on {s['pretrain']}, fine-tuned on {s['target']} (never seen)", "",
             f"Model {s['model']}, stages {', '.join(STAGES)} under `experiment={s['protocol']}`'s limits for every "
             f"run (pretraining {result['pretrain']['train_s']:.0f} s, not counted in the fine-tuning budget); test "
             f"nRMSE of the guarded plain rollout, mean ± SE over seeds {s['seeds']}; {result['seconds']} s in all.", "",
             "| fraction | training trajectories | scratch | pretrained | gap (scratch − pretrained) | 2 SE | verdict |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['fraction']:g} | {r['n_train']} | {r['scratch_nrmse']:.4f} ± {r['scratch_se']:.4f} | "
                     f"{r['pretrained_nrmse']:.4f} ± {r['pretrained_se']:.4f} | {r['gap']:+.4f} | {r['two_se']:.4f} | "
                     f"{r['verdict']} |")
    fresh = {k: v for k, v in (result["runs"][-1].get("fresh") or {}).items() if v} if result["runs"] else {}
    if fresh:
        lines += ["", "Started fresh in the fine-tuned runs (no tensor of that name and shape in the pretrained "
                  "run): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in fresh.items()) + "."]
    return "\n".join(lines) + "\n"


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="transfer", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_transfer(cfg)


if __name__ == "__main__":
    main()
