"""Progress bars for the long loops outside training (evaluation's modes, the TTC search), as
training has Lightning's: tqdm on an interactive terminal (``auto``), or always (``tqdm``), or never
(``none``). Off a terminal (a log file, a pipe, CI) the log lines say where a run is instead."""
from __future__ import annotations

import sys
from typing import Any

PROGRESS_BARS = ("auto", "tqdm", "none")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(what: str, total: int, unit: str, mode: str = "auto") -> Any:
    """A bar over ``total`` ``unit``s labelled ``what`` (``update(n)``, ``close()``), or one that draws
    nothing when ``mode`` says so (``auto``: only when stderr is a terminal)."""
    if mode not in PROGRESS_BARS:
        raise ValueError(f"progress bar mode {mode!r}: expected one of {PROGRESS_BARS}")
    show = mode == "tqdm" or (mode == "auto" and sys.stderr.isatty())
    if not show or total <= 0:
        return _NoBar()
    from tqdm import tqdm

    # leave=False: a finished mode's bar gives way to the next; the log keeps its duration
    return tqdm(total=total, desc=what, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
