"""Atomic writes: a temporary file beside the target, then os.replace. A reader never sees half a
file, and an interrupted write leaves the target as it was (and no temporary file behind). And the
digest a written file is recorded and verified by (``sha256_file``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block finishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_writable_dir(path: str | os.PathLike, setting: str) -> None:
    """Before any work: ``path`` is (or can become) a directory this process can write into, else a
    UserError naming ``setting``. A symlink loop, a file in the way or a read-only parent would
    otherwise be a traceback, and for an evaluation only after the whole rollout."""
    from ups_lightning.errors import UserError

    p = Path(path)
    try:
        p.resolve(strict=False)
        probe = p
        while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
            probe = probe.parent
    except (OSError, RuntimeError) as exc:      # a symlink loop: RuntimeError or ELOOP
        raise UserError(f"{setting}={path} cannot be resolved ({exc}); a symlink loop? Name another directory.") from None
    if probe.is_symlink() and not probe.exists():
        raise UserError(f"{setting}={path}: {probe} is a broken symbolic link; name another directory.")
    if not probe.is_dir():
        raise UserError(f"{setting}={path}: {probe} is a file, not a directory; name a directory.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={path}: {probe} is not writable by this user; name a directory you can "
                        "write to (or fix its permissions).")
