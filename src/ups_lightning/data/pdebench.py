"""Reader for PDEBench-layout HDF5 files: reduction, splits, manifest, normalisation.

Layout (benchmark.md section 1): dataset ``tensor`` (N, T, X) or (N, T, X, C), ``x-coordinate``
(X,) cell centres, ``t-coordinate`` (T,) or (T+1,) (released PDEBench files carry one extra entry at
the end: it is dropped). The equation's parameters come from the attributes its spec names, else from
PDEBench's file name (the spec's ``filename`` pattern); a file whose
attributes or name belong to another equation is refused. The domain, dx and dt always come from the
file: domain length = X dx, x_left = x[0] - dx/2, for (0, 1) and (-1, 1) alike.

Reduction follows PDEBench's ``reduced_resolution`` / ``reduced_resolution_t``: strided slicing
``[:, ::rr_t, ::rr]``. A reduction must divide the grid: X % rr == 0 (the periodic grid stays
uniform across the wrap) and (T - 1) % rr_t == 0 (the last frame is kept, frames stay evenly
spaced). All metadata in ``FieldMeta`` describes the reduced grid, except ``x_left`` and
``domain_length``, which describe the physical domain (file grid: x_left = x[0] - dx/2, L = X dx),
so ``xi = (x - x_left) / L`` are the true positions of the kept points at any reduction (with
rr > 1 PDEBench's strided points x[::rr] sit (rr-1)/2 fine cells left of the coarse-cell centres).

Files are never read whole: rows are read in bounded blocks, so a 10000 x 201 x 1024 (7.7 GB) file
opens instantly and a split costs only its own rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ups_lightning.atomic import atomic_write_json
from ups_lightning.errors import UserError, command
from ups_lightning.pdes import PDE, get_pde, pde_of_file_attrs, registered

__all__ = [
    "FieldMeta",
    "PDEBenchFile",
    "open_file",
    "is_2d_file",
    "Normalizer",
    "compute_normalizer",
    "manifest_path",
    "load_manifest",
    "write_manifest",
    "DatasetView",
    "open_dataset",
    "check_split_layout",
    "split_options",
    "SPLIT_LAYOUTS",
    "MANIFEST_FORMAT",
    "RETIRED_MANIFEST_FORMATS",
    "SPLITS",
]

# /2: split protocol v2 (a fresh test split; data/generation.py). A /1 manifest's test split was used
# to choose settings: such a file is refused, never scored.
MANIFEST_FORMAT = "ups_lightning.manifest/2"
RETIRED_MANIFEST_FORMATS = ("ups_lightning.manifest/1",)
SPLITS = ("train", "val", "test")
# rows of a file without a manifest (data.split_layout): tail = train, val from the start, test the
# last rows; pdebench = PDEBench's own loaders (test the first int(N * test_ratio) rows)
SPLIT_LAYOUTS = ("tail", "pdebench")
_BLOCK_BYTES = 128 * 1024 * 1024     # at most this much raw data per read block


def _generate_hint() -> str:
    return (f"Make it with `{command('ups_lightning.data.generate')} data=<name>` (in a checkout `make data` "
            "makes every small set), or point data.path at your PDEBench file")


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FieldMeta:
    """What a file holds, after reduction: ``x`` the kept cell centres, ``t`` the T kept frame
    times, ``dx``/``dt`` their spacings; ``x_left``/``domain_length`` the physical periodic
    domain (so ``xi = (x - x_left) / L`` are true positions at any reduction)."""

    path: str
    n_samples: int
    n_t: int
    n_x: int
    n_channels: int
    x: np.ndarray
    t: np.ndarray
    dx: float
    dt: float
    x_left: float
    domain_length: float
    pde: str
    params: dict = field(default_factory=dict)   # the parameters the file states (attrs or name)
    reduced_resolution: int = 1
    reduced_resolution_t: int = 1

    @property
    def xi(self) -> np.ndarray:
        """Cell centres normalised to the unit interval, (x - x_left) / L (float32)."""
        return ((self.x - self.x_left) / self.domain_length).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_samples, self.n_t, self.n_x, self.n_channels)

    @property
    def spatial_shape(self) -> tuple[int]:
        """Cells per spatial axis ((X,); (X, Y) for a 2D file's Grid2DMeta)."""
        return (self.n_x,)


def _check_reduction(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"setting {name}={value!r} must be a positive integer (a stride, as "
                            f"in PDEBench's reduced_resolution).")
    if value <= 0:
        raise UserError(f"setting {name}={value} must be a positive integer (1 = no reduction).")
    return int(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_param_attr(h5: Any, attr: str, path: str, spec: PDE, name: str) -> float:
    param = spec.parameter(name)
    where = f"{path}: attribute {attr!r}"
    try:
        raw = np.asarray(h5.attrs[attr])
    except (OSError, TypeError, ValueError) as exc:
        raise UserError(f"{where} cannot be read ({exc}); expected one number, {param.doc}.") from None
    # a bool, string or array is not a parameter, even where float() would accept it
    if raw.dtype.kind not in "iuf" or raw.size != 1:
        raise UserError(f"{where} = {_short(raw.tolist() if raw.size else raw)} "
                        f"(dtype {raw.dtype}, {raw.size} value(s)) is not one number; expected "
                        f"{name}, {param.doc}, as a single number (e.g. {param.default:g}).")
    return param.check(raw.reshape(-1)[0].item(), where)


def _filename_prefix(spec: PDE) -> str:
    return spec.filename.split("{", 1)[0]


def _stated_pde(h5: Any) -> str | None:
    """The equation a file's ``pde`` attribute names (the project's files carry one), or None."""
    if "pde" not in h5.attrs:
        return None
    stated = h5.attrs["pde"]
    return stated.decode() if isinstance(stated, bytes) else str(stated)


def infer_pde(h5: Any, path: str) -> str:
    """The equation a file holds, for callers that do not name one: its ``pde`` attribute, else the
    one equation whose parameter attributes it carries, else PDEBench's file name."""
    attrs = set(h5.attrs.keys())
    stated = _stated_pde(h5)
    if stated is not None:
        return stated
    hits = pde_of_file_attrs(attrs)
    if hits:
        return hits[0]
    base = Path(path).name
    named = [s.name for s in registered().values() if base.startswith(_filename_prefix(s))]
    if len(named) == 1:
        return named[0]
    raise UserError(f"{path}: cannot tell which equation the file holds (no 'pde' attribute, no "
                    f"parameter attributes, no PDEBench file name); set data.pde to one of "
                    f"{', '.join(sorted(registered()))}.")


def file_params(h5: Any, path: str, spec: PDE) -> dict:
    """The parameters a file states for equation ``spec``: attributes first, then PDEBench's file
    name. A file that says it holds another equation (its ``pde`` attribute, another equation's
    parameter attributes, another equation's file name) is refused: never read as this one."""
    attrs = set(h5.attrs.keys())
    base = Path(path).name
    stated = _stated_pde(h5)
    if stated is not None and stated != spec.name:
        raise UserError(f"{path}: the file holds {stated!r} data (its 'pde' attribute) but "
                        f"data.pde={spec.name!r}; choose data={stated} (or a data config of that "
                        f"equation) for this file.")
    own = {a for p in spec.params for a in p.attrs}
    for other in registered().values():
        if other.name == spec.name:
            continue
        foreign = sorted({a for p in other.params for a in p.attrs} & attrs - own)
        prefix = _filename_prefix(other)
        if foreign or (prefix and base.startswith(prefix) and not base.startswith(_filename_prefix(spec))):
            why = (f"attribute(s) {', '.join(foreign)} of {other.name}" if foreign
                   else f"a {other.name} file name ({other.filename})")
            raise UserError(f"{path}: the file carries {why} ({other.equation}), but data.pde="
                            f"{spec.name!r} ({spec.equation}). Choose data={other.name} (or a data "
                            f"config of that equation) for this file.")
    found = {}
    from_name = spec.params_from_filename(base)
    for p in spec.params:
        attr = next((a for a in p.attrs if a in attrs), None)
        if attr is not None:
            found[p.name] = _read_param_attr(h5, attr, path, spec, p.name)
        elif p.name in from_name:
            found[p.name] = p.check(from_name[p.name], f"{path}: {p.filename_key} in the file name")
    return found


def _coordinate(h5: Any, key: str, path: str) -> np.ndarray:
    try:
        return np.asarray(h5[key][...], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: dataset {key!r} (dtype {h5[key].dtype}) does not hold numbers "
                        f"({exc}); expected the grid's coordinates as floats.") from None


def _uniform_step(values: np.ndarray, what: str, path: str) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise UserError(f"{path}: dataset {what!r} has {v.size} entr{'y' if v.size == 1 else 'ies'}; "
                        f"need at least 2 to know the spacing.")
    if not np.isfinite(v).all():
        raise UserError(f"{path}: dataset {what!r} holds NaN/Inf values.")
    step = (v[-1] - v[0]) / (v.size - 1)
    diffs = np.diff(v)
    if step <= 0 or np.abs(diffs - step).max() > 1e-3 * step:
        raise UserError(f"{path}: dataset {what!r} must be increasing and evenly spaced (found "
                        f"spacings from {diffs.min():.6g} to {diffs.max():.6g}).")
    return float(step)


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------
class PDEBenchFile:
    """An open PDEBench-layout HDF5 file (context manager). ``.meta`` describes the reduced data;
    ``.read(indices)`` returns (n, T, X, C) float32 in the requested order."""

    def __init__(self, path: str | os.PathLike, reduced_resolution: int = 1,
                 reduced_resolution_t: int = 1, pde: str | None = None):
        import h5py

        self.path = str(path)
        self._pde_setting = pde     # None: the file says which equation it holds (infer_pde)
        self.rr = _check_reduction("reduced_resolution", reduced_resolution)
        self.rr_t = _check_reduction("reduced_resolution_t", reduced_resolution_t)
        p = Path(self.path)
        if not p.exists():
            raise UserError(f"data file {self.path!r} does not exist. {_generate_hint()}.")
        if not p.is_file():
            raise UserError(f"data path {self.path!r} is not a file (expected a PDEBench-layout "
                            f"HDF5 file).")
        if not h5py.is_hdf5(self.path):
            raise UserError(f"data file {self.path!r} is not an HDF5 file (expected a PDEBench-"
                            f"layout HDF5 with a 'tensor' dataset).")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(f"cannot open data file {self.path!r} as HDF5: {exc}.") from None
        try:
            self.meta = self._read_meta()
        except OSError as exc:      # HDF5 read errors: a truncated or damaged file
            self._h5.close()
            raise UserError(f"cannot read data file {self.path!r} ({exc}); the file is damaged "
                            f"or truncated: regenerate or re-download it.") from None
        except BaseException:
            self._h5.close()
            raise

    # -- set-up ------------------------------------------------------------------------------
    def _read_meta(self) -> FieldMeta:
        import h5py

        h5, path = self._h5, self.path
        keys = sorted(h5.keys())
        ds = h5.get("tensor")
        if not isinstance(ds, h5py.Dataset):
            raise UserError(f"{path}: no 'tensor' dataset (found keys: {keys or 'none'}); expected "
                            f"PDEBench's layout: 'tensor' (N, T, X), 'x-coordinate', "
                            f"'t-coordinate'.")
        # the layout first: a file without the dataset is named as such, not as an unknown equation
        self.spec = get_pde(self._pde_setting if self._pde_setting is not None else infer_pde(h5, path))
        self.pde = self.spec.name
        if ds.ndim not in (3, 4):
            raise UserError(f"{path}: dataset 'tensor' has shape {ds.shape} (rank {ds.ndim}); "
                            f"expected (N, T, X) or (N, T, X, C).")
        if not np.issubdtype(ds.dtype, np.floating):
            raise UserError(f"{path}: dataset 'tensor' has dtype {ds.dtype}; expected floats.")
        n, n_t, n_x = (int(s) for s in ds.shape[:3])
        n_c = int(ds.shape[3]) if ds.ndim == 4 else 1
        if n < 1 or n_t < 1 or n_x < 2:
            raise UserError(f"{path}: dataset 'tensor' has shape {ds.shape}: no data.")
        if n_c != self.spec.n_channels:
            raise UserError(f"{path}: dataset 'tensor' has {n_c} channels (shape {ds.shape}) but "
                            f"{self.pde} has {self.spec.n_channels} ({', '.join(self.spec.fields)}).")
        for key in ("x-coordinate", "t-coordinate"):
            if not isinstance(h5.get(key), h5py.Dataset):
                raise UserError(f"{path}: no {key!r} dataset (found keys: {keys}); the domain, dx "
                                f"and dt are taken from the file, never assumed.")
        x = _coordinate(h5, "x-coordinate", path)
        t = _coordinate(h5, "t-coordinate", path)
        if x.size != n_x:
            raise UserError(f"{path}: 'x-coordinate' has {x.size} entries but 'tensor' has "
                            f"X = {n_x} cells (shape {ds.shape}).")
        if t.size == n_t + 1:       # released PDEBench files: one extra time at the end
            t = t[:n_t]
        elif t.size != n_t:
            raise UserError(f"{path}: 't-coordinate' has {t.size} entries but 'tensor' has "
                            f"T = {n_t} frames (shape {ds.shape}); expected T or T+1 entries.")
        dx = _uniform_step(x, "x-coordinate", path)
        dt = _uniform_step(t, "t-coordinate", path) if n_t > 1 else float("nan")

        if n_x % self.rr:
            raise UserError(f"{path}: reduced_resolution={self.rr} does not divide the grid of "
                            f"X = {n_x} cells; choose a divisor of {n_x}.")
        if (n_t - 1) % self.rr_t:
            raise UserError(f"{path}: reduced_resolution_t={self.rr_t} does not divide the "
                            f"{n_t - 1} intervals between the T = {n_t} frames; choose a divisor "
                            f"of {n_t - 1}.")
        params = file_params(h5, path, self.spec)

        self._ds = ds
        self._n_t_file, self._n_x_file = n_t, n_x
        x_r = x[:: self.rr]
        t_r = t[:: self.rr_t]
        dx_r = dx * self.rr
        return FieldMeta(
            path=path, n_samples=n, n_t=int(t_r.size), n_x=int(x_r.size), n_channels=n_c,
            x=x_r, t=t_r, dx=dx_r, dt=dt * self.rr_t, x_left=float(x[0] - dx / 2),
            domain_length=float(n_x * dx), pde=self.pde, params=params,
            reduced_resolution=self.rr, reduced_resolution_t=self.rr_t,
        )

    # -- context manager ---------------------------------------------------------------------
    def close(self) -> None:
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            h5.close()
            self._h5 = None

    def __enter__(self) -> "PDEBenchFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.meta.n_samples

    # -- reading -----------------------------------------------------------------------------
    def _as_indices(self, indices: Any) -> np.ndarray:
        n = self.meta.n_samples
        if isinstance(indices, slice):
            return np.arange(n)[indices]
        if isinstance(indices, (int, np.integer)):
            idx = np.asarray([int(indices)])
        else:
            idx = np.asarray(indices)
            if idx.size == 0:
                return idx.astype(np.int64).reshape(0)
            if not np.issubdtype(idx.dtype, np.integer):
                raise UserError(f"{self.path}: row indices must be integers (got dtype "
                                f"{idx.dtype}).")
            idx = idx.reshape(-1).astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise UserError(f"{self.path}: row {int(bad)} requested but the file has {n} rows.")
        return np.where(idx < 0, idx + n, idx)

    def iter_blocks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For sorted unique ``rows``: yield (block_rows, data (b, T, X, C) float32), reading
        contiguous runs in bounded blocks."""
        m = self.meta
        row_bytes = self._n_t_file * self._n_x_file * m.n_channels * self._ds.dtype.itemsize
        per_block = max(1, _BLOCK_BYTES // max(1, row_bytes))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(rows, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            for a in range(start, stop, per_block):
                b = min(stop, a + per_block)
                try:
                    raw = self._ds[a:b]
                except OSError as exc:      # a damaged chunk: name the rows, not h5py's stack
                    raise UserError(f"{self.path}: cannot read rows {a}..{b - 1} of 'tensor' "
                                    f"({exc}); the file is damaged or truncated: regenerate or "
                                    f"re-download it.") from None
                if raw.ndim == 3:
                    raw = raw[..., None]
                self._check_finite(raw, a)
                data = raw[:, :: self.rr_t, :: self.rr] if (self.rr > 1 or self.rr_t > 1) else raw
                yield np.arange(a, b), np.ascontiguousarray(data, dtype=np.float32)

    def _check_finite(self, block: np.ndarray, first_row: int) -> None:
        if np.isfinite(block).all():
            return
        bad_rows = np.flatnonzero(~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1))
        r = int(bad_rows[0])
        frames = np.flatnonzero(~np.isfinite(block[r].reshape(block.shape[1], -1)).all(axis=1))
        raise UserError(f"{self.path}: row {first_row + r} of 'tensor' holds NaN/Inf values (first "
                        f"at frame {int(frames[0])}; {bad_rows.size} bad row(s) in rows "
                        f"{first_row}..{first_row + block.shape[0] - 1}). The file is corrupt or "
                        f"was written by a diverged solver: regenerate it.")

    def read(self, indices: Any = slice(None)) -> np.ndarray:
        """Rows ``indices`` (slice, int, list or int array) as (n, T, X, C) float32, in the
        requested order (duplicates allowed). Raises UserError on NaN/Inf naming the row."""
        idx = self._as_indices(indices)
        m = self.meta
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((uniq.size, m.n_t, m.n_x, m.n_channels), dtype=np.float32)
        pos = 0
        for _, data in self.iter_blocks(uniq):
            out[pos: pos + data.shape[0]] = data
            pos += data.shape[0]
        if uniq.size == idx.size and np.array_equal(uniq, idx):
            return out
        return out[inverse.reshape(-1)]


def is_2d_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file in one of PDEBench's 2D layouts (data/pdebench2d.py): no
    ``tensor`` dataset, but sample groups or the CFD fields. False for anything else (the 1D reader
    then names what is wrong with it)."""
    import h5py

    try:
        if not (os.path.isfile(path) and h5py.is_hdf5(path)):
            return False
        with h5py.File(path, "r") as h5:
            if "tensor" in h5:
                return False
            from ups_lightning.data.pdebench2d import CFD_FIELDS

            return (any(k.isdigit() and isinstance(h5[k], h5py.Group) for k in h5.keys())
                    or all(f in h5 for f in CFD_FIELDS))
    except OSError:
        return False


def open_file(path: str | os.PathLike, reduced_resolution: int = 1, reduced_resolution_t: int = 1,
              pde: str | None = None) -> Any:
    """The reader of a data file, whatever its dimension: ``PDEBenchFile`` (1D, ``tensor``) or
    ``PDEBench2DFile`` (2D layouts). Both have ``.meta`` (``n_t``, ``n_channels``, ``spatial_shape``,
    ``xi``, ``dt``, ``pde``, ``params``...), ``.read``, ``.iter_blocks``, ``.rr``/``.rr_t``/``.pde``.
    A 2D file that no registered equation holds reads with ``PDEBench2DFile`` directly (inspection),
    not here: training and evaluation need its equation."""
    if not is_2d_file(path):
        return PDEBenchFile(path, reduced_resolution, reduced_resolution_t, pde)
    from ups_lightning.data.pdebench2d import PDEBench2DFile

    f = PDEBench2DFile(path, reduced_resolution, reduced_resolution_t, pde)
    if f.pde is None:
        f.close()
        two_d = sorted(s.name for s in registered().values() if s.spatial_dims == 2)
        raise UserError(f"{path}: a PDEBench 2D file ({f.meta.layout} layout, fields "
                        f"{', '.join(f.meta.fields)}) of no equation this project knows: it has no 'pde' "
                        f"attribute and not the file name of a 2D equation ({', '.join(two_d)}). Set data.pde "
                        f"when it holds one of them; other 2D files read with `{command('ups_lightning.data.inspect')} "
                        f"FILE` but cannot be trained on yet.")
    return f


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
def _is_torch(u: Any) -> bool:
    return type(u).__module__.split(".")[0] == "torch"


class Normalizer:
    """One scalar mean and std per channel (last axis). Works on numpy arrays and torch tensors,
    keeping their dtype (and device)."""

    def __init__(self, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError("Normalizer: mean and std must have the same length")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()) or (self.std <= 0).any():
            raise ValueError(f"Normalizer: need finite mean and std > 0, got {self.mean}, {self.std}")

    def _params(self, u: Any):
        if _is_torch(u):
            import torch

            dtype = u.dtype if u.is_floating_point() else torch.float32
            return (torch.as_tensor(self.mean, dtype=dtype, device=u.device),
                    torch.as_tensor(self.std, dtype=dtype, device=u.device))
        u = np.asarray(u)
        dtype = u.dtype if np.issubdtype(u.dtype, np.floating) else np.float64
        return self.mean.astype(dtype), self.std.astype(dtype)

    def normalize(self, u: Any) -> Any:
        mean, std = self._params(u)
        return (u - mean) / std

    def denormalize(self, u: Any) -> Any:
        mean, std = self._params(u)
        return u * std + mean

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(d["mean"], d["std"])

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean.tolist()}, std={self.std.tolist()})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Normalizer) and np.array_equal(self.mean, other.mean)
                and np.array_equal(self.std, other.std))


def compute_normalizer(file: PDEBenchFile, indices: Any, chunk: int = 256) -> Normalizer:
    """Exact per-channel mean and (population) std over every value of rows ``indices`` (at the
    file's reduction), read ``chunk`` rows at a time, accumulated in float64 (Chan's merge)."""
    idx = np.unique(file._as_indices(indices))
    if idx.size == 0:
        raise UserError(f"{file.path}: cannot compute normalisation statistics from 0 rows "
                        f"(the training split is empty).")
    count = 0
    mean = np.zeros(file.meta.n_channels)
    m2 = np.zeros(file.meta.n_channels)
    for i in range(0, idx.size, max(1, int(chunk))):
        rows = idx[i: i + chunk]
        for _, data in file.iter_blocks(rows):
            v = data.reshape(-1, data.shape[-1]).astype(np.float64)
            nb = v.shape[0]
            mb = v.mean(axis=0)
            m2b = ((v - mb) ** 2).sum(axis=0)
            delta = mb - mean
            tot = count + nb
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta**2 * (count * nb / tot)
            count = tot
    std = np.sqrt(m2 / count)
    std = np.where(std > 0, std, 1.0)     # a constant field: normalise by shifting only
    return Normalizer(mean, std)


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def manifest_path(data_path: str | os.PathLike) -> Path:
    """``<data file>.manifest.json`` beside the data file."""
    return Path(str(data_path) + ".manifest.json")


def load_manifest(data_path: str | os.PathLike) -> dict | None:
    """The manifest beside ``data_path``, or None when there is none."""
    mp = manifest_path(data_path)
    if not mp.is_file():
        return None
    try:
        manifest = json.loads(mp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"manifest {str(mp)!r} is not valid JSON ({exc}); delete it or "
                        f"regenerate the data with force=true.") from None
    if isinstance(manifest, dict) and manifest.get("format") in RETIRED_MANIFEST_FORMATS:
        raise UserError(f"{str(data_path)!r} was made with the retired v1 splits (manifest format "
                        f"{manifest['format']!r}): its test split was used to choose settings, so it "
                        f"is never scored again. Remake it with the v2 splits (a fresh test split): "
                        f"{command('ups_lightning.data.generate')} data=<its data config> force=true, or "
                        f"delete the file and its manifest (training makes a missing file itself).")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"manifest {str(mp)!r} has no 'splits' mapping; delete it or regenerate "
                        f"the data with force=true.")
    for name, rng in manifest["splits"].items():
        ok = (isinstance(rng, dict) and _is_int(rng.get("start")) and _is_int(rng.get("stop"))
              and 0 <= rng["start"] <= rng["stop"])
        if not ok:
            raise UserError(f"manifest {str(mp)!r}: split {name!r} must be {{'start': int, "
                            f"'stop': int}} with 0 <= start <= stop, got {rng!r}.")
    return manifest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def write_manifest(data_path: str | os.PathLike, manifest: dict) -> Path:
    """Write the manifest atomically (``<target>.tmp-<pid>`` then os.replace)."""
    mp = manifest_path(data_path)
    atomic_write_json(mp, manifest)
    return mp


def _manifest_norm(manifest: dict | None, train: np.ndarray, rr: int, rr_t: int) -> Normalizer | None:
    if not manifest or train.size == 0:
        return None
    start, stop = int(train[0]), int(train[-1]) + 1
    entries = manifest.get("normalization")
    if stop - start != train.size or not isinstance(entries, list):
        return None     # nothing usable recorded: the caller computes the statistics
    for entry in entries:
        try:
            if (entry.get("split") == "train" and entry.get("rows") == [start, stop]
                    and entry.get("reduced_resolution") == rr
                    and entry.get("reduced_resolution_t") == rr_t):
                return Normalizer.from_dict(entry)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
    return None


# --------------------------------------------------------------------------------------------
# dataset view: a file + frozen splits + training-split normaliser
# --------------------------------------------------------------------------------------------
@dataclass
class DatasetView:
    """A data file with its frozen splits (row indices into the file) and the normaliser of its
    training split. ``read`` opens the file per call, so a view is safe to hand to workers."""

    path: str
    meta: FieldMeta
    splits: dict[str, np.ndarray]
    normalizer: Normalizer
    manifest: dict | None
    reduced_resolution: int = 1
    reduced_resolution_t: int = 1
    pde: str | None = None
    split_source: str = field(default="index ranges")

    def open(self) -> Any:
        return open_file(self.path, self.reduced_resolution, self.reduced_resolution_t, self.pde)

    def read(self, split: str, rows: Any = None) -> np.ndarray:
        """Split ``split`` (or its positions ``rows``) as (n, T, *space, C) float32, physical units."""
        if split not in self.splits:
            raise UserError(f"unknown split {split!r} for {self.path}; have "
                            f"{', '.join(self.splits)}.")
        idx = self.splits[split]
        if rows is not None:
            idx = idx[rows]
        with self.open() as f:
            return f.read(idx)

    def sizes(self) -> dict[str, int]:
        return {k: int(v.size) for k, v in self.splits.items()}


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise UserError(f"setting data.{name}={value!r} must be a non-negative integer.")
    return int(value)


def check_split_layout(layout: Any, test_ratio: Any) -> tuple[str, float]:
    """``(data.split_layout, data.pdebench_test_ratio)`` checked: a layout of SPLIT_LAYOUTS and a
    ratio strictly between 0 and 1 (PDEBench's ``test_ratio``); else a UserError naming the key."""
    if not isinstance(layout, str) or layout not in SPLIT_LAYOUTS:
        raise UserError(f"setting data.split_layout={layout!r} is not a split layout: expected 'tail' "
                        f"(train and val the first rows, test the last rows; the default) or "
                        f"'pdebench' (PDEBench's own loaders: test the first int(N * "
                        f"data.pdebench_test_ratio) rows, val and train after them). It only applies "
                        f"to a file without a manifest.")
    ok = (isinstance(test_ratio, (int, float, np.integer, np.floating)) and not isinstance(test_ratio, bool)
          and np.isfinite(test_ratio) and 0.0 < float(test_ratio) < 1.0)
    if not ok:
        raise UserError(f"setting data.pdebench_test_ratio={test_ratio!r} is out of range: expected a "
                        f"number strictly between 0 and 1, the fraction of a file's rows PDEBench keeps "
                        f"as its test set (its test_ratio; 0.1 in PDEBench's loaders).")
    return layout, float(test_ratio)


def split_options(data_cfg: Any) -> dict:
    """The split-layout keywords of ``open_dataset`` that a data config sets (``split_layout``,
    ``pdebench_test_ratio``); a config without them (built by hand) gets open_dataset's own."""
    out = {}
    for key in ("split_layout", "pdebench_test_ratio"):
        value = getattr(data_cfg, key, None)
        if value is not None:
            out[key] = value
    return out


def _overlap(splits: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """The first two splits that share a row, or None when they are disjoint."""
    for a in SPLITS:
        for b in SPLITS:
            if a < b and np.intersect1d(splits[a], splits[b]).size:
                return a, b
    return None


def open_dataset(
    path: str | os.PathLike,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    reduced_resolution: int = 1,
    reduced_resolution_t: int = 1,
    pde: str | None = None,
    split_layout: str = "tail",
    pdebench_test_ratio: float = 0.1,
) -> DatasetView:
    """Open ``path`` with frozen, disjoint splits and the training split's normaliser.

    With a manifest beside the file (the project's own data), splits are its index ranges (the
    first n of each), whatever the layout: ``split_layout="pdebench"`` is refused there. Without
    one, ``split_layout`` says which rows (N = the file's rows):

    * ``"tail"``: train = rows [0, n_train), val = [n_train, n_train + n_val), test = the LAST
      n_test rows.
    * ``"pdebench"``: PDEBench's own loaders (FNODatasetSingle, UNetDatasetSingle: test_idx =
      int(N * test_ratio) with every row used) keep rows [0, k), k = int(N * pdebench_test_ratio),
      as their test set and train on [k, N). Here test = rows [0, n_test), the first n_test of
      PDEBench's k test rows (n_test <= k, else a UserError; n_test = k is PDEBench's whole test
      set), val = [k, k + n_val) and train = [k + n_val, k + n_val + n_train): both inside
      PDEBench's training rows, so validation never looks at PDEBench's test trajectories, and a
      score on the test split is on the trajectories published PDEBench tables use.
    """
    n_train, n_val, n_test = (_count(k, v) for k, v in
                              (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)))
    if n_train < 1:
        raise UserError(f"setting data.n_train={n_train}: need at least one training trajectory.")
    split_layout, pdebench_test_ratio = check_split_layout(split_layout, pdebench_test_ratio)
    with open_file(path, reduced_resolution, reduced_resolution_t, pde) as f:
        meta = f.meta
        n = meta.n_samples
        if len(meta.spatial_shape) == 2 and not np.isclose(meta.dx, meta.dy, rtol=1e-6, atol=0.0):
            raise UserError(f"{str(path)!r}: cells of {meta.dx:g} x {meta.dy:g} (dx x dy) after reduction; the 2D "
                            f"equations' operators, rewards and guard take square cells (dx = dy), as in "
                            f"PDEBench's 2D files.")
        manifest = load_manifest(path)
        wanted = {"train": n_train, "val": n_val, "test": n_test}
        splits: dict[str, np.ndarray] = {}
        if manifest is not None and split_layout == "pdebench":
            raise UserError(f"setting data.split_layout=pdebench, but {str(path)!r} has a manifest "
                            f"({str(manifest_path(path))!r}): a file this project made keeps the "
                            f"frozen splits its manifest records, never re-split. Use "
                            f"data.split_layout=tail (which reads the manifest), or point data.path "
                            f"at a released PDEBench file (no manifest beside it).")
        if manifest is not None:
            mp = manifest_path(path)
            size = os.path.getsize(path)
            if manifest.get("file_bytes") not in (None, size):
                raise UserError(f"manifest {str(mp)!r} was written for a {manifest['file_bytes']}-"
                                f"byte file but {str(path)!r} has {size} bytes: the manifest is "
                                f"stale. Regenerate the data (force=true) or delete the manifest.")
            if manifest.get("n_samples") not in (None, n):
                raise UserError(f"manifest {str(mp)!r} describes {manifest.get('n_samples')} rows "
                                f"but {str(path)!r} has {n}: the manifest is stale. Regenerate "
                                f"the data (force=true) or delete the manifest.")
            for name, k in wanted.items():
                rng = manifest["splits"].get(name)
                have = 0 if rng is None else rng["stop"] - rng["start"]
                if k > have:
                    raise UserError(f"setting data.n_{name}={k} but the manifest {str(mp)!r} "
                                    f"holds {have} {name} rows; lower data.n_{name} or "
                                    f"regenerate the data with a larger split.")
                if rng is not None and rng["stop"] > n:
                    raise UserError(f"manifest {str(mp)!r}: split {name!r} {rng} runs past the "
                                    f"{n} rows of {str(path)!r}.")
                start = 0 if rng is None else rng["start"]
                splits[name] = np.arange(start, start + k, dtype=np.int64)
            both = _overlap(splits)
            if both is not None:
                raise UserError(f"manifest {str(mp)!r}: splits {both[0]!r} and {both[1]!r} overlap.")
            source = "manifest"
        elif split_layout == "pdebench":
            k = int(n * pdebench_test_ratio)    # PDEBench: test_idx = int(num_samples_max * test_ratio)
            if n_test > k:
                raise UserError(f"setting data.n_test={n_test} but PDEBench's layout of {str(path)!r} "
                                f"({n} rows, data.pdebench_test_ratio={pdebench_test_ratio:g}) holds "
                                f"{k} test rows ({f'rows 0..{k - 1}' if k else 'none'}); lower "
                                f"data.n_test to at most {k} (the first n_test of them are scored), "
                                f"or raise data.pdebench_test_ratio.")
            if k + n_val + n_train > n:
                raise UserError(f"{str(path)!r} has {n} rows, {n - k} of them PDEBench training rows "
                                f"(rows {k}..{n - 1}; the first {k} are its test set), but data.n_val="
                                f"{n_val} + n_train={n_train} = {n_val + n_train} are asked for; lower "
                                f"them so that val and train stay inside PDEBench's training rows.")
            splits = {"train": np.arange(k + n_val, k + n_val + n_train, dtype=np.int64),
                      "val": np.arange(k, k + n_val, dtype=np.int64),
                      "test": np.arange(0, n_test, dtype=np.int64)}
            source = (f"PDEBench layout (its test set: the first {100 * pdebench_test_ratio:g}% of "
                      f"rows, [0, {k}) of {n})")
        else:
            total = n_train + n_val + n_test
            if total > n:
                raise UserError(f"{str(path)!r} has {n} rows but the splits ask for {total} "
                                f"(data.n_train={n_train} + n_val={n_val} + n_test={n_test}); "
                                f"lower them so that train, val and test stay disjoint.")
            splits = {"train": np.arange(0, n_train, dtype=np.int64),
                      "val": np.arange(n_train, n_train + n_val, dtype=np.int64),
                      "test": np.arange(n - n_test, n, dtype=np.int64)}
            source = "index ranges"
        both = _overlap(splits)
        if both is not None:    # by construction never; checked so that no layout can leak rows
            raise UserError(f"{str(path)!r}: splits {both[0]!r} and {both[1]!r} overlap ({source}).")
        norm = _manifest_norm(manifest, splits["train"], f.rr, f.rr_t)
        if norm is None:
            norm = compute_normalizer(f, splits["train"])
    return DatasetView(path=str(path), meta=meta, splits=splits, normalizer=norm,
                       manifest=manifest, reduced_resolution=f.rr, reduced_resolution_t=f.rr_t,
                       pde=f.pde, split_source=source)
