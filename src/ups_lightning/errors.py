"""User-facing errors: one clear paragraph, a non-zero exit, no traceback."""
from __future__ import annotations

import errno
import functools
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (a file, key or setting). The message names what was wrong and
    what was expected; CLIs print it as one paragraph and exit with code 2."""


_SCRIPTS: Optional[Dict[str, str]] = None


def _console_scripts() -> Dict[str, str]:
    """module -> console script of the installed package (``ups_lightning.train`` -> ``ups-train``)."""
    global _SCRIPTS
    if _SCRIPTS is None:
        from importlib.metadata import entry_points

        try:
            eps = entry_points(group="console_scripts")
        except Exception:   # broken metadata of an unrelated distribution: name modules instead
            eps = []
        _SCRIPTS = {}
        for ep in eps:
            module = ep.value.split(":")[0].strip()
            if module.startswith("ups_lightning"):
                _SCRIPTS[module.removesuffix(".__main__")] = ep.name
    return _SCRIPTS


def command(module: str) -> str:
    """How a message names the command of ``module`` (``ups_lightning.train``): in the user's own
    way. Started by a console script (``ups-train ...``): that package's script for it; started as
    ``python -m ...`` (a checkout, make): ``python -m module``."""
    if os.path.basename(sys.argv[0] if sys.argv else "").startswith("ups-"):
        script = _console_scripts().get(module)
        if script:
            return script
    return f"python -m {module}"


#: file-system faults a user can mend (a full disk or quota, a read-only file system): one paragraph
DISK_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def disk_fault_message(exc: OSError) -> str:
    where = exc.filename or "a file"
    fix = {errno.EROFS: "make that file system writable or point run_dir / out_dir / leaderboard elsewhere"}.get(
        exc.errno, "free space on that file system (or point run_dir / out_dir / leaderboard elsewhere)")
    return (f"{exc.strerror or exc} while writing {where}: {fix}, then rerun the same command. Records, "
            "caches and reports are written to a temporary file and moved into place, so none is half-written; "
            "finished stages are reused, and a stage that was cut off resumes from its last checkpoint (one "
            "cut off while it was written is set aside and the stage starts over).")


_STARTED = time.time()   # when this process imported us: a directory made later is this process's


def report_user_errors(fn: F) -> F:
    """Wrap a CLI entry point (under ``@hydra.main`` too): a UserError becomes ``error: ...`` on
    stderr and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _drop_empty_hydra_dir()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as exc:
            if exc.errno not in DISK_FAULTS:
                raise
            print(f"error: {disk_fault_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def _drop_empty_hydra_dir() -> None:
    """A refused command leaves nothing behind: Hydra's run directory (made before the command
    could check its settings: bench and study log under their out_dir) is removed when this process
    made it (it appeared after the process started), it holds only empty files, and it is neither
    the current directory nor above it; its parent goes too when it is an emptied ``logs/``."""
    import contextlib
    from pathlib import Path

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir).resolve()
    except Exception:   # not under @hydra.main, or no run directory
        return
    here = Path.cwd().resolve()
    if out == here or out in here.parents or not out.is_dir() or out.stat().st_mtime < _STARTED:
        return
    if any(f.is_dir() or f.stat().st_size for f in out.iterdir()):
        return
    with contextlib.suppress(OSError):
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
        if out.parent.name == "logs" and out.parent != here:
            out.parent.rmdir()      # only when empty
