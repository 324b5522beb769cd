"""How a process of this project uses the CPU: torch threads that fit the idle cores, and an
allocator that keeps large tensors' pages. Every entry point that trains, evaluates, searches or
benchmarks calls :func:`configure_cpu` first and logs what it chose.

Why each setting (measured on the project's 2-core machine, issue 20):

- **Threads.** torch's intra-op threads collapse when another process shares the cores (encoding
  200 frames took 639 ms instead of 27 ms while one single-threaded process ran beside it), so the
  count is the number of cores idle now, at most torch's default.
- **Allocator.** glibc serves allocations above its mmap threshold (128 KiB at start, moving with
  use) from fresh pages and returns them on free, so every large temporary of a batched step pays
  a page fault per 4 KiB: a 128-trajectory decode + encode took ~23,000 minor faults and 63 ms
  per call, against ~100 faults and 44 ms with the threshold raised to 32 MiB and heap trimming
  held off. :func:`tune_allocator` does that (glibc only; elsewhere nothing).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("ups_lightning.runtime")

TORCH_DEFAULT_THREADS = torch.get_num_threads()   # at import, before anything here changes it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20                           # glibc's largest allowed on 64-bit
TRIM_THRESHOLD = 256 << 20
_allocator_tuned: Optional[bool] = None


def tune_allocator() -> bool:
    """Keep large tensors' pages in the process (module doc); True where glibc took the settings.
    Idempotent; ``UPS_NO_MALLOPT=1`` leaves the allocator alone."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("UPS_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (macOS, musl without mallopt)
        return False
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _allocator_tuned


def free_cores(window_s: float = 0.25) -> int:
    """Cores idle right now: this process's usable cores minus the busy share of all cores over
    ``window_s`` seconds (Linux /proc/stat; elsewhere the usable cores)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores(window_s)
    if busy is None:
        return usable
    return max(1, min(usable, round(usable - busy)))


def busy_cores(window_s: float = 0.25) -> Optional[float]:
    """How many cores' worth of CPU all processes used over ``window_s`` seconds (None where
    /proc/stat cannot be read)."""

    def ticks() -> Optional[tuple]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)   # total, idle + iowait
    a = ticks()
    time.sleep(window_s)
    b = ticks()
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (1.0 - (b[1] - a[1]) / (b[0] - a[0])) * (os.cpu_count() or 1)


def set_num_threads(requested: Optional[int], setting: str = "trainer.num_threads") -> int:
    """torch's intra-op threads: ``requested``, or (null) as many as cores are idle now, at most
    torch's default. Threads on busy cores collapse (a rollout measured 55x slower when another
    process shared the two cores), so a shared machine gets fewer threads. Logged, naming the
    ``setting`` that fixes the count."""
    if requested:
        torch.set_num_threads(int(requested))
        log.info("torch threads: %d (%s)", requested, setting)
        return int(requested)
    default = TORCH_DEFAULT_THREADS
    free = free_cores() if default > 1 else 1
    n = max(1, min(default, free))
    torch.set_num_threads(n)
    log.info("torch threads: %d (%d cores idle of %d, torch default %d; set %s to fix it)",
             n, free, os.cpu_count() or 1, default, setting)
    return n


#: Lightning's start-up lines that say nothing a user acts on ("GPU available: False", "`Trainer(
#: limit_train_batches=1.0)` was configured ...", "Loading `train_dataloader` ..."); warnings stay
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",      # torch vs Lightning's pytree
          r"The number of training batches \(\d+\) is smaller than the logging interval.*")


def quiet_lightning() -> None:
    """Lightning's informational boilerplate off (our own log says what ran and where its results
    are); its warnings and errors, and every line of ours, stay."""
    import warnings

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def configure_cpu(requested_threads: Optional[int], setting: str) -> int:
    """What every entry point does first: the allocator tuned, the threads chosen (both logged),
    Lightning's boilerplate silenced (``quiet_lightning``)."""
    quiet_lightning()
    tuned = tune_allocator()
    log.info("allocator: %s", "large blocks kept (mallopt)" if tuned else "system default")
    return set_num_threads(requested_threads, setting)
