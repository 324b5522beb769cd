"""Summary of a benchmark run: `summary.csv` (one row per method) and `summary.md` (a table).

Rows are plain dicts; the columns below come first in this order, anything else a row carries
follows (sorted), so a row from any method fits the same file.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ups_lightning.atomic import atomic_write_text

__all__ = ["SUMMARY_COLUMNS", "TABLE_COLUMNS", "write_summary", "markdown_table", "add_equal_accuracy"]

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


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    try:
        if fmt == "{:,}":
            return fmt.format(int(value))
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


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
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def write_summary(out_dir: str | os.PathLike, rows: Sequence[Dict[str, Any]],
                  header: Optional[str] = None, notes: Sequence[str] = ()) -> Dict[str, Path]:
    """Write ``summary.csv`` and ``summary.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    extra = sorted({k for r in rows for k in r} - set(SUMMARY_COLUMNS))
    cols = list(SUMMARY_COLUMNS) + extra
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    csv_path = out / "summary.csv"
    atomic_write_text(csv_path, buf.getvalue())

    md = []
    if header:
        md += [header, ""]
    md.append(markdown_table(rows))
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    md_path = out / "summary.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return {"csv": csv_path, "md": md_path}
