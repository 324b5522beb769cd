"""Observed order of accuracy of each equation's reference solver under refinement.

``python -m ups_lightning.bench.solver_order [--pde NAME ...] [--grids 32 64 ...]``

Equation-agnostic: every registered spec that declares convergence problems (a method
``order_cases()`` on the spec, in ``pdes/``) is measured; a spec without one is listed as such. Each
problem is a dict

- ``title``: what is solved and what it is compared with (an exact or independent solution);
- ``run``: ``run(n) -> (numerical (X,), reference (X,), wall seconds of the solve)``;
- ``sizes`` (optional): the refinement sequence; default the grids (cells) given on the command line;
- ``first`` (optional): the first column's heading (default ``grid (cells)``; e.g. ``steps`` for a
  refinement in time on a fixed grid).

Prints a markdown table per problem: the L1, L2 (RMS) and Linf errors, the observed order between
successive sizes (log(e_prev / e) / log(n / n_prev)) and the solve's wall time.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from ups_lightning.pdes import registered

__all__ = ["GRIDS", "cases_of", "measure", "markdown_table", "main"]

GRIDS = (32, 64, 128, 256, 512)


def cases_of(spec: Any) -> List[Dict[str, Any]]:
    """The spec's declared convergence problems (empty when it declares none)."""
    declare = getattr(spec, "order_cases", None)
    return list(declare()) if callable(declare) else []


def measure(run: Callable[[int], tuple], sizes: Sequence[int]) -> List[Dict[str, float]]:
    """One row per size: errors (L1, L2 = RMS, Linf), observed orders against the previous size
    (NaN on the first, or where an error is 0) and the solve's wall time."""
    rows: List[Dict[str, float]] = []
    for n in sizes:
        u, ref, wall = run(int(n))
        err = np.asarray(u, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        row = {"n": int(n), "l1": float(np.mean(np.abs(err))), "l2": float(np.sqrt(np.mean(err**2))),
               "linf": float(np.abs(err).max()), "wall_s": float(wall)}
        for norm in ("l1", "l2", "linf"):
            prev = rows[-1] if rows else None
            ok = prev is not None and row[norm] > 0 and prev[norm] > 0
            row[f"order_{norm}"] = (math.log(prev[norm] / row[norm]) / math.log(n / prev["n"])
                                    if ok else math.nan)
        rows.append(row)
    return rows


def markdown_table(title: str, rows: List[Dict[str, float]], first: str = "grid (cells)") -> str:
    def order(v: float) -> str:
        return "" if math.isnan(v) else f"{v:.2f}"

    lines = [f"**{title}**", "",
             f"| {first} | L1 error | L2 error | Linf error | order L1 | order L2 | order Linf | wall (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['l1']:.3e} | {r['l2']:.3e} | {r['linf']:.3e} | "
                     f"{order(r['order_l1'])} | {order(r['order_l2'])} | {order(r['order_linf'])} | "
                     f"{r['wall_s']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    specs = registered()
    parser = argparse.ArgumentParser(prog="python -m ups_lightning.bench.solver_order",
                                     description="Observed order of accuracy of the reference solvers.")
    parser.add_argument("--pde", nargs="+", choices=sorted(specs), default=list(specs),
                        help="equations to measure (default: all registered)")
    parser.add_argument("--grids", nargs="+", type=int, default=list(GRIDS),
                        help="grids in cells, increasing (default: 32 64 128 256 512)")
    args = parser.parse_args(argv)
    grids = list(args.grids)
    if any(g < 8 for g in grids) or any(b <= a for a, b in zip(grids, grids[1:])):
        parser.error("--grids must be increasing and each >= 8")
    start = time.perf_counter()
    print(f"Solver order of accuracy (python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; the "
          f"solvers' numpy element-wise and FFT work runs on one thread)\n")
    for name in args.pde:
        cases = cases_of(specs[name])
        if not cases:
            print(f"*{name}: the spec declares no convergence problem (no `order_cases`).*\n")
            continue
        for case in cases:
            rows = measure(case["run"], case.get("sizes") or grids)
            print(markdown_table(case["title"], rows, case.get("first", "grid (cells)")))
            print()
    print(f"Total wall time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
