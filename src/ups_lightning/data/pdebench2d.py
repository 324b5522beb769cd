"""PDEBench's 2D file layouts, read unchanged and lazily; ``data.pdebench.open_file`` hands a 2D file here.

Two layouts, told apart by the file's top-level keys:

- **groups** (``2D_diff-react_NA_NA.h5``, ``2D_rdb_NA_NA.h5``): one group per sample named by its
  seed (``0000``, ``0001``, ...), each with ``data`` (T, X, Y, C) and ``grid/x``, ``grid/y``,
  ``grid/t``; every sample on the same grid (checked on the first and the last).
- **fields** (the 2D CFD files, ``2D_CFD_*.hdf5``): one dataset per field, ``density``, ``pressure``,
  ``Vx``, ``Vy``, each (N, T, X, Y), with ``x-coordinate``, ``y-coordinate``, ``t-coordinate``
  (which may hold one more entry than there are frames, as in the 1D releases).

Both read as (n, T, X, Y, C) float32 with PDEBench's reduction (a stride in x, y and t), the axis
order of PDEBench's own loaders (time, then x, then y, then the fields): the order the whole pipeline
keeps (models, metrics, guard). The 2D specs' operators are written for (Y, X) frames; with square
cells (dx = dy, which training requires) the two orders are the same problem transposed. A bad file
is a UserError naming it and what was expected.

The equation: the file's ``pde`` attribute (the project's files), else a registered 2D equation whose
PDEBench file name it has (``2D_diff-react_NA_NA.h5``, ``2D_rdb_NA_NA.h5``), else ``pde`` as given; a
file no registered equation holds (the CFD files) still reads (``meta.pde`` None), for inspection.

``write_groups_file`` writes the groups layout (the generator's, data/generation2d.py), atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Sequence

import h5py
import numpy as np

from ups_lightning.atomic import atomic_path
from ups_lightning.data.pdebench import _check_reduction, _stated_pde, _uniform_step, file_params
from ups_lightning.errors import UserError
from ups_lightning.pdes import get_pde, registered

__all__ = ["CFD_FIELDS", "Grid2DMeta", "PDEBench2DFile", "write_groups_file"]

CFD_FIELDS = ("density", "pressure", "Vx", "Vy")


@dataclass(frozen=True, eq=False)
class Grid2DMeta:
    """What a 2D file holds after reduction: cell centres ``x``, ``y``, frame times ``t``."""

    path: str
    layout: str                 # groups | fields
    fields: tuple               # channel names, in channel order
    n_samples: int
    n_t: int
    n_x: int
    n_y: int
    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    dx: float
    dy: float
    dt: float
    reduced_resolution: int = 1
    reduced_resolution_t: int = 1
    # the physical domain (file grid: left edge = first centre - half a cell, length = cells x step)
    x_left: float = 0.0
    y_left: float = 0.0
    domain_length: float = 1.0     # along x; the 2D equations here are on squares
    domain_length_y: float = 1.0
    pde: str | None = None         # None: no registered equation holds the file (it reads, for inspection)
    params: dict = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return len(self.fields)

    @property
    def shape(self) -> tuple:
        return (self.n_samples, self.n_t, self.n_x, self.n_y, self.n_channels)

    @property
    def spatial_shape(self) -> tuple:
        return (self.n_x, self.n_y)

    @property
    def xi(self) -> np.ndarray:
        """Unit coordinates (X, Y, 2) float32 of the kept cells: ``[..., 0]`` along x (axis 0),
        ``[..., 1]`` along y, each (centre - left edge) / length."""
        xs = (self.x - self.x_left) / self.domain_length
        ys = (self.y - self.y_left) / self.domain_length_y
        return np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).astype(np.float32)


def _numbers(h5: Any, key: str, path: str) -> np.ndarray:
    if key not in h5 or not isinstance(h5[key], h5py.Dataset):
        raise UserError(f"{path}: no dataset {key!r}; a PDEBench 2D file holds it beside the fields.")
    try:
        return np.asarray(h5[key][...], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: dataset {key!r} does not hold numbers ({exc}).") from None


class PDEBench2DFile:
    """An open 2D PDEBench file (context manager): ``.meta`` and ``.read(indices)``."""

    def __init__(self, path: str | os.PathLike, reduced_resolution: int = 1, reduced_resolution_t: int = 1,
                 pde: str | None = None) -> None:
        self.path = str(path)
        self.rr = _check_reduction("reduced_resolution", reduced_resolution)
        self.rt = self.rr_t = _check_reduction("reduced_resolution_t", reduced_resolution_t)
        if not os.path.isfile(self.path):
            raise UserError(f"{self.path}: no such file.")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(f"{self.path} is not a readable HDF5 file ({exc}).") from None
        try:
            self.meta = self._with_equation(self._read_meta(), pde)
        except BaseException:
            self.h5.close()
            raise
        self.pde = self.meta.pde
        self.spec = None if self.pde is None else get_pde(self.pde)

    def _with_equation(self, meta: Grid2DMeta, pde: str | None) -> Grid2DMeta:
        """``meta`` with the file's equation and parameters (module doc), checked against the fields."""
        name = pde if pde is not None else _stated_pde(self.h5)
        if name is None:
            named = [s.name for s in registered().values() if s.spatial_dims == 2 and s.filename
                     and Path(self.path).name.startswith(s.filename.split("{", 1)[0])]
            name = named[0] if len(named) == 1 else None
        if name is None or (pde is None and name not in registered()):
            return meta     # it reads (inspection); training refuses it (data.pdebench.open_file)
        spec = get_pde(name)
        if spec.spatial_dims != 2:
            raise UserError(f"{self.path} is a 2D file ({meta.n_x} x {meta.n_y} cells) but {spec.name} is a "
                            f"{spec.spatial_dims}D equation ({spec.equation}); choose a 2D data config.")
        if meta.n_channels != spec.n_channels:
            raise UserError(f"{self.path}: {meta.n_channels} field(s) per cell but {spec.name} has "
                            f"{spec.n_channels} ({', '.join(spec.fields)}).")
        return replace(meta, pde=spec.name, params=file_params(self.h5, self.path, spec),
                       fields=tuple(spec.fields) if meta.layout == "groups" else meta.fields)

    # -- layout and grid ---------------------------------------------------------------------
    def _read_meta(self) -> Grid2DMeta:
        keys = sorted(self.h5.keys())
        samples = [k for k in keys if k.isdigit() and isinstance(self.h5[k], h5py.Group)]
        if samples:
            return self._groups_meta(samples)
        if all(f in self.h5 for f in CFD_FIELDS):
            return self._fields_meta()
        raise UserError(f"{self.path}: neither of PDEBench's 2D layouts: expected groups named by sample "
                        f"('0000/data', '0000/grid/x', ...) or the datasets {', '.join(CFD_FIELDS)} with "
                        f"x-, y- and t-coordinate; found {', '.join(keys[:8]) or 'nothing'}.")

    def _grid(self, layout: str, fields: tuple, n: int, shape: Sequence[int], x, y, t) -> Grid2DMeta:
        n_t, n_x, n_y = shape
        if x.size != n_x or y.size != n_y:
            raise UserError(f"{self.path}: the grid has {x.size} x and {y.size} y coordinates but the data "
                            f"{n_x} x {n_y} cells.")
        if t.size not in (n_t, n_t + 1):
            raise UserError(f"{self.path}: {t.size} times for {n_t} frames.")
        dx_file, dy_file = _uniform_step(x, "x", self.path), _uniform_step(y, "y", self.path)
        edges = dict(x_left=float(x[0] - dx_file / 2), y_left=float(y[0] - dy_file / 2),
                     domain_length=float(x.size * dx_file), domain_length_y=float(y.size * dy_file))
        x, y, t = x[:: self.rr], y[:: self.rr], t[:n_t][:: self.rt]
        if min(x.size, y.size) < 2 or t.size < 2:
            raise UserError(f"{self.path}: reduced_resolution={self.rr}, reduced_resolution_t={self.rt} leave "
                            f"{x.size} x {y.size} cells and {t.size} frames; need at least 2 of each.")
        return Grid2DMeta(self.path, layout, fields, n, t.size, x.size, y.size, x, y, t,
                          _uniform_step(x, "x", self.path), _uniform_step(y, "y", self.path),
                          _uniform_step(t, "t", self.path), self.rr, self.rt, **edges)

    def _groups_meta(self, samples: List[str]) -> Grid2DMeta:
        self.samples = samples
        first = self._group_data(samples[0])
        if first.ndim != 4:
            raise UserError(f"{self.path}: {samples[0]}/data has shape {first.shape}; expected (T, X, Y, C).")
        last = self._group_data(samples[-1])
        if last.shape != first.shape:
            raise UserError(f"{self.path}: samples {samples[0]} and {samples[-1]} have data of shapes {first.shape} "
                            f"and {last.shape}; every sample must be on one grid.")
        g = self.h5[samples[0]]
        coords = [_numbers(g, f"grid/{c}", f"{self.path}:{samples[0]}") for c in ("x", "y", "t")]
        fields = tuple(f"field{c}" for c in range(first.shape[-1]))
        return self._grid("groups", fields, len(samples), first.shape[:3], *coords)

    def _group_data(self, name: str) -> Any:
        g = self.h5[name]
        if "data" not in g or not isinstance(g["data"], h5py.Dataset):
            raise UserError(f"{self.path}: sample group {name!r} has no 'data' dataset (keys: {sorted(g.keys())}).")
        return g["data"]

    def _fields_meta(self) -> Grid2DMeta:
        shapes = {f: self.h5[f].shape for f in CFD_FIELDS}
        if len(set(shapes.values())) != 1 or len(shapes["density"]) != 4:
            raise UserError(f"{self.path}: the fields must share one (N, T, X, Y) shape; found "
                            + ", ".join(f"{f} {s}" for f, s in shapes.items()) + ".")
        n, *rest = shapes["density"]
        coords = [_numbers(self.h5, f"{c}-coordinate", self.path) for c in ("x", "y", "t")]
        return self._grid("fields", CFD_FIELDS, n, rest, *coords)

    # -- rows ---------------------------------------------------------------------------------
    def read(self, indices: Any = slice(None)) -> np.ndarray:
        """Rows ``indices`` (slice, int or list) as (n, T, X, Y, C) float32, reduced; a row holding
        NaN/Inf is a UserError naming it."""
        m = self.meta
        idx = self._as_indices(indices)
        t_end = m.n_t * self.rt
        out = np.empty((idx.size, m.n_t, m.n_x, m.n_y, m.n_channels), dtype=np.float32)
        for j, i in enumerate(idx):
            if m.layout == "groups":
                raw = self._group_data(self.samples[i])[:t_end:self.rt, :: self.rr, :: self.rr, :]
            else:
                raw = np.stack([self.h5[f][i, :t_end:self.rt, :: self.rr, :: self.rr] for f in CFD_FIELDS], -1)
            out[j] = raw
            if not np.isfinite(out[j]).all():
                raise UserError(f"{self.path}: sample {i} holds NaN/Inf values.")
        return out

    # what compute_normalizer (data/pdebench.py) reads, so a 2D file's statistics are the 1D files'
    def _as_indices(self, indices: Any) -> np.ndarray:
        return np.arange(self.meta.n_samples)[indices].reshape(-1)

    def iter_blocks(self, rows: Any) -> Iterator[tuple]:
        """(row, data (1, T, X, Y, C)) one sample at a time: a 2D sample is a block already."""
        for i in self._as_indices(rows):
            yield np.asarray([i]), self.read(int(i))

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "PDEBench2DFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_groups_file(path: str | os.PathLike, fields: Any, x: Any, y: Any, t: Any,
                      attrs: Mapping[str, Any], *, finish: Callable[[Path], None] | None = None,
                      indexed: bool = False) -> Path:
    """Write PDEBench's groups layout at ``path``, atomically: sample i is the group ``{i:04d}`` (wider
    when there are more, all of one width so their sorted order is the row order) holding ``data``
    (T, X, Y, C) float32 and ``grid/x``, ``grid/y``, ``grid/t``; ``attrs`` go on the root.

    ``fields`` is (N, T, Y, X, C) in the solvers' order (transposed here to the file's x-first order),
    or any sized iterable of (T, Y, X, C) rows, so a generator of solved rows holds one sample in
    memory; ``indexed=True``: an iterable of ``(i, row)`` pairs in any order (a pool's rows as they
    finish), each i in [0, len) once. ``finish(tmp)``, when given, runs on the complete temporary file before it replaces
    ``path``: what it raises leaves neither file behind, like any other failure."""
    x, y, t = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (x, y, t))
    n = len(fields)
    if n < 1:
        raise ValueError("write_groups_file: no samples to write")
    width = max(4, len(str(n - 1)))
    target = Path(path)
    with atomic_path(target) as tmp:
        try:
            h5 = h5py.File(tmp, "w")
        except OSError as exc:
            raise UserError(f"cannot write {str(tmp)!r} (the temporary file beside {str(target)!r}): "
                            f"{exc}.") from None
        with h5:
            for key, value in attrs.items():
                h5.attrs[key] = value
            written, channels, seen = 0, None, set()
            for i, row in (fields if indexed else enumerate(fields)):
                i, row = int(i), np.asarray(row)
                channels = row.shape[-1] if channels is None and row.ndim else channels
                if i in seen or not 0 <= i < n:
                    raise ValueError(f"write_groups_file: sample index {i} repeated or outside [0, {n})")
                seen.add(i)
                if row.shape != (t.size, y.size, x.size, channels):
                    raise ValueError(f"write_groups_file: sample {i} of {n} has shape {row.shape}; expected "
                                     f"({t.size}, {y.size}, {x.size}, {channels}) = (T, Y, X, C) on the given "
                                     f"t, y, x, with sample 0's channels")
                data = np.ascontiguousarray(row.transpose(0, 2, 1, 3), dtype=np.float32)
                if not np.isfinite(data).all():
                    raise ValueError(f"write_groups_file: sample {i} holds NaN/Inf values (as float32)")
                g = h5.create_group(f"{i:0{width}d}")
                g.create_dataset("data", data=data)
                for name, values in (("x", x), ("y", y), ("t", t)):
                    g.create_dataset(f"grid/{name}", data=values.astype(np.float32))
                written += 1
            if written != n:
                raise ValueError(f"write_groups_file: {written} samples given for len(fields) = {n}")
        if finish is not None:
            finish(tmp)
    return target
