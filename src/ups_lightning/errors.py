"""User-facing errors: one clear paragraph, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (a file, key or setting). The message names what was wrong and
    what was expected; CLIs print it as one paragraph and exit with code 2."""


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

    return wrapper  # type: ignore[return-value]


def _drop_empty_hydra_dir() -> None:
    """A refused command leaves nothing behind: Hydra's run directory (made before the command
    could check its settings) is removed when it holds only empty files, and so is its parent
    (``logs/``) when that is then empty."""
    import contextlib
    from pathlib import Path

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:   # not under @hydra.main, or no run directory
        return
    if not out.is_dir() or any(f.is_dir() or f.stat().st_size for f in out.iterdir()):
        return
    with contextlib.suppress(OSError):
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
        out.parent.rmdir()      # only when empty
