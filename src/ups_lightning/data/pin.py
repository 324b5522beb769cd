"""What a run was trained on, pinned: per equation, the data file's absolute path, its size, and per
split a digest of its row indices and of a few of its rows (read after reduction, so the digest
follows the content, never the file's modification time). Each stage record keeps the pin;
skipping a finished stage and evaluating the run's own data compare it with the data there now, so a
replaced file or an edited split is refused instead of scored as if it were the same, and a
relative ``data.path`` is read from where training read it, whatever the current directory.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["view_pin", "run_pin", "pin_mismatch"]

#: rows read per split for the content digest: first, middle, last
ROWS_PER_SPLIT = 3


def view_pin(view: Any) -> Dict[str, Any]:
    """The pin of one data view (``data.pdebench.DatasetView``)."""
    digests = {}
    with view.open() as f:
        for split, idx in sorted(view.splits.items()):
            idx = np.asarray(idx, dtype=np.int64)
            h = hashlib.sha256(idx.tobytes())
            if idx.size:
                picks = idx[np.unique(np.linspace(0, idx.size - 1, ROWS_PER_SPLIT).round().astype(int))]
                h.update(np.ascontiguousarray(f.read(picks), dtype=np.float32).tobytes())
            digests[split] = {"rows": int(idx.size), "sha256": h.hexdigest()[:16]}
    path = Path(view.path).resolve()
    return {"path": str(path), "size": os.path.getsize(path), "splits": digests}


def run_pin(data: Any) -> Dict[str, Dict[str, Any]]:
    """The pin of a run's data (``data.datamodule.RunData``): one entry per equation."""
    return {view.pde: view_pin(view) for view in data.views}


def pin_mismatch(pinned: Optional[Dict[str, Any]], now: Dict[str, Any]) -> Optional[str]:
    """What differs between a recorded pin (of one equation) and the data now, or None. A moved file
    of the same content is the same data; records made before pins existed (None) pass."""
    if not pinned:
        return None
    if pinned.get("size") != now.get("size"):
        return f"the file's size is {now.get('size')} bytes, it was {pinned.get('size')}"
    for split, was in (pinned.get("splits") or {}).items():
        cur = (now.get("splits") or {}).get(split)
        if cur is None:
            return f"split {split!r} is gone"
        if cur["rows"] != was["rows"]:
            return f"split {split!r} has {cur['rows']} rows, it had {was['rows']}"
        if cur["sha256"] != was["sha256"]:
            return f"split {split!r} holds other rows or other values than it did"
    return None
