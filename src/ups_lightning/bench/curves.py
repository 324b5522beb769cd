"""Learning curves across sittings: test nRMSE against the training budget, merged from benchmark
runs made at different times (``curves_from``: the committed results directories of earlier
sittings, each with its runs.csv, summary.csv and, where it trained curve points, curves.csv).

A curve of 2.5 to 40 minutes per model for two methods is hours of training on 2 cores, longer than
one sitting, and run outputs do not survive between sittings: so each sitting trains some budgets,
its results directory is committed, and a later run (or ``curves_only=true``, which trains nothing)
merges them. Rows are merged only from runs on the same data file (its name), test size and
predicted frames; a model (method, recipe, lr, guard, budget, seed) scored in more than one
sitting counts once: this run's row, else the first listed sitting's. Every row keeps the sitting
it came from (``source``), and curves.md lists the sittings with their commits.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ups_lightning.atomic import atomic_write_text
from ups_lightning.bench.report import mean_std, plot_curves
from ups_lightning.errors import UserError
from ups_lightning.tables import write_csv

__all__ = ["CURVE_COLUMNS", "read_sitting", "merge_curves", "verdicts", "write_curves"]

CURVE_COLUMNS = ("method", "label", "recipe", "lr", "guard", "budget_min", "seed", "nrmse", "nrmse_pdebench",
                 "train_s", "learned")
MODEL_KEY = ("method", "recipe", "lr", "guard", "budget_min", "seed")
SAME_DATA = ("data_file", "n_test", "steps")


def _value(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        return text


def _read_csv(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_sitting(folder: str | Path) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """(curve rows, what they were scored on) of one sitting's results directory."""
    d = Path(folder)
    need = [d / "runs.csv", d / "summary.csv"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise UserError(f"bench setting curves_from: {', '.join(missing)} not found; each entry must be the "
                        "results directory of a benchmark run (its summary.csv and runs.csv).")
    summary = _read_csv(d / "summary.csv")
    first = next((r for r in summary if r.get("data_path")), None)
    if first is None:
        raise UserError(f"bench setting curves_from: {d / 'summary.csv'} names no data_path.")
    common = {"data_file": Path(str(first["data_path"])).name, "n_test": first.get("n_test"),
              "steps": first.get("steps")}
    rows = _read_csv(d / "runs.csv") + (_read_csv(d / "curves.csv") if (d / "curves.csv").is_file() else [])
    out, seen = [], set()
    for r in rows:
        if not isinstance(r.get("nrmse"), float) or not math.isfinite(r["nrmse"]):
            continue   # a failed model: never a curve point
        if _key(r) in seen:   # curves.csv repeats the main table's models at its budget
            continue
        seen.add(_key(r))
        # a point this sitting merged from an earlier one keeps that sitting as its source
        own = r.get("source") in (None, "", "this run")
        out.append({**{k: r.get(k) for k in CURVE_COLUMNS}, "source": str(d) if own else r["source"]})
    return out, common


def _key(row: Dict[str, Any]) -> tuple:
    return tuple(round(float(row[k]), 9) if k in ("lr", "budget_min") else row[k] for k in MODEL_KEY)


def merge_curves(own: Sequence[Dict[str, Any]], own_common: Dict[str, Any] | None,
                 sittings: Sequence[str | Path]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(merged rows, notes): this run's rows, then each sitting's rows not already present."""
    rows: List[Dict[str, Any]] = [{**r, "source": r.get("source", "this run")} for r in own]
    seen = {_key(r) for r in rows}
    ref, notes = own_common, []
    for folder in sittings:
        got, common = read_sitting(folder)
        if ref is None:
            ref = common
        differ = [k for k in SAME_DATA if str(common.get(k)) != str(ref.get(k))]
        if differ:
            raise UserError(f"bench setting curves_from: {folder} was scored on {', '.join(f'{k}={common.get(k)}' for k in differ)}, "
                            f"this curve on {', '.join(f'{k}={ref.get(k)}' for k in differ)}: curves are merged only "
                            "from runs on the same data file, test size and predicted frames.")
        dup = 0
        for r in got:
            if _key(r) in seen:
                dup += 1
                continue
            seen.add(_key(r))
            rows.append(r)
        if dup:
            notes.append(f"{folder}: {dup} model(s) already scored in this run or an earlier-listed sitting: not counted twice")
    return rows, notes


def verdicts(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Per budget with both ours and a peer: who is lower, and whether the gap exceeds two standard
    errors (one seed: no error bar, so no winner is named); then where the lower method changes."""
    by: Dict[tuple, List[float]] = {}
    labels: Dict[str, str] = {}
    for r in rows:
        by.setdefault((r["method"], float(r["budget_min"])), []).append(r["nrmse"])
        labels[r["method"]] = str(r.get("label") or r["method"])
    lines: List[str] = []
    for peer in sorted({m for m, _ in by} - {"ours"}):
        lower = []
        for budget in sorted({b for m, b in by if m == peer} & {b for m, b in by if m == "ours"}):
            (ma, sa, na), (mb, sb, nb) = mean_std(by[("ours", budget)]), mean_std(by[(peer, budget)])
            a_lower = ma < mb
            lower.append((budget, "ours" if a_lower else peer))
            gap, se = abs(mb - ma), math.sqrt(sa ** 2 / max(na, 1) + sb ** 2 / max(nb, 1))
            head = f"{budget:g} min: ours {ma:.4f}{f' ± {sa:.4f}' if na > 1 else ''} ({na} seed{'s' * (na > 1)}), " \
                   f"{labels[peer]} {mb:.4f}{f' ± {sb:.4f}' if nb > 1 else ''} ({nb} seed{'s' * (nb > 1)})"
            if na < 2 or nb < 2:
                lines.append(f"{head}: {'ours' if a_lower else labels[peer]} lower, one seed: no winner named.")
            elif gap > 2 * se:
                lines.append(f"{head}: **{'ours' if a_lower else labels[peer]} lower** beyond two standard errors "
                             f"(gap {gap:.4f} > {2 * se:.4f}).")
            else:
                lines.append(f"{head}: within two standard errors (gap {gap:.4f} <= {2 * se:.4f}).")
        changes = [f"between {a:g} and {b:g} min" for (a, wa), (b, wb) in zip(lower, lower[1:]) if wa != wb]
        if len(lower) > 1:
            lines.append(f"Ours against {labels[peer]}: the lower mean changes {', '.join(changes)}." if changes else
                         f"Ours against {labels[peer]}: the lower mean does not change over {lower[0][0]:g}-{lower[-1][0]:g} min "
                         f"({'ours' if lower[0][1] == 'ours' else labels[peer]} throughout).")
    return lines


def write_curves(out: str | Path, rows: Sequence[Dict[str, Any]], published: Sequence[Any],
                 notes: Sequence[str] = (), header: str = "") -> Dict[str, Path]:
    """curves.csv (every point with its source), curves.md (the table per method and budget, the
    verdicts, the sittings) and curves.png (with the published figures as labelled lines)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = [header or "# Learning curves", "",
          "Test nRMSE (predicted frames) against the training budget per model; each method at the recipe, "
          "learning rate and guard chosen on validation at the main budget.", "",
          "| method | minutes | seeds | nRMSE | PDEBench's all-frame nRMSE | train s | sittings |",
          "|---|---:|---:|---:|---:|---:|---|"]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["budget_min"])), []).append(r)
    for (method, budget), rs in sorted(groups.items()):
        m, sd, n = mean_std([r["nrmse"] for r in rs])
        mp = mean_std([r.get("nrmse_pdebench") for r in rs])[0]
        md.append(f"| {rs[0].get('label') or method} | {budget:g} | {n} | {m:.4f}{f' ± {sd:.4f}' if n > 1 else ''} | "
                  f"{mp:.4f} | {mean_std([r.get('train_s') for r in rs])[0]:.0f} | "
                  f"{', '.join(sorted({str(r['source']) for r in rs}))} |")
    md += ["", "## Where the curves cross (a gap must exceed two standard errors)", ""]
    md += [f"- {line}" for line in verdicts(rows)] or ["- (no budget with both ours and a peer)"]
    if published:
        md += ["", "## Published figures (another setting: drawn as lines, never mixed with ours)", ""]
        md += [f"- {p.method}: {p.nrmse:g} in PDEBench's all-frame metric ({p.setting}; {p.source})" for p in published]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    paths = {"curves": write_csv(out / "curves.csv", list(rows), ("method", "budget_min", "seed", "nrmse")),
             "curves_md": out / "curves.md"}
    atomic_write_text(paths["curves_md"], "\n".join(md) + "\n")
    png = plot_curves(rows, published, out / "curves.png")
    if png:
        paths["curves_png"] = png
    return paths
