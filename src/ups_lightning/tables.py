"""Tables of result rows (plain dicts), written the one way every report here writes them: CSV with
named columns first, and markdown cells formatted by a per-column format."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, Sequence

from ups_lightning.atomic import atomic_write_text


def format_cell(value: Any, fmt: str) -> str:
    """One markdown cell: '-' for a missing or NaN value, else ``fmt`` ('{:,}' takes integers)."""
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


def write_csv(path: Path, rows: Sequence[Dict[str, Any]], first: Sequence[str] = ()) -> Path:
    """Rows as CSV (atomically): the ``first`` columns in that order, then every other key sorted."""
    cols = list(first) + sorted({k for r in rows for k in r} - set(first))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(path, buf.getvalue())
    return path
