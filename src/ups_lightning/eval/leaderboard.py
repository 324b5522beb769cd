"""The leaderboard (benchmark.md section 5): one CSV row per evaluation, gates and promotion, HTML.

CSV
    ``append_row`` adds one row. The header is the union of all columns ever written (in first-seen
    order); a row lacking a column has it empty. Every append takes an exclusive lock
    (``filelock.FileLock``, portable) on ``<csv>.lock`` beside the file, reads the board, and writes
    the whole board plus the new row to ``<csv>.tmp-<pid>`` which then replaces the CSV
    (``os.replace``): concurrent evaluations lose no row, and a reader (no lock needed) sees either
    the old or the new file, never half of one.

    A damaged board (a row with the wrong number of fields, text in a numeric column, bytes that are
    not UTF-8, a truncated quote) is a UserError naming the file and line. ``append_row`` never
    loses the finished evaluation's row: when the board cannot be read or written, the row goes to
    ``<csv>.rejected-<run_id>.json`` beside it (or in the temp directory) and the error says where.

Gates and promotion
    Rows are compared within a *group* (same data and protocol): by default the columns
    ``data_path``, ``split`` and ``steps`` (``GROUP_KEYS``; missing columns count as empty). The group's champion is its latest row labelled
    ``champion``. ``append_row(..., gates=GateConfig())`` labels the new row under the same lock:
    ``champion`` if :func:`check_gates` passes against the current champion (or there is none), else
    ``candidate``; it also writes ``gate_reasons``. A row arriving with its own ``label`` keeps it.
    :func:`assign_labels` recomputes the labels of a whole board from scratch in row order.

HTML
    ``write_html`` renders the board: a table (click a header to sort), per row with ``artifacts``
    the space-time fields and nRMSE-per-frame curves, and a capacity curve (nRMSE vs parameters or
    latent dim) when several sizes are on the board. Artifacts contract: column ``artifacts`` = a
    directory (absolute, or relative to the CSV's directory, then to the working directory) holding
    ``curves.json`` ({"method": [nRMSE per predicted frame], ...}) and ``samples.npz`` (``true``,
    ``pred`` (n_show, T, X), ``x`` (X,), ``t`` (T,)). Missing or unreadable artifacts leave the row
    without plots and a note; nothing crashes.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ups_lightning.atomic import atomic_write_json, atomic_write_text
from ups_lightning.errors import UserError

__all__ = [
    "GateConfig",
    "GROUP_KEYS",
    "append_row",
    "read_rows",
    "check_gates",
    "current_champion",
    "assign_labels",
    "label_new_row",
    "write_html",
]

#: the columns that make a data/protocol group (what ``evaluate.py`` writes: the evaluated file, the
#: split and the number of predicted steps); rows are only ever compared within one group
GROUP_KEYS: tuple[str, ...] = ("data_path", "split", "steps")

# gate name -> (columns checked, ratio field of GateConfig, needs the value on both rows to apply)
_RATIO_GATES: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("conservation", ("mass_drift", "crmse"), "max_mass_ratio", False),
    ("boundary", ("brmse",), "max_boundary_ratio", False),
    ("calibration", ("ece",), "max_calibration_ratio", True),
    ("wall-clock", ("rollout_ms_per_traj",), "max_wallclock_ratio", False),
)


@dataclass
class GateConfig:
    delta: float = 0.0  # required nRMSE improvement over the champion
    max_mass_ratio: float = 1.5  # mass_drift and crmse <= ratio * champion's
    max_boundary_ratio: float = 1.5  # brmse
    max_calibration_ratio: float = 1.5  # ece, when both rows have it
    max_wallclock_ratio: float = 2.0  # rollout_ms_per_traj


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):  # np.float64 too: repr(float(...)) round-trips, numpy's repr does not
        return "nan" if math.isnan(v) else repr(float(v))
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        try:
            return _cell(v.item())
        except (ValueError, RuntimeError):
            pass
    return str(v)


@contextlib.contextmanager
def _locked(csv_path: Path) -> Iterator[None]:
    from filelock import FileLock

    lock = csv_path.with_name(csv_path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield


# Columns that hold numbers on every board evaluate.py writes (empty, nan and inf allowed): text
# there means a damaged or hand-edited row, which would silently break gates and sorting.
_NUMERIC_COLUMNS = frozenset((
    "steps", "n_test", "dim", "n_tokens", "params", "nrmse", "nrmse_1", "nrmse_10", "nrmse_31",
    "nrmse_pdebench", "rmse", "crmse", "brmse", "max_err", "frmse_low", "frmse_mid", "frmse_high",
    "mass_drift", "energy_increase", "tv_increase", "correlation_horizon", "crps", "spread_skill",
    "coverage_50", "coverage_90", "coverage_50_nominal", "coverage_90_nominal", "ece", "rollout_ms_per_traj",
    "rollout_ms_per_step", "solver_ms_per_traj", "ttc_gain_nrmse", "ttc_cost_ratio", "peak_rss_mb"))
_NUMERIC_PREFIXES = ("params_", "train_s_", "val_nrmse_")


def _numeric_column(name: str) -> bool:
    return name in _NUMERIC_COLUMNS or name.startswith(_NUMERIC_PREFIXES)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bad_board(csv_path: Path, line: int, what: str) -> UserError:
    return UserError(f"leaderboard {str(csv_path)!r}, line {line}: {what}. Every line must be a "
                     f"CSV row of UTF-8 text with one field per header column (numbers in the "
                     f"metric columns); fix or delete that line.")


def _read(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of the board; a UserError naming the file and line for a damaged one."""
    if not csv_path.exists():
        return [], []
    try:
        raw = csv_path.read_bytes()
    except OSError as exc:
        raise UserError(f"leaderboard {str(csv_path)!r} cannot be read ({exc.strerror or exc}); "
                        f"expected a CSV file.") from None
    try:
        text = raw.decode("utf-8-sig")     # a spreadsheet's byte-order mark is not a column name
    except UnicodeDecodeError as exc:
        raise _bad_board(csv_path, raw.count(b"\n", 0, exc.start) + 1,
                         f"byte {raw[exc.start]:#04x} is not UTF-8 text") from None
    # strict: an unterminated quote (a truncated file) is an error, not a silently merged row
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] = []
    rows: list[dict[str, str]] = []
    start = 1       # the line a record starts on (a quoted field may span several)
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not header:
                if not record or len(set(record)) != len(record):
                    raise _bad_board(csv_path, line, f"header {record!r} is empty or repeats a "
                                                     f"column name")
                header = record
                continue
            if not record:      # a blank line
                continue
            if len(record) != len(header):
                raise _bad_board(csv_path, line, f"{len(record)} fields where the header has "
                                                 f"{len(header)}")
            row = dict(zip(header, record))
            for key, value in row.items():
                if value and _numeric_column(key) and not _is_number(value):
                    raise _bad_board(csv_path, line, f"column {key!r} holds {value[:40]!r}, not "
                                                     f"a number")
            rows.append(row)
    except csv.Error as exc:
        raise _bad_board(csv_path, start, f"unreadable CSV ({exc})") from None
    return header, rows


def _save_rejected(csv_path: Path, row: dict[str, str], reason: str) -> str:
    """Keep a row the board could not take: ``<csv>.rejected-<run_id>.json`` beside it, else in
    the temp directory. Returns where it went, or why it could not be saved."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", row.get("run_id") or "")[:80]
    tag = tag or time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid())
    payload = {"leaderboard": str(csv_path), "reason": reason, "row": row}
    name = f"{csv_path.name}.rejected-{tag}.json"
    errors = []
    for folder in (csv_path.parent, Path(tempfile.gettempdir())):
        try:
            atomic_write_json(folder / name, payload)
            return str(folder / name)
        except OSError as exc:
            errors.append(f"{folder}: {exc.strerror or exc}")
    return f"nowhere (could not write it: {'; '.join(errors)}); the row was {json.dumps(row)}"


def read_rows(csv_path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of the board as dicts of strings (empty list when the file does not exist)."""
    return _read(Path(csv_path))[1]


def append_row(csv_path: str | os.PathLike, row: dict[str, Any], gates: GateConfig | None = None,
               group_keys: Sequence[str] = GROUP_KEYS) -> dict[str, str]:
    """Append one row (module doc: locking, atomic rewrite, union header). With ``gates`` and no
    ``label`` in ``row``, label it against its group's current champion (see :func:`check_gates`).
    Returns the row as written (strings)."""
    path = Path(csv_path)
    new = {str(k): _cell(v) for k, v in row.items()}
    try:
        with _locked(path):
            header, rows = _read(path)
            if gates is not None and not new.get("label"):
                champ = current_champion(rows, _group(new, group_keys), group_keys)
                passed, reasons = check_gates(new, champ, gates)
                new["label"] = "champion" if passed else "candidate"
                new["gate_reasons"] = "; ".join(reasons)
            for k in new:
                if k not in header:
                    header.append(k)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            writer.writerow(new)
            atomic_write_text(path, buf.getvalue())
    except (UserError, OSError) as exc:
        # the evaluation behind this row may have taken hours: keep the row before failing
        problem = (str(exc) if isinstance(exc, UserError) else
                   f"leaderboard {str(path)!r} cannot be written ({exc.strerror or exc}).")
        saved = _save_rejected(path, new, problem)
        raise UserError(f"{problem} The new row (run_id {new.get('run_id') or '?'}) was NOT added "
                        f"to the board; it is saved in {saved}.") from None
    return new


# --------------------------------------------------------------------------------------------
# gates and promotion
# --------------------------------------------------------------------------------------------
def _num(row: dict[str, Any] | None, key: str) -> float | None:
    """A finite float from a row cell, else None (missing, empty, 'nan', text)."""
    if row is None:
        return None
    v = row.get(key)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def check_gates(candidate: dict[str, Any], champion: dict[str, Any] | None,
                cfg: GateConfig | None = None) -> tuple[bool, list[str]]:
    """Whether ``candidate`` may replace ``champion``; the reasons list names every failed gate.

    Gates (values from the rows, strings or numbers): nrmse <= champion nrmse - delta; and, each
    <= its ratio times the champion's: conservation (``mass_drift`` and ``crmse``), boundary
    (``brmse``), calibration (``ece``) and wall-clock (``rollout_ms_per_traj``). A ratio gate is
    skipped when the champion lacks the value; it fails when the candidate lacks a value the
    champion has (except calibration, which applies only when both have it). No champion: passes,
    unless the candidate's ``not_learned`` names a stage that never beat its trivial reference: such
    a row is never champion."""
    cfg = cfg or GateConfig()
    unlearned = str(candidate.get("not_learned") or "").strip()
    if unlearned:
        return False, [f"did not learn: stage(s) {unlearned} never beat their trivial reference"]
    if champion is None:
        return True, []
    reasons: list[str] = []
    c_n, k_n = _num(candidate, "nrmse"), _num(champion, "nrmse")
    if c_n is None:
        reasons.append("nrmse: candidate has no finite nrmse")
    elif k_n is not None and not c_n <= k_n - cfg.delta:
        reasons.append(f"nrmse: {c_n:.6g} > champion {k_n:.6g} - delta {cfg.delta:g}")
    for gate, keys, ratio_field, need_both in _RATIO_GATES:
        ratio = getattr(cfg, ratio_field)
        for key in keys:
            k_v, c_v = _num(champion, key), _num(candidate, key)
            if k_v is None or (need_both and c_v is None):
                continue
            if c_v is None:
                reasons.append(f"{gate}: candidate does not report {key} (champion {k_v:.6g})")
            elif c_v > ratio * k_v + 1e-15:
                reasons.append(f"{gate}: {key} {c_v:.6g} > {ratio:g} x champion {k_v:.6g}")
    return not reasons, reasons


def _group(row: dict[str, Any], group_keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(_cell(row.get(k, "")) for k in group_keys)


def current_champion(rows: Sequence[dict[str, Any]], group: tuple[str, ...],
                     group_keys: Sequence[str] = GROUP_KEYS) -> dict[str, Any] | None:
    """The latest row of ``group`` labelled 'champion', or None."""
    for r in reversed(rows):
        if r.get("label") == "champion" and _group(r, group_keys) == group:
            return r
    return None


def label_new_row(csv_path: str | os.PathLike, row: dict[str, Any], gates: GateConfig | None = None,
                  group_keys: Sequence[str] = GROUP_KEYS) -> tuple[str, list[str]]:
    """('champion' | 'candidate', failed-gate reasons) for ``row`` against its group's current
    champion on the board. Reads without the lock: two evaluations labelling at the same moment could
    both be promoted against the same old champion; ``append_row(csv, row, gates=...)`` decides and
    appends under one lock and is the race-free way."""
    champ = current_champion(read_rows(csv_path), _group(row, group_keys), group_keys)
    passed, reasons = check_gates(row, champ, gates)
    return ("champion" if passed else "candidate"), reasons


def assign_labels(rows: Sequence[dict[str, Any]], cfg: GateConfig | None = None,
                  group_keys: Sequence[str] = GROUP_KEYS) -> list[str]:
    """Recompute labels from scratch in row order: per group, a row is 'champion' if it passes the
    gates against the group's champion so far (the first row of a group always does), else
    'candidate'. The last 'champion' of each group is the current one."""
    champs: dict[tuple[str, ...], dict[str, Any]] = {}
    labels = []
    for r in rows:
        g = _group(r, group_keys)
        passed, _ = check_gates(r, champs.get(g), cfg)
        if passed:
            champs[g] = r
        labels.append("champion" if passed else "candidate")
    return labels


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
_KEY_COLUMNS = (
    "run_id", "time", "label", "data", "data_path", "split", "steps", "protocol", "method", "model", "dim",
    "n_tokens", "params", "stage", "corrector", "ttc", "ttc_n_candidates", "ttc_beam_width", "ttc_horizon",
    "ttc_budget", "ttc_evals_per_step", "ttc_gain_nrmse", "ttc_cost_ratio", "nrmse", "nrmse_1", "nrmse_10",
    "nrmse_31", "nrmse_pdebench", "rmse", "crmse", "brmse", "max_err", "frmse_low", "frmse_mid",
    "frmse_high", "mass_drift", "energy_increase", "tv_increase", "correlation_horizon", "crps", "ece",
    "rollout_ms_per_traj", "git_commit", "gate_reasons",
)
_SIZE_COLUMNS = ("params", "dim")
# the columns whose values tell capacity-curve series apart (TTC settings, not TTC results)
_TTC_SETTINGS = ("ttc", "ttc_n_candidates", "ttc_beam_width", "ttc_horizon", "ttc_budget")

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#eee;cursor:pointer;position:sticky;top:0}tr.champion td{background:#e9f7e9}
td.txt{text-align:left}.note{color:#a00}img{max-width:100%}section{margin-top:2em}"""

_JS = """function sortTable(n){const t=document.getElementById('board');const b=t.tBodies[0];
const rows=Array.from(b.rows);const d=t.dataset.dir==='asc'&&t.dataset.col==n?'desc':'asc';
t.dataset.dir=d;t.dataset.col=n;const v=r=>{const s=r.cells[n].innerText;const f=parseFloat(s);
return isNaN(f)?s:f};rows.sort((a,c)=>{const x=v(a),y=v(c);const r=(typeof x===typeof y)?(x<y?-1:x>y?1:0):
(typeof x==='number'?-1:1);return d==='asc'?r:-r});rows.forEach(r=>b.appendChild(r))}"""


def _fig_png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    return '<img alt="plot" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode("ascii") + '">'


def _resolve_artifacts(value: str, csv_path: Path) -> Path | None:
    if not value:
        return None
    p = Path(value)
    for cand in ([p] if p.is_absolute() else [csv_path.parent / p, Path.cwd() / p]):
        if cand.is_dir():
            return cand
    return None


def _space_time_1d(true, pred, x, t, title: str, max_samples: int):
    """Space-time panels (truth, prediction, error) of up to ``max_samples`` 1D trajectories."""
    import numpy as np
    from matplotlib.figure import Figure

    if true.ndim == 4:   # several channels: one space-time panel per channel would crowd; show the first
        true, pred = true[..., 0], pred[..., 0]
    n = min(max_samples, true.shape[0])
    fig = Figure(figsize=(10, 2.4 * n + 0.4), layout="constrained")
    ext = [x[0], x[-1], t[0], t[-1]] if len(x) > 1 and len(t) > 1 else None
    for i in range(n):
        err = pred[i] - true[i]
        lim = float(np.max(np.abs(true[i]))) or 1.0
        for j, (name, field, cmap, vmin, vmax) in enumerate((
                ("truth", true[i], "RdBu_r", -lim, lim),
                ("prediction", pred[i], "RdBu_r", -lim, lim),
                ("error", err, "PuOr_r", -float(np.max(np.abs(err)) or 1.0), float(np.max(np.abs(err)) or 1.0)))):
            ax = fig.add_subplot(n, 3, 3 * i + j + 1)
            im = ax.imshow(field, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, extent=ext)
            ax.set_title(f"sample {i}: {name}", fontsize=9)
            ax.set_xlabel("x", fontsize=8)
            ax.set_ylabel("t", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax).ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def _fields_2d(true, pred, x, y, t, title: str, frames: int = 3):
    """Truth, prediction and error of the first 2D trajectory (n, T, X, Y, C) at ``frames`` predicted
    frames (the first, the last, evenly between), first channel; x runs along the image's width."""
    import numpy as np
    from matplotlib.figure import Figure

    if true.shape != pred.shape or true.ndim != 5:
        raise ValueError(f"samples.npz: 2D true {true.shape} and pred {pred.shape} must both be (n, T, X, Y, C)")
    truth, guess = true[0, ..., 0], pred[0, ..., 0]
    show = np.unique(np.linspace(0, truth.shape[0] - 1, frames).round().astype(int))
    lo, hi = float(truth.min()), float(truth.max())
    ext = [x[0], x[-1], y[0], y[-1]] if len(x) > 1 and len(y) > 1 else None
    fig = Figure(figsize=(10, 2.8 * len(show) + 0.4), layout="constrained")
    for i, k in enumerate(show):
        err = guess[k] - truth[k]
        e = float(np.max(np.abs(err))) or 1.0
        when = f"t = {t[k]:.3g}" if k < len(t) else f"frame {k + 1}"
        for j, (name, f, cmap, vmin, vmax) in enumerate((("truth", truth[k], "viridis", lo, hi),
                                                          ("prediction", guess[k], "viridis", lo, hi),
                                                          ("error", err, "PuOr_r", -e, e))):
            ax = fig.add_subplot(len(show), 3, 3 * i + j + 1)
            im = ax.imshow(f.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=ext)
            ax.set_title(f"{name}, {when}", fontsize=9)
            ax.set_xlabel("x", fontsize=8)
            ax.set_ylabel("y", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax).ax.tick_params(labelsize=7)
    fig.suptitle(f"{title} (sample 0, first field)", fontsize=10)
    return fig


def _row_plots(art: Path, title: str, max_samples: int = 3) -> list[str]:
    """PNG <img> tags for one row's artifacts; raises on unreadable files (caller notes it)."""
    import numpy as np
    from matplotlib.figure import Figure

    parts: list[str] = []
    samples = art / "samples.npz"
    if samples.is_file():
        with np.load(samples) as z:
            true, pred = np.asarray(z["true"], dtype=float), np.asarray(z["pred"], dtype=float)
            x = np.asarray(z["x"], dtype=float) if "x" in z else np.arange(true.shape[2], dtype=float)
            t = np.asarray(z["t"], dtype=float) if "t" in z else np.arange(true.shape[1], dtype=float)
            y = np.asarray(z["y"], dtype=float) if "y" in z else None
        if y is not None:   # 2D fields: truth, prediction and error at a few frames
            parts.append(_fig_png(_fields_2d(true, pred, x, y, t, title)))
        elif true.shape != pred.shape or true.ndim not in (3, 4):
            raise ValueError(f"samples.npz: true {true.shape} and pred {pred.shape} must both be (n, T, X) "
                             "or (n, T, X, C)")
        else:
            parts.append(_fig_png(_space_time_1d(true, pred, x, t, title, max_samples)))
    curves = art / "curves.json"
    if curves.is_file():
        data = json.loads(curves.read_text())
        if not isinstance(data, dict):
            raise ValueError("curves.json must map a method name to a list of nRMSE per predicted frame")
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        positive = True
        for name, ys in data.items():
            ys = np.asarray(ys, dtype=float)
            ax.plot(np.arange(1, len(ys) + 1), ys, marker=".", label=str(name))
            positive &= bool(np.all(ys[np.isfinite(ys)] > 0))
        if positive and data:
            ax.set_yscale("log")
        ax.set_xlabel("predicted frame k")
        ax.set_ylabel("nRMSE")
        ax.set_title(f"nRMSE per frame: {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if data:
            ax.legend(fontsize=8)
        parts.append(_fig_png(fig))
    return parts


def _ttc_label(row: dict[str, str]) -> str:
    """A short legend label of a row's TTC settings (the `ttc` column holds them as JSON)."""
    raw = row.get("ttc", "")
    if raw in ("", "off", None):
        return "no TTC"
    try:
        t = json.loads(raw)
        return f"TTC n={t.get('n_candidates')} W={t.get('beam_width')} H={t.get('horizon')}"
    except (ValueError, AttributeError):
        return "; ".join(f"{k}={row[k]}" for k in _TTC_SETTINGS if row.get(k) not in (None, "", "off"))


def _capacity_plot(rows: list[dict[str, str]]) -> str | None:
    from matplotlib.figure import Figure

    for size_col in _SIZE_COLUMNS:
        pts = [(r, _num(r, size_col), _num(r, "nrmse")) for r in rows]
        pts = [(r, s, n) for r, s, n in pts if s is not None and n is not None and s > 0]
        if len({s for _, s, _ in pts}) < 2:
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for r, s, n in pts:
            key = " | ".join(x for x in (r.get("method", ""), _ttc_label(r)) if x)
            series.setdefault(key, []).append((s, n))
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        for key, xy in sorted(series.items()):
            xy.sort()
            ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=key)
        ax.set_xscale("log")
        ns = [n for _, _, n in pts]
        if min(ns) > 0 and max(ns) / min(ns) > 10:
            ax.set_yscale("log")
        ax.set_xlabel(size_col)
        ax.set_ylabel("nRMSE (headline)")
        ax.set_title(f"capacity curve: nRMSE vs {size_col}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        return _fig_png(fig)
    return None


def _fmt(v: str) -> tuple[str, bool]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(v or ""), False
    if v.strip().lower() in ("nan", "inf", "-inf") or not math.isfinite(f):
        return html.escape(v), True
    return (html.escape(v) if f == int(f) and "." not in v and "e" not in v.lower() else f"{f:.4g}"), True


def write_html(csv_path: str | os.PathLike, html_path: str | os.PathLike,
               columns: Sequence[str] | None = None, max_rows_with_plots: int = 50) -> Path:
    """Render the board at ``csv_path`` as one self-contained HTML page (module doc). ``columns``
    overrides the table's columns (default: the key columns present on the board). Plots are drawn
    for the latest ``max_rows_with_plots`` rows that have artifacts. Written atomically."""
    csv_p, out = Path(csv_path), Path(html_path)
    header, rows = _read(csv_p)
    cols = list(columns) if columns is not None else [c for c in _KEY_COLUMNS if c in header] or header
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ups_lightning leaderboard</title>"
             f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
             f"<h1>Leaderboard</h1><p>{len(rows)} evaluation(s) from <code>{html.escape(str(csv_p))}</code>. "
             "Metrics in physical space on the predicted frames only (benchmark.md); "
             "<code>nrmse_pdebench</code> is for comparison with published PDEBench tables only. "
             "Click a column header to sort.</p>"]
    parts.append("<table id='board'><thead><tr>" + "".join(
        f"<th onclick='sortTable({i})'>{html.escape(c)}</th>" for i, c in enumerate(cols)) + "</tr></thead><tbody>")
    for r in rows:
        cells = []
        for c in cols:
            text, numeric = _fmt(r.get(c, "") or "")
            cells.append(f"<td{'' if numeric else ' class=txt'}>{text}</td>")
        cls = " class='champion'" if r.get("label") == "champion" else ""
        parts.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")

    try:
        cap = _capacity_plot(rows)
    except Exception as exc:  # a bad cell must not cost the whole report
        cap = f"<p class='note'>capacity curve not drawn: {html.escape(repr(exc))}</p>"
    if cap:
        parts.append(f"<section><h2>Capacity</h2>{cap}</section>")

    with_art = [r for r in rows if r.get("artifacts")]
    for r in with_art[-max_rows_with_plots:] if max_rows_with_plots > 0 else []:
        title = " ".join(x for x in (r.get("run_id", ""), r.get("method", "") or r.get("model", ""),
                                     r.get("label", "")) if x) or "row"
        parts.append(f"<section><h2>{html.escape(title)}</h2>")
        art = _resolve_artifacts(r["artifacts"], csv_p)
        if art is None:
            parts.append(f"<p class='note'>artifacts not found: {html.escape(r['artifacts'])}</p>")
        else:
            try:
                imgs = _row_plots(art, title)
                parts.extend(imgs or [f"<p class='note'>no curves.json or samples.npz in {html.escape(str(art))}</p>"])
            except Exception as exc:
                parts.append(f"<p class='note'>artifacts unreadable ({html.escape(str(art))}): "
                             f"{html.escape(repr(exc))}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(parts))
    return out
