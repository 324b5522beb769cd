"""Data sets of trajectories from an equation's reference solver, over a process pool.

Which equation, initial conditions and scheme: the spec (``ups_lightning.pdes``). Here: chunking,
workers that exit with their parent, Ctrl-C handling and progress. Every solver is row-local, so a
row's values do not depend on its chunk or on ``workers``.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from typing import Iterator, Mapping, Sequence

import numpy as np

from ups_lightning.pdes import get_pde

__all__ = ["generate_trajectories", "iter_trajectory_chunks"]


def _solve_chunk(pde: str, params: dict, seeds: np.ndarray, nx: int, t_save: np.ndarray) -> np.ndarray:
    spec = get_pde(pde)
    u0 = spec.initial_conditions(seeds, nx)
    return spec.solve(u0, params, t_save).astype(np.float32)


_PARENT_POLL_S = 0.2


def _exit_with_parent(parent_pid: int) -> None:
    """Worker-side watchdog: a parent killed outright (SIGKILL, OOM killer) cannot stop its pool,
    and a worker would finish its chunk and then wait forever on the task queue. When the worker
    is re-parented (its parent pid changes), it exits at once."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(_PARENT_POLL_S)


def _init_worker(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                     name="exit-with-parent").start()


def _chunks(pde: str, n: int, nx: int, seeds: np.ndarray, workers: int, chunk: int | None):
    """Index groups of similar initial max|u| (similar step counts), slowest first."""
    umax = np.abs(get_pde(pde).initial_conditions(seeds, nx)).reshape(n, -1).max(axis=1)
    order = np.argsort(-umax, kind="stable")
    if chunk is None:
        chunk = int(min(64, max(8, math.ceil(n / (4 * max(1, workers))))))
    return [order[i:i + chunk] for i in range(0, n, chunk)]


def iter_trajectory_chunks(
    pde: str,
    params: Mapping[str, float],
    n: int,
    nx: int,
    nt: int,
    t_max: float,
    seeds: Sequence[int] | np.ndarray,
    workers: int = 2,
    chunk: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(row_indices, fields)`` with fields (len(rows), nt, nx, C) float32, as chunks finish.

    Rows are grouped by the size of their initial condition so that a chunk's trajectories need
    similar numbers of steps; each row's values are independent of its chunk and of ``workers``.
    """
    seeds = np.asarray(seeds).reshape(-1)
    if seeds.shape[0] != n:
        raise ValueError(f"got {seeds.shape[0]} seeds for n={n}")
    t_save = np.linspace(0.0, float(t_max), int(nt))
    params = dict(params)
    groups = _chunks(pde, n, nx, seeds, workers, chunk)
    if workers <= 1 or len(groups) <= 1:
        for rows in groups:
            yield rows, _solve_chunk(pde, params, seeds[rows], nx, t_save)
        return
    ctx = mp.get_context("spawn")   # no fork: safe beside torch/OpenMP threads
    ex = ProcessPoolExecutor(max_workers=min(workers, len(groups)), mp_context=ctx,
                             initializer=_init_worker, initargs=(os.getpid(),))
    try:
        # Workers ignore Ctrl-C; the parent gets it and stops them on the way out. SIGINT stays
        # blocked while they start (they inherit the mask), so a Ctrl-C then cannot make them
        # print tracebacks; the parent receives it as soon as the mask is restored.
        with _sigint_blocked():
            futures = {ex.submit(_solve_chunk, pde, params, seeds[rows], nx, t_save): rows
                       for rows in groups}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    except BaseException:    # error, Ctrl-C, or the consumer stopped early: stop the workers now
        for proc in list((getattr(ex, "_processes", None) or {}).values()):
            proc.terminate()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


@contextmanager
def _sigint_blocked():
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # multiprocessing's resource tracker unblocks SIGINT when it starts: start it first
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def generate_trajectories(
    pde: str,
    params: Mapping[str, float],
    n: int,
    nx: int,
    nt: int,
    t_max: float,
    seeds: Sequence[int] | np.ndarray,
    workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """``n`` trajectories (n, nt, nx, C) float32 of equation ``pde`` on (0, 1), frames at
    linspace(0, t_max, nt). Trajectory i starts from the spec's initial condition for ``seeds[i]``. Solved in chunks over a process
    pool of ``workers`` (1: in-process); results are bit-identical for any ``workers``.
    """
    out = np.empty((n, nt, nx, get_pde(pde).n_channels), dtype=np.float32)
    bar = _progress_bar(progress, "trajectories", n)
    with bar as (prog, task):
        for rows, fields in iter_trajectory_chunks(pde, params, n, nx, nt, t_max, seeds, workers):
            out[rows] = fields
            if prog is not None:
                prog.advance(task, len(rows))
    return out


def _progress_bar(enabled: bool, label: str, total: int):
    """Context manager yielding (progress, task) or (None, None) when disabled."""
    if not enabled:
        return nullcontext((None, None))
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    class _Bar:
        def __enter__(self):
            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                              transient=False)
            self.p.__enter__()
            return self.p, self.p.add_task(label, total=total)

        def __exit__(self, *exc):
            return self.p.__exit__(*exc)

    return _Bar()
