"""2D data sets of any 2D spec (issue 25), as a library: PDEBench's groups layout
(``data/pdebench2d.py``: one group per sample, ``data`` (T, X, Y, C) float32, ``grid/x``, ``grid/y``,
``grid/t``) plus ``<file>.manifest.json`` beside it, the 1D data sets' manifest (splits, seeds,
settings, training-split normalisation, solver, generation time).

Rows are [train | val | test] and take the 1D data sets' seeds (``generation.split_seeds``: one
disjoint seed range per split, so a split's rows do not change when another split grows). Row i is
the spec's initial condition for its seed, solved by the spec at ``linspace(0, t_max, nt)`` on the
spec's ``domain`` (cell centres of ``((x_lo, x_hi), (y_lo, y_hi))``). Rows are solved and written one
at a time: a PDEBench-sized sample (128 x 128 cells x 101 frames) is ~13 MB, a data set GBs.

The file appears only complete (``write_groups_file`` is atomic), its manifest right after, and an
old manifest never sits beside new data. An existing file whose manifest matches the requested
settings is kept (``force=True`` remakes it), as ``generation.write_dataset`` does.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ups_lightning.data.generation import (_MAX_SEED, _SPLIT_CAPACITY, _check_stop, _flag, _num, prepare_target,
                                           seeds_record, split_seeds)
from ups_lightning.data.pdebench import MANIFEST_FORMAT, SPLITS, compute_normalizer, manifest_path, write_manifest
from ups_lightning.data.pdebench2d import PDEBench2DFile, write_groups_file
from ups_lightning.data.solver import iter_trajectory_chunks
from ups_lightning.errors import UserError
from ups_lightning.pdes.initial import cell_centres
from ups_lightning.provenance import package_version

__all__ = ["write_dataset_2d"]

log = logging.getLogger(__name__)


def _settings(spec: Any, shape: Any, nt: Any, t_max: Any, seed: Any, counts: Any, params: Any) -> dict:
    """The validated settings, JSON-normal (so a manifest read back compares equal)."""
    if getattr(spec, "spatial_dims", None) != 2:
        raise UserError(f"write_dataset_2d makes 2D data sets, but equation {getattr(spec, 'name', spec)!r} "
                        f"has spatial_dims={getattr(spec, 'spatial_dims', None)!r} (expected 2).")
    try:
        (x_lo, x_hi), (y_lo, y_hi) = spec.domain
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{spec.name}: a 2D spec states domain = ((x_lo, x_hi), (y_lo, y_hi))") from None
    if not np.isclose(x_hi - x_lo, y_hi - y_lo):    # a spec's bug, not a setting
        raise ValueError(f"{spec.name}: domain {spec.domain} is not square; solve takes one domain length")
    if isinstance(shape, (str, bytes, Mapping)) or not hasattr(shape, "__len__") or len(shape) != 2:
        raise UserError(f"setting shape={shape!r} must be two integers (ny, nx), each >= 4.")
    ny, nx = (_num(f"shape[{i}]", v, int, minimum=4, why=f"cells in {axis}; shape is (ny, nx)")
              for i, (v, axis) in enumerate(zip(shape, "yx")))
    if not isinstance(counts, Mapping):
        raise UserError(f"setting counts={counts!r} must map splits (train, val, test) to numbers of rows.")
    unknown = sorted(str(k) for k in counts if k not in SPLITS)
    if unknown:
        raise UserError(f"setting counts names {', '.join(unknown)}; the splits are {', '.join(SPLITS)}.")
    rows = {s: _num(f"counts[{s!r}]", counts.get(s, 0), int, minimum=0, why=f"rows of the {s} split")
            for s in SPLITS}
    for split, cap in _SPLIT_CAPACITY.items():
        if rows[split] > cap:
            raise UserError(f"setting counts[{split!r}]={rows[split]}: at most {cap} {split} rows (the "
                            f"splits' seed ranges would overlap).")
    if sum(rows.values()) < 1:
        raise UserError(f"setting counts={dict(counts)!r} must hold at least one row (train + val + test >= 1).")
    if params is not None and not isinstance(params, Mapping):
        raise UserError(f"setting params={params!r} must map parameter names to values "
                        f"({', '.join(spec.param_names) or 'none'}).")
    settings = {
        "pde": spec.name,
        "params": spec.check_params({**spec.default_params(), **dict(params or {})}, "setting params"),
        "shape": [ny, nx],
        "nt": _num("nt", nt, int, minimum=2, why="saved frames, including t = 0"),
        "t_max": _num("t_max", t_max, float, positive=True, why="the last frame's time"),
        "seed": _num("seed", seed, int, minimum=0, maximum=_MAX_SEED),
        "counts": rows,
        "domain": [[float(x_lo), float(x_hi)], [float(y_lo), float(y_hi)]],
        # what changes the numbers, as the 1D settings (not the solver's prose, such as its measured order)
        **{k: spec.solver_settings[k] for k in ("scheme", "cfl") if k in spec.solver_settings},
        "initial_condition": spec.recipe_id,
    }
    return json.loads(json.dumps(settings))


def _is_current(path: Path, manifest: dict | None, settings: dict, n_channels: int) -> bool:
    if manifest is None or manifest.get("settings") != settings:
        return False
    if manifest.get("file_bytes") != path.stat().st_size:
        return False
    ny, nx = settings["shape"]
    try:
        with PDEBench2DFile(path) as f:
            return f.meta.shape == (sum(settings["counts"].values()), settings["nt"], nx, ny, n_channels)
    except UserError:
        return False


class _SolvedRows:
    """The rows as ``(row, (T, Y, X, C))`` pairs, solved when the writer asks for them: one at a time
    by ``spec`` in this process (``workers=1``), or over a pool of ``workers`` processes that solve by
    the registered equation's name (data/solver.py; the solvers are row-local, so a row's values do
    not depend on the pool)."""

    def __init__(self, spec: Any, seeds: np.ndarray, settings: dict, workers: int) -> None:
        self.spec, self.seeds, self.settings, self.workers = spec, seeds, settings, workers

    def __len__(self) -> int:
        return int(self.seeds.size)

    def _chunks(self) -> Iterator[tuple]:
        s, shape = self.settings, tuple(self.settings["shape"])
        if self.workers > 1:
            # two rows per task: a 128 x 128 sample of 101 frames is 13 MB of float32
            yield from iter_trajectory_chunks(self.spec.name, s["params"], len(self), shape, s["nt"], s["t_max"],
                                              self.seeds, workers=self.workers, chunk=2)
            return
        t = np.linspace(0.0, s["t_max"], s["nt"])
        (x_lo, x_hi), _ = s["domain"]
        for i, seed in enumerate(self.seeds):
            u0 = self.spec.initial_conditions([int(seed)], shape)
            yield [i], self.spec.solve(u0, s["params"], t, x_hi - x_lo)

    def __iter__(self) -> Iterator[tuple]:
        n, done, start = len(self), 0, time.perf_counter()
        chunks = self._chunks()
        with contextlib.closing(chunks):
            for rows, fields in chunks:
                _check_stop()       # the CLI's signal handler, polled as the 1D writer does
                yield from zip(rows, fields)
                done += len(rows)
                log.info("%s: %d/%d samples solved after %.1f s", self.spec.name, done, n,
                         time.perf_counter() - start)


def write_dataset_2d(spec: Any, path: str | os.PathLike, *, shape: Any, nt: int, t_max: float, seed: int,
                     counts: Mapping[str, int], params: Mapping[str, float] | None = None,
                     force: bool = False, workers: int = 1) -> dict:
    """Make (or keep, when current) the 2D data file at ``path`` and its manifest; return the manifest.

    ``shape`` is (ny, nx), the solvers' order (the file stores x first); ``counts`` maps train, val and
    test to their rows (a missing split has none); ``params`` default to the spec's own; ``workers``
    solver processes (1: in this process; a registered equation's name is all a worker receives)."""
    settings = _settings(spec, shape, nt, t_max, seed, counts, params)
    workers = _num("workers", workers, int, minimum=1)
    force = _flag("force", force, False)
    target = Path(path)
    kept = prepare_target(target, lambda m: _is_current(target, m, settings, spec.n_channels), force, log.info)
    if kept is not None:
        return kept

    rows = settings["counts"]
    seeds_by_split = split_seeds(settings["seed"], rows)
    seeds = np.concatenate([seeds_by_split[s] for s in SPLITS])
    starts = np.cumsum([0] + [rows[s] for s in SPLITS])
    splits = {s: {"start": int(starts[i]), "stop": int(starts[i + 1])} for i, s in enumerate(SPLITS)}
    (ny, nx), ((x_lo, x_hi), (y_lo, y_hi)) = settings["shape"], settings["domain"]
    x, y = cell_centres(nx, x_lo, x_hi - x_lo), cell_centres(ny, y_lo, y_hi - y_lo)
    t = np.linspace(0.0, settings["t_max"], settings["nt"])
    params = settings["params"]
    attrs = {"pde": spec.name, **{p.attrs[0]: float(params[p.name]) for p in spec.params}}
    n = int(seeds.size)
    log.info("generating %d %s samples (%d train / %d val / %d test), %d x %d cells (y, x) x %d frames, "
             "t in [0, %g] -> %s", n, spec.name, rows["train"], rows["val"], rows["test"], ny, nx,
             settings["nt"], settings["t_max"], target)
    manifest: dict = {}
    t0 = time.perf_counter()

    def finish(tmp: Path) -> None:
        """On the complete temporary file: read it back (layout, grid, training statistics)."""
        seconds = time.perf_counter() - t0
        train = np.arange(splits["train"]["start"], splits["train"]["stop"])
        norms = []
        with PDEBench2DFile(tmp) as f:
            if f.meta.shape != (n, settings["nt"], nx, ny, spec.n_channels):
                raise ValueError(f"write_dataset_2d: wrote {f.meta.shape}, expected "
                                 f"{(n, settings['nt'], nx, ny, spec.n_channels)}")
            if train.size:
                norms.append({"split": "train", "rows": [int(train[0]), int(train[-1]) + 1],
                              "reduced_resolution": 1, "reduced_resolution_t": 1,
                              **compute_normalizer(f, train).to_dict()})
        manifest.update({
            "format": MANIFEST_FORMAT,
            "file": target.name,
            "layout": "groups",
            "pde": spec.name,
            "n_samples": n,
            "file_bytes": tmp.stat().st_size,
            "settings": settings,
            "params": params,
            "grid": {"shape": [ny, nx], "nt": settings["nt"], "t_max": settings["t_max"],
                     "domain": settings["domain"], "dx": (x_hi - x_lo) / nx, "dy": (y_hi - y_lo) / ny,
                     "dt_save": settings["t_max"] / (settings["nt"] - 1),
                     "file_axes": "data (T, X, Y, C); the solvers' (Y, X, C) transposed"},
            "splits": splits,
            "seeds": seeds_record(settings["seed"], seeds_by_split),
            "solver": dict(spec.solver_settings),
            "initial_condition": spec.recipe_id,
            "normalization": norms,
            "generation": {
                "seconds": round(seconds, 3),
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "package_version": package_version(),
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        })
        _check_stop()
        manifest_path(target).unlink(missing_ok=True)    # never an old manifest beside new data

    write_groups_file(target, _SolvedRows(spec, seeds, settings, workers), x, y, t, attrs, finish=finish,
                      indexed=True)
    write_manifest(target, manifest)
    log.info("wrote %s (%d samples, %.1f MB) and %s in %.1f s", target, n, target.stat().st_size / 1e6,
             manifest_path(target).name, manifest["generation"]["seconds"])
    return manifest
