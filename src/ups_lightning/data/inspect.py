"""Describe and check a PDEBench-layout data file.

    python -m ups_lightning.data.inspect FILE [--reduced-resolution N] [--reduced-resolution-t N]
                                              [--full | --rows K]

Prints the equation and its parameters, the shape, domain, dx, dt, the value range, and the splits when a manifest lies beside
the file; checks that values are finite over a bounded sample of rows (evenly spread, first and
last included) or, with ``--full``, over every row. Reads in bounded blocks, never the whole file.
PDEBench's 2D layouts (groups per sample, per-field CFD: data/pdebench2d.py) are shown too: their
layout, fields, grid, times and the equation they hold (when one registered 2D equation does).
Exit code 2 with a one-paragraph ``error:`` on bad input.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ups_lightning.pdes import get_pde
from ups_lightning.errors import UserError, report_user_errors, command
from ups_lightning.data.pdebench import PDEBenchFile, is_2d_file, load_manifest, manifest_path

__all__ = ["main", "inspect_file", "sample_rows"]


def sample_rows(n: int, k: int) -> np.ndarray:
    """At most ``k`` rows of ``n``, evenly spread, first and last included."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(2, k)).round().astype(np.int64))


def _values(blocks) -> tuple:
    lo, hi, total, count = np.inf, -np.inf, 0.0, 0
    for _, data in blocks:      # the readers raise UserError on NaN/Inf, naming the row
        lo = min(lo, float(data.min()))
        hi = max(hi, float(data.max()))
        total += float(data.sum(dtype=np.float64))
        count += data.size
    return lo, hi, total / max(1, count)


def inspect_file(path: str, reduced_resolution: int = 1, reduced_resolution_t: int = 1,
                 full: bool = False, rows: int = 64, pde: str | None = None) -> dict:
    """Collect the facts ``main`` prints (also handy in tests)."""
    t0 = time.perf_counter()
    if is_2d_file(path):
        from ups_lightning.data.pdebench2d import PDEBench2DFile

        with PDEBench2DFile(path, reduced_resolution, reduced_resolution_t, pde) as f:
            m = f.meta
            idx = np.arange(m.n_samples) if full else sample_rows(m.n_samples, rows)
            lo, hi, mean = _values(f.iter_blocks(idx))
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.h5.attrs.items()}
        return {"path": str(path), "layout": m.layout, "meta": m, "attrs": attrs, "rows_checked": int(idx.size),
                "full": bool(full or idx.size == m.n_samples), "min": lo, "max": hi, "mean": mean,
                "manifest": load_manifest(path), "seconds": time.perf_counter() - t0}
    with PDEBenchFile(path, reduced_resolution, reduced_resolution_t, pde) as f:
        m = f.meta
        idx = np.arange(m.n_samples) if full else sample_rows(m.n_samples, rows)
        lo, hi, mean = _values(f.iter_blocks(idx))
        file_shape = f._ds.shape
        dtype = str(f._ds.dtype)
    return {
        "path": str(path), "layout": "tensor", "file_shape": tuple(int(s) for s in file_shape), "dtype": dtype,
        "meta": m, "rows_checked": int(idx.size), "full": bool(full or idx.size == m.n_samples),
        "min": lo, "max": hi, "mean": mean, "manifest": load_manifest(path),
        "seconds": time.perf_counter() - t0,
    }


def _report_2d(info: dict) -> list:
    m = info["meta"]
    stated = ", ".join(f"{k} = {v}" for k, v in info["attrs"].items()) or "none"
    return [
        f"file        {info['path']}",
        f"layout      PDEBench 2D, {'one group per sample' if m.layout == 'groups' else 'one dataset per field'}"
        f" ({m.layout}); fields {', '.join(m.fields)}",
        f"reduction   reduced_resolution={m.reduced_resolution}, reduced_resolution_t={m.reduced_resolution_t}",
        f"shape       (N, T, X, Y, C) = {m.shape} after reduction",
        f"grid        x in [{m.x[0]:.6g}, {m.x[-1]:.6g}] (dx = {m.dx:.6g}), y in [{m.y[0]:.6g}, {m.y[-1]:.6g}] "
        f"(dy = {m.dy:.6g}), cell centres",
        f"t           [{m.t[0]:.6g}, {m.t[-1]:.6g}], {m.n_t} frames, dt = {m.dt:.6g}",
        f"attributes  {stated}",
        f"equation    {m.pde + ' (' + get_pde(m.pde).title + ')' if m.pde else 'none this project knows (it reads; training needs one)'}",
    ]


def _report(info: dict) -> str:
    m = info["meta"]
    if info.get("layout") != "tensor":
        lines = _report_2d(info)
    else:
        lines = _report_1d(info)
    lines += [
        f"values      min {info['min']:.6g}, max {info['max']:.6g}, mean {info['mean']:.6g} "
        f"over {'all' if info['full'] else 'a sample of'} {info['rows_checked']} rows",
        f"check       finite over {info['rows_checked']} of {m.n_samples} rows: OK"
        + ("" if info["full"] else " (use --full to check every row)"),
    ]
    return "\n".join(lines + _manifest_lines(info))


def _report_1d(info: dict) -> list:
    m = info["meta"]
    return [
        f"file        {info['path']}",
        f"tensor      {info['file_shape']} {info['dtype']} in the file",
        f"reduction   reduced_resolution={m.reduced_resolution}, "
        f"reduced_resolution_t={m.reduced_resolution_t}",
        f"shape       (N, T, X, C) = {m.shape} after reduction",
        f"domain      x in ({m.x_left:.6g}, {m.x_left + m.domain_length:.6g}), "
        f"L = {m.domain_length:.6g}, periodic, cell centres",
        f"dx          {m.dx:.6g}",
        f"t           [{m.t[0]:.6g}, {m.t[-1]:.6g}], {m.n_t} frames, dt = {m.dt:.6g}",
        f"equation    {m.pde}: {get_pde(m.pde).equation}",
        f"parameters  " + (", ".join(f"{k} = {v:g}" for k, v in m.params.items()) or "not stated")
        + "".join(f"; {p} not stated (set data.params.{p})" for p in get_pde(m.pde).param_names
                  if p not in m.params),
    ]


def _manifest_lines(info: dict) -> list:
    lines = []
    man = info["manifest"]
    if man is None:
        lines.append("manifest    none (splits will come from index ranges: train first, "
                     "val next, test last)")
    else:
        sp = ", ".join(f"{k} {v['stop'] - v['start']} (rows {v['start']}..{v['stop'] - 1})"
                       for k, v in man["splits"].items() if v["stop"] > v["start"])
        lines.append(f"manifest    {manifest_path(info['path']).name}")
        lines.append(f"splits      {sp}")
        gen = man.get("generation")
        if isinstance(gen, dict) and gen:
            lines.append(f"generated   {gen.get('finished', '?')} in {gen.get('seconds', '?')} s "
                         f"by ups_lightning {gen.get('package_version', '?')}")
        norms = man.get("normalization") or []
        for e in norms if isinstance(norms, list) else [norms]:
            # informational only (the reader recomputes what it cannot use): report, never fail
            try:
                lines.append(f"normaliser  train rows {e['rows'][0]}..{e['rows'][1] - 1} at "
                             f"reduction ({e['reduced_resolution']}, {e['reduced_resolution_t']}): "
                             f"mean {e['mean']}, std {e['std']}")
            except (KeyError, IndexError, TypeError):
                lines.append(f"normaliser  unreadable manifest entry {str(e)[:60]!r} (ignored: "
                             f"statistics are recomputed from the file)")
    return lines


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=command("ups_lightning.data.inspect"),
                                 description="Describe and check a PDEBench-layout HDF5 file.")
    ap.add_argument("file")
    ap.add_argument("--reduced-resolution", type=int, default=1, metavar="N")
    ap.add_argument("--reduced-resolution-t", type=int, default=1, metavar="N")
    ap.add_argument("--full", action="store_true", help="check every row (reads the whole file)")
    ap.add_argument("--rows", type=int, default=64, metavar="K",
                    help="rows to check without --full (default 64)")
    ap.add_argument("--pde", default=None, help="the equation (default: what the file says)")
    args = ap.parse_args(argv)
    if args.rows < 1:
        raise UserError(f"--rows {args.rows}: need at least 1 row.")
    info = inspect_file(args.file, args.reduced_resolution, args.reduced_resolution_t,
                        full=args.full, rows=args.rows, pde=args.pde)
    print(_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
