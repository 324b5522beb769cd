"""`python -m ups_lightning.report SWEEP_DIR [--leaderboard CSV]`: what a sweep found.

A sweep directory holds one run directory per job (`python -m ups_lightning.train -m ...` writes
`outputs/sweeps/<time>/<job number>/`; any sweeper: basic, Optuna; any launcher: local, submitit,
Ray). For every job the report reads its overrides and the stages it trained itself, and, where the
job was evaluated, its latest leaderboard rows. It writes into SWEEP_DIR:

- `report.csv` and `report.md`: one row per job, the swept settings (the overrides that differ
  between jobs), the validation nRMSE of each stage the job trained (ranked by its operator's, or by
  its last stage's when it trained no operator), and test nRMSE where evaluated;
- `report_<setting>.png` for each swept setting against validation (and test) nRMSE, and
  `capacity.png` (nRMSE against trainable parameters) when the sweep changes the model.

The best job is the one with the lowest *validation* nRMSE (test never chooses); the report names
it with the commands that retrain and evaluate it. It runs by itself at the end of every multirun
(`hydra.callbacks.sweep_report` in conf/train.yaml).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ups_lightning.artifacts import DONE, OVERRIDES, REFERENCES, read_record, train_command
from ups_lightning.atomic import atomic_write_text
from ups_lightning.stages import STAGE_ORDER
from ups_lightning.errors import UserError, report_user_errors, command
from ups_lightning.eval.leaderboard import read_rows
from ups_lightning.tables import format_cell, write_csv
from ups_lightning.training import FAILED

log = logging.getLogger("ups_lightning.report")

# overrides that place a job rather than configure it
PLACEMENT_KEYS = ("run_dir", "reuse_runs", "hydra.sweep.dir", "hydra.sweep.subdir", "stage", "ckpt_path")
# overrides that change the model's size: a sweep over one of them gets the capacity curve
CAPACITY_KEYS = ("model", "model.dim", "model.hidden", "model.heads", "model.depth", "model.n_tokens")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _float(v: Any) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def job_dirs(sweep_dir: Path) -> List[Path]:
    """The sweep's job directories: its subdirectories holding a run's overrides or stages, in job
    order (numeric names by number)."""
    found = [d for d in sweep_dir.iterdir() if d.is_dir() and ((d / OVERRIDES).is_file() or (d / FAILED).is_file()
             or any((d / s / DONE).is_file() for s in STAGE_ORDER) or (d / REFERENCES).is_file())]
    return sorted(found, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))


def read_job(job: Path, rows: Sequence[Dict[str, str]]) -> Dict[str, Any]:
    """One job: its overrides, the stages it trained itself (held in its own directory) with their
    validation figures, the parameters of the plain rollout's model (autoencoder + operator, its own or
    referenced), and its latest evaluation rows (val and test, plain and TTC)."""
    failed = _json(job / FAILED) or {}
    overrides = _json(job / OVERRIDES) or failed.get("overrides") or []
    out: Dict[str, Any] = {"job": job.name, "run_dir": str(job), "overrides": [str(o) for o in overrides]}
    own = [s for s in STAGE_ORDER if (job / s / DONE).is_file()]
    if failed and not own:
        out["status"] = "failed: " + " ".join(str(failed.get("error", "")).split())[:300]
        return out
    if not own:
        out["status"] = "unfinished"
        return out
    try:
        records = {s: read_record(job, s) or {} for s in own}
    except UserError as exc:
        out["status"] = f"unreadable record: {exc}"
        return out
    for s, r in records.items():
        out[f"val_{s}"] = r.get("best_val_nrmse")
    # the figure a job is ranked by: its operator's (what the plain rollout and TTC build on) when it
    # trained one, else the last stage it trained
    stage = "operator" if "operator" in own else own[-1]
    record = records[stage]
    out.update(status="finished", stage=stage, val_nrmse=record.get("best_val_nrmse"),
               learned=record.get("learned"), train_s=sum(float(r.get("wall_clock_s") or 0) for r in records.values()),
               epochs=record.get("epochs"))
    try:   # the plain rollout's model, whichever run holds its stages
        chain = [read_record(job, s) for s in ("autoencoder", "operator")]
        out["params"] = sum(int(r["params_trainable"]) for r in chain) if all(chain) else None
    except (UserError, KeyError, TypeError, ValueError):
        out["params"] = None
    mine = [r for r in rows if r.get("run_dir") and _same(r["run_dir"], job)]
    for r in mine:   # later rows overwrite earlier: the latest evaluation of each kind counts
        kind = f"{r.get('split', 'test')}_nrmse" + ("_ttc" if r.get("method") == "ttc" else "")
        out[kind] = _float(r.get("nrmse"))
        if r.get("params"):
            out["params_evaluated"] = int(_float(r["params"]))
    return out


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _same(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, ValueError, RuntimeError):
        return False


def swept_settings(jobs: Sequence[Dict[str, Any]]) -> List[str]:
    """The override keys whose values differ between jobs (placement keys aside), in command order."""
    keys: List[str] = []
    for j in jobs:
        for o in j["overrides"]:
            if _key(o) not in keys and _key(o) not in PLACEMENT_KEYS:
                keys.append(_key(o))
    values = {k: {next((_value(o) for o in j["overrides"] if _key(o) == k), "") for j in jobs} for k in keys}
    return [k for k in keys if len(values[k]) > 1]


def build_report(sweep_dir: str | Path, leaderboard: str = "outputs/leaderboard.csv") -> Dict[str, Any]:
    """Every job's row, the swept settings and the best job (lowest validation nRMSE)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such directory. Pass the sweep directory a multirun wrote "
                        "(by default outputs/sweeps/<time>/, named in the multirun's log).")
    jobs_found = job_dirs(sweep_dir)
    if not jobs_found:
        raise UserError(f"{sweep_dir}: no job directories in it (subdirectories with an {OVERRIDES} or a "
                        f"finished stage). Pass the directory of a `{command('ups_lightning.train')} -m ...` sweep.")
    rows = read_rows(leaderboard) if Path(leaderboard).is_file() else []
    jobs = [read_job(j, rows) for j in jobs_found]
    swept = swept_settings(jobs)
    for j in jobs:
        for k in swept:
            j[k] = next((_value(o) for o in j["overrides"] if _key(o) == k), "")
    done = [j for j in jobs if j.get("status") == "finished" and math.isfinite(_float(j.get("val_nrmse")))]
    best = min(done, key=lambda j: _float(j["val_nrmse"])) if done else None
    return {"sweep_dir": sweep_dir, "jobs": jobs, "swept": swept, "best": best}


def _reproduce(best: Dict[str, Any]) -> List[str]:
    job = Path(best["run_dir"])
    return [train_command(job, stage=best["stage"]), f"{command('ups_lightning.evaluate')} run_dir={job}"]


def write_report(sweep_dir: str | Path, leaderboard: str = "outputs/leaderboard.csv") -> Dict[str, Path]:
    """Write report.csv, report.md and the plots into the sweep directory; returns their paths."""
    rep = build_report(sweep_dir, leaderboard)
    out, jobs, swept, best = rep["sweep_dir"], rep["jobs"], rep["swept"], rep["best"]
    first = ["job", *swept, "stage", "status", "val_nrmse", "test_nrmse", "test_nrmse_ttc", "learned",
             "params", "train_s", "epochs"]
    paths = {"csv": write_csv(out / "report.csv", [{k: v for k, v in j.items() if k != "overrides"} for j in jobs],
                              first)}
    cols = [("job", "job", "{}"), *[(k, k, "{}") for k in swept], ("stage", "stage", "{}"),
            ("val_nrmse", "val nRMSE", "{:.4f}"), ("test_nrmse", "test nRMSE", "{:.4f}"),
            ("test_nrmse_ttc", "test nRMSE (TTC)", "{:.4f}"), ("learned", "beat trivial", "{}"),
            ("params", "params", "{:,}"), ("train_s", "train s", "{:.0f}"), ("status", "status", "{}")]
    md = [f"# Sweep {out}", "", f"{len(jobs)} jobs; swept: {', '.join(swept) or '(nothing differs)'}; "
          "the best job is the lowest validation nRMSE (test is shown, never used to choose).", "",
          "| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for j in jobs:
        mark = "**" if best is j else ""
        md.append("| " + " | ".join(f"{mark}{format_cell(j.get(k), f)}{mark}" for k, _, f in cols) + " |")
    md.append("")
    if best is None:
        md.append("No job finished with a validation figure.")
    else:
        setting = ", ".join(f"{k}={best[k]}" for k in swept) or "the only setting"
        md += [f"**Best: job {best['job']}** ({setting}): validation nRMSE {best['val_nrmse']:.4f}"
               + (f", test nRMSE {best['test_nrmse']:.4f}" if math.isfinite(_float(best.get('test_nrmse'))) else
                  " (not evaluated on test yet)") + ". Reproduce and evaluate it with:", "",
               *[f"    {c}" for c in _reproduce(best)]]
    plots = _plots(out, jobs, swept)
    md += ["", *[f"![{p.stem}]({p.name})" for p in plots]] if plots else []
    paths.update({p.stem: p for p in plots})
    paths["md"] = out / "report.md"
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    return paths


def _plots(out: Path, jobs: Sequence[Dict[str, Any]], swept: Sequence[str]) -> List[Path]:
    """One plot per swept setting (validation and test nRMSE against its values) and the capacity
    curve (against trainable parameters) when the model's size is swept."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [j for j in jobs if math.isfinite(_float(j.get("val_nrmse")))]
    plots: List[Path] = []
    if not done:
        return plots
    axes = [(k, f"report_{k.replace('/', '_')}.png") for k in swept]
    if any(k in CAPACITY_KEYS for k in swept):
        axes.append(("params", "capacity.png"))
    # the evaluated model's parameters where every job was evaluated, else autoencoder + operator
    size_key = "params_evaluated" if all(j.get("params_evaluated") for j in done) else "params"
    for key, name in axes:
        fig = Figure(figsize=(5, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = [j.get(size_key if key == "params" else key) for j in done]
        numeric = all(math.isfinite(_float(x)) for x in xs)
        order = sorted(range(len(done)), key=lambda i: _float(xs[i]) if numeric else str(xs[i]))
        pos = [_float(xs[i]) for i in order] if numeric else list(range(len(order)))
        for col, label, style in (("val_nrmse", "validation", "o-"), ("test_nrmse", "test", "s--")):
            ys = [_float(done[i].get(col)) for i in order]
            if any(math.isfinite(y) for y in ys):
                ax.plot(pos, ys, style, label=label)
        if numeric and len(pos) > 1 and min(pos) > 0 and max(pos) / min(pos) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(pos, [str(xs[i]) for i in order], rotation=30, ha="right")
        ax.set_xlabel(("parameters (evaluated model)" if size_key == "params_evaluated" else
                       "parameters (autoencoder + operator)") if key == "params" else key)
        ax.set_ylabel("nRMSE")
        ax.set_title("capacity curve" if key == "params" else f"nRMSE against {key}")
        ax.legend()
        path = out / name
        fig.savefig(path, dpi=90)
        plots.append(path)
    return plots


try:   # the multirun-end hook (hydra.callbacks.sweep_report)
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:   # pragma: no cover - hydra-core is a dependency
    _HydraCallback = object


class SweepReportCallback(_HydraCallback):
    """Writes the report when a multirun ends; a report that cannot be written is logged, never
    fatal to a sweep whose jobs already finished."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            paths = write_report(sweep_dir)
        except UserError as exc:
            log.warning("sweep report not written: %s", exc)
            return
        print(f"sweep report: {paths['md']} ({paths['csv']})", flush=True)
        print(paths["md"].read_text(), flush=True)


@report_user_errors
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=command("ups_lightning.report"), description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep_dir")
    parser.add_argument("--leaderboard", default="outputs/leaderboard.csv",
                        help="the evaluations' leaderboard (test figures of evaluated jobs)")
    args = parser.parse_args(argv)
    paths = write_report(args.sweep_dir, args.leaderboard)
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main(sys.argv[1:])
