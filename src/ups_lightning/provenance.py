"""Where a result came from, the same for every driver (bench, study, proxy, TTC headroom,
throughput): each writes ``provenance.json`` beside its tables in its ``out_dir`` (docs/results/
README.md: the one results layout) with the command as typed, the commit, the package version, the
settings, the seeds, and how many times each split was scored in the process, counted where the
scoring happens (``scored``), so "test was scored N times" is a count, not a claim. Torch-free."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["git_commit", "package_version", "command_line", "scored", "splits_scored", "reset_scored",
           "write_provenance"]

PROVENANCE = "provenance.json"
_SCORED: Counter = Counter()   # split -> models or rows scored on it in this process


def git_commit() -> str:
    """The checkout's short commit (``-dirty`` with uncommitted changes to tracked files); "unknown"
    outside a checkout (then package_version says what ran)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_version() -> str:
    """The installed ups_lightning's version; the source's own when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ups_lightning")
    except PackageNotFoundError:
        from ups_lightning import __version__

        return f"{__version__} (not installed)"


def command_line() -> str:
    """This process's command line as typed (``python -m ups_lightning.bench budget_min=40 ...``)."""
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if argv and Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return shlex.join(argv)


def scored(split: str, n: int = 1) -> None:
    """Count ``n`` models (or rows) scored on ``split``: called where a split's figures are computed."""
    _SCORED[str(split)] += int(n)


def splits_scored() -> Dict[str, int]:
    return dict(_SCORED)


def reset_scored() -> None:
    """A driver's run starts counting from zero (a library caller may run several in one process)."""
    _SCORED.clear()


def write_provenance(out_dir: str | Path, driver: str, settings: Any = None, seeds: Optional[Any] = None,
                     **extra: Any) -> Path:
    """``out_dir/provenance.json`` for ``driver`` (atomically): command, commit, version, settings,
    seeds, the splits scored so far in this process and ``extra``."""
    from omegaconf import DictConfig, OmegaConf

    from ups_lightning.atomic import atomic_write_json

    if isinstance(settings, DictConfig):
        settings = OmegaConf.to_container(settings, resolve=True)
    counts = splits_scored()
    record = {"driver": driver, "command": command_line(), "git_commit": git_commit(),
              "package_version": package_version(), "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "seeds": list(seeds) if seeds is not None else None, "splits_scored": counts,
              "test_scored": counts.get("test", 0), **extra, "settings": settings}
    path = Path(out_dir) / PROVENANCE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path
