"""Summary of a benchmark run: `summary.csv` (one row per method) and `summary.md` (a table).

Rows are plain dicts; the columns below come first in this order, anything else a row carries
follows (sorted), so a row from any method fits the same file.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ups_lightning.atomic import atomic_write_text
from ups_lightning.tables import format_cell, write_csv

__all__ = ["SUMMARY_COLUMNS", "TABLE_COLUMNS", "write_summary", "markdown_table", "add_equal_accuracy",
           "mean_std", "aggregate", "winners", "write_bench_summary"]

SUMMARY_COLUMNS = (
    "method", "nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "frmse_low", "frmse_mid",
    "frmse_high", "correlation_horizon", "train_s", "rollout_ms_per_traj", "params",
    "rmse", "brmse", "max_err", "nrmse_pdebench", "mass_drift", "energy_increase", "tv_increase",
    "spectral_energy_error", "solver_grid_at_equal_nrmse", "solver_ms_at_equal_nrmse",
    "speedup_vs_solver", "budget_min", "n_test", "steps", "data_path", "note",
)

#: (column, header, format) of the markdown table
TABLE_COLUMNS = (
    ("method", "method", "{}"),
    ("nrmse", "nRMSE", "{:.4f}"),
    ("nrmse_1", "@1", "{:.4f}"),
    ("nrmse_10", "@10", "{:.4f}"),
    ("nrmse_31", "@31", "{:.4f}"),
    ("crmse", "cRMSE", "{:.2e}"),
    ("frmse_low", "fRMSE low", "{:.2e}"),
    ("frmse_mid", "fRMSE mid", "{:.2e}"),
    ("frmse_high", "fRMSE high", "{:.2e}"),
    ("correlation_horizon", "corr. horizon", "{:.1f}"),
    ("train_s", "train s", "{:.0f}"),
    ("rollout_ms_per_traj", "rollout ms/traj", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("solver_grid_at_equal_nrmse", "solver at equal nRMSE", "{}"),
    ("speedup_vs_solver", "solver ms / method ms", "{:.3g}x"),
)


def add_equal_accuracy(rows: List[Dict[str, Any]], solver_rows: Sequence[Dict[str, Any]]) -> None:
    """For every learned method (``kind == "surrogate"``), the cheapest solver grid whose nRMSE is at
    most the method's, its ms per trajectory, and solver ms / method ms (``speedup_vs_solver``)."""
    from ups_lightning.bench.solver_sweep import cheapest_meeting

    for row in rows:
        if row.get("kind") != "surrogate":
            continue
        hit = cheapest_meeting(solver_rows, row["nrmse"]) if solver_rows else None
        if hit is None:
            row["solver_grid_at_equal_nrmse"] = ("none swept is as accurate" if solver_rows else None)
            continue
        row["solver_grid_at_equal_nrmse"] = int(hit["grid"])
        row["solver_ms_at_equal_nrmse"] = hit["ms_per_traj"]
        ms = row.get("rollout_ms_per_traj")
        row["speedup_vs_solver"] = hit["ms_per_traj"] / ms if ms else None


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for k, _, _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(r.get(k), f) for k, _, f in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def write_summary(out_dir: str | os.PathLike, rows: Sequence[Dict[str, Any]],
                  header: Optional[str] = None, notes: Sequence[str] = ()) -> Dict[str, Path]:
    """Write ``summary.csv`` and ``summary.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    csv_path = write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS)

    md = []
    if header:
        md += [header, ""]
    md.append(markdown_table(rows))
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    md_path = out / "summary.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return {"csv": csv_path, "md": md_path}


# --------------------------------------------------------------------------------------------
# seeds: mean +- std per method and guard setting, winners by two standard errors
# --------------------------------------------------------------------------------------------
#: the columns a winner is named for (lower is better)
WINNER_COLUMNS = (("nrmse", "nRMSE"), ("nrmse_1", "nRMSE@1"), ("nrmse_10", "nRMSE@10"), ("nrmse_31", "nRMSE@31"))
AGG_COLUMNS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "correlation_horizon", "nrmse_pdebench",
               "mass_drift", "val_nrmse", "val_nrmse_guard_off", "val_nrmse_guard_on", "train_s",
               "rollout_ms_per_traj", "optimizer_steps")


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample standard deviation (n - 1; 0 for one value), n) of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def aggregate(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (method, guard): mean, std and n over seeds of AGG_COLUMNS (``<col>``,
    ``<col>_std``), plus the seeds, the learning rate and how many models never learned."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], bool(r["guard"])), []).append(r)
    out = []
    for (method, guard), rs in groups.items():
        row: Dict[str, Any] = {"method": f"{rs[0]['label']}{' + guard' if guard else ''}", "key": method,
                               "guard": guard, "kind": "surrogate", "lr": rs[0]["lr"],
                               "recipe": rs[0].get("recipe"),
                               "seeds": [r["seed"] for r in rs], "n_seeds": len(rs), "params": rs[0].get("params"),
                               "not_learned": sum(1 for r in rs if r.get("learned") is False)}
        for c in AGG_COLUMNS:
            row[c], row[f"{c}_std"], _ = mean_std([r.get(c) for r in rs])
        out.append(row)
    return out


def winners(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """For each WINNER_COLUMNS column, a sentence: the best row wins only where its gap to the best
    row of another method (``key``; a method's guard variants do not compete with each other)
    exceeds two standard errors of the difference, sqrt(sd_a^2/n_a + sd_b^2/n_b)."""
    lines = []
    for col, name in WINNER_COLUMNS:
        ranked = sorted((r for r in rows if math.isfinite(r.get(col, math.nan))), key=lambda r: r[col])
        rivals = [r for r in ranked[1:] if ranked and r["key"] != ranked[0]["key"]]
        if not rivals:
            continue
        a, b = ranked[0], rivals[0]
        se = math.sqrt(a[f"{col}_std"] ** 2 / a["n_seeds"] + b[f"{col}_std"] ** 2 / b["n_seeds"])
        gap = b[col] - a[col]
        if a["n_seeds"] < 2 or b["n_seeds"] < 2:
            lines.append(f"{name}: {a['method']} is lowest ({a[col]:.4f} vs {b['method']} {b[col]:.4f}), but with "
                         "one seed there is no error bar, so no winner is named.")
        elif gap > 2 * se:
            lines.append(f"{name}: **{a['method']} wins** ({a[col]:.4f} ± {a[col + '_std']:.4f} vs the next, "
                         f"{b['method']}, {b[col]:.4f} ± {b[col + '_std']:.4f}: gap {gap:.4f} > 2 SE = {2 * se:.4f}; "
                         f"{100 * gap / b[col]:.0f}% lower).")
        else:
            lines.append(f"{name}: no clear winner: {a['method']} ({a[col]:.4f} ± {a[col + '_std']:.4f}) and "
                         f"{b['method']} ({b[col]:.4f} ± {b[col + '_std']:.4f}) are within two standard errors "
                         f"(gap {gap:.4f} <= {2 * se:.4f}).")
    return lines


def _pm(row: Dict[str, Any], col: str, fmt: str = "{:.4f}") -> str:
    m, sd = row.get(col), row.get(f"{col}_std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return fmt.format(m) + (f" ± {fmt.format(sd)}" if sd is not None and not math.isnan(sd) else "")


def write_bench_summary(out_dir: str | os.PathLike, results: Dict[str, Dict[str, Any]],
                        fixed: Sequence[Dict[str, Any]], solver_rows: Sequence[Dict[str, Any]],
                        header: str, common: Dict[str, Any], curves: Sequence[Dict[str, Any]] = (),
                        published: Sequence[Any] = ()) -> Dict[str, Path]:
    """The benchmark's files: summary.md (aggregated table with error bars, winners in words, the
    search, persistence and solver rows, the published figures), summary.csv (aggregated + fixed
    rows), runs.csv (every scored model), lr_search.csv (every trial); with learning curves their
    table (their files: bench/curves.write_curves)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for res in results.values() for r in res["runs"]]
    trials = [t for res in results.values() for t in res["trials"]]
    agg = aggregate(runs)
    add_equal_accuracy(agg, solver_rows)
    for r in list(agg) + list(fixed):
        r.update(common)
    n_seeds = max((r["n_seeds"] for r in agg), default=0)
    md = [header, "", f"## Learned methods: mean ± std over {n_seeds} training seeds (test split)", "",
          "Each method's row is its recipe, learning rate and guard setting chosen on validation; test was "
          "scored once per model, with that setting.", "",
          "| method | recipe | lr | guard (val) | nRMSE | @1 | @10 | @31 | val nRMSE no guard | val nRMSE guard | "
          "train s | steps | rollout ms/traj | params | solver at equal nRMSE | not learned |",
          "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in sorted(agg, key=lambda r: r["nrmse"]):
        md.append(f"| {r['method']} | {r.get('recipe') or '-'} | {r['lr']:g} | {'on' if r['guard'] else 'off'} | "
                  f"{_pm(r, 'nrmse')} | {_pm(r, 'nrmse_1')} | {_pm(r, 'nrmse_10')} | {_pm(r, 'nrmse_31')} | "
                  f"{_pm(r, 'val_nrmse_guard_off')} | {_pm(r, 'val_nrmse_guard_on')} | {_pm(r, 'train_s', '{:.0f}')} | "
                  f"{_pm(r, 'optimizer_steps', '{:.0f}')} | {_pm(r, 'rollout_ms_per_traj', '{:.2f}')} | "
                  f"{format_cell(r.get('params'), '{:,}')} | {format_cell(r.get('solver_grid_at_equal_nrmse'), '{}')} | "
                  f"{r['not_learned']} of {r['n_seeds']} |")
    md += ["", "## Who wins (a gap must exceed two standard errors)", ""] + [f"- {w}" for w in winners(agg)]
    flagged = [r for r in runs if r.get("learned") is False]
    if flagged:
        md += ["", "**Models that stopped before they beat their trivial reference** (persistence's rollout on "
               "validation, the same for every method): " + ", ".join(f"{r['method']} lr {r['lr']:g} seed {r['seed']}"
                                                                       for r in flagged) + "."]
    stages = [(r, names) for r in runs
              if (names := [k for k, v in (r.get("stage_learned") or {}).items() if v is False])]
    if stages:
        md += ["", "Stages of ours that did not beat their own trivial reference (the autoencoder: the mean "
               "field; the operator: one-step persistence, decoded, which its decoded one-step error cannot "
               "beat while it sits on the autoencoder's reconstruction error): "
               + ", ".join(f"seed {r['seed']} {'/'.join(names)}" for r, names in stages) + "."]
    md += ["", "## The search (validation split, first seed; bench/search.py)", ""]
    for method, res in results.items():
        c = res.get("chosen") or {}
        if c.get("given"):
            md.append(f"- {method}: {c['recipe']} lr {c['lr']:g} **given** (`given.{method}`: an earlier run's "
                      "choice on validation); no search in this run.")
        elif c:
            md.append(f"- {method}: chose {c['recipe']} lr {c['lr']:g}; first-rung trials "
                      + ", ".join(f"{k} {v}" for k, v in c["first_rung_trials"].items()) + "; the pick is "
                      + ", ".join(f"{k}: {'interior' if v else '**on the edge of its ladder**'}"
                                  for k, v in c["interior"].items()) + " (first rung).")
    md += ["", "| method | recipe | lr | rung | minutes | val nRMSE | train s | steps | learned | chosen |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for t in trials:
        md.append(f"| {t['method']} | {t.get('recipe', '-')} | {t['lr']:g} | {t.get('rung', 0)} | "
                  f"{t['budget_min']:g} | {t['best_val_nrmse']:.4f} | {format_cell(t.get('train_s'), '{:.0f}')} | "
                  f"{format_cell(t.get('optimizer_steps'), '{}')} | {'yes' if t['learned'] else '**no**'} | "
                  f"{'**chosen**' if t.get('chosen') else ''} |")
    paths: Dict[str, Path] = {}
    if curves:
        md += ["", "## Learning curves (test split; recipe, rate and guard chosen at the main budget)", "",
               "| method | minutes | seeds | nRMSE | train s |", "|---|---:|---:|---:|---:|"]
        for (method, budget), rs in _by(curves, ("method", "budget_min")).items():
            m, sd, n = mean_std([r["nrmse"] for r in rs])
            md.append(f"| {rs[0]['label']} | {budget:g} | {n} | {m:.4f}{f' ± {sd:.4f}' if n > 1 else ''} | "
                      f"{mean_std([r['train_s'] for r in rs])[0]:.0f} |")
        md += ["", "Where they cross, the sittings and the plot: curves.md, curves.png (bench/curves.py)."]
    if published:
        md += ["", "## Published figures (not ours: another setting, never mixed with the rows above)", "",
               "| method | nRMSE (PDEBench's metric) | setting | source |", "|---|---:|---|---|"]
        md += [f"| {p.method} | {p.nrmse:g} | {p.setting} | {p.source} |" for p in published]
        md += ["", "Compare them with our `nrmse_pdebench` column (summary.csv), which scores all frames with "
               "the given ones copied as PDEBench does; the headline nRMSE scores the predicted frames only."]
    md += ["", "## References (test split)", "", markdown_table(list(fixed)), "",
           "- nRMSE and every metric: physical space, the predicted frames rolled out from the given ones "
           "without teacher forcing, scored by ups_lightning.eval.metrics.all_metrics.",
           "- guard: each predicted frame projected onto the invariants the last given frame fixes (the "
           "equation spec's `project`: mass, bounds), offered to every method and chosen per method on "
           "validation; for ours it also re-encodes each state. Without it ours is a pure latent rollout.",
           "- train s: everything the method needed before it could predict (ours: both stages' preparation, "
           "the latent cache included, and fits), validation included for every method.",
           "- Per-seed figures: runs.csv; every trial: lr_search.csv."]
    md_path = out / "summary.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    first = ("method", "recipe", "lr", "seed", "guard")
    paths.update({"md": md_path, "csv": write_csv(out / "summary.csv", [
        {k: v for k, v in r.items() if k != "seeds"} | {"seeds": " ".join(map(str, r["seeds"]))} for r in agg]
        + list(fixed), first),
        "runs": write_csv(out / "runs.csv", [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in runs],
                          first),
        "lr_search": write_csv(out / "lr_search.csv", [{k: v for k, v in t.items() if not isinstance(v, dict)}
                                                       for t in trials], first)})
    return paths


def _by(rows: Sequence[Dict[str, Any]], keys: Sequence[str]) -> Dict[tuple, List[Dict[str, Any]]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def plot_curves(curves: Sequence[Dict[str, Any]], published: Sequence[Any], path: Path) -> Optional[Path]:
    """Test nRMSE against the training budget per method (mean, with the seeds' spread where there
    are several), and PDEBench's published figures as labelled horizontal lines (their metric is
    PDEBench's all-frame nRMSE, so they are drawn against our ``nrmse_pdebench`` on the right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, col, title in ((axes[0], "nrmse", "nRMSE, predicted frames (the headline)"),
                           (axes[1], "nrmse_pdebench", "PDEBench's all-frame nRMSE")):
        for method, rs in _by(curves, ("method",)).items():
            pts = sorted(_by(rs, ("budget_min",)).items())
            xs = [b[0] for b, _ in pts]
            stats = [mean_std([r.get(col) for r in g]) for _, g in pts]
            ax.errorbar(xs, [m for m, _, _ in stats], yerr=[sd for _, sd, _ in stats], marker="o", capsize=3,
                        label=rs[0]["label"])
        if col == "nrmse_pdebench":
            for p in published:
                ax.axhline(p.nrmse, ls="--", lw=1, color="grey")
                ax.annotate(f"{p.method} {p.nrmse:g} ({p.source.split(',')[0]}; {p.setting})", (xs[0] if curves else 1, p.nrmse),
                            fontsize=6, va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # the budgets themselves as ticks: a log axis' default minor labels overlap over 2.5-40 min
        budgets = sorted({float(r["budget_min"]) for r in curves})
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training budget per model (minutes of wall-clock)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
