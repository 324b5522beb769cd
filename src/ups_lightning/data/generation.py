"""Data generation, as a library (``python -m ups_lightning.data.generate`` is its command line):
PDEBench-layout data sets of any registered equation, made with its reference solver.

    python -m ups_lightning.data.generate data=NAME                 # a data config's file (conf/data/)
    python -m ups_lightning.data.generate data=NAME out=PATH n_samples=64 nx=256 nt=41 t_max=1 \
        seed=0 <param>=<value> ...                                  # one file, parameters by name

One HDF5 file (``tensor`` (N, nt, nx) float32, ``x-coordinate``, ``t-coordinate`` (nt,), the
equation's parameters as attributes named as PDEBench names them (each spec's ``Parameter.attrs``) and
``pde``; domain (0, 1)) plus ``<file>.manifest.json`` with the splits, seeds, solver settings, grid,
training-split normalisation and generation time. Rows are [train | val | test]; split s row i is
made from seed ``seed * 1_000_000 + offset[s] + i`` (offsets 0, 300_000, 900_000), so the splits
come from disjoint seed ranges and a split's trajectories do not change when another split grows.
Split protocol v2 (benchmark.md section 1): the v1 test split (offset 600_000) was looked at while
settings were chosen, so it is retired and its seed range [600_000, 900_000) is never drawn again;
the small sets use ``seed: 1`` and the full sets ``seed: 0``, so no small row is a full row.

Writes are atomic: the file is built at ``<target>.tmp-<pid>`` and moved into place with
os.replace; on any error or Ctrl-C the temporary file is removed and the target left untouched.
A run killed outright (SIGKILL) cannot clean up: its solver workers notice and exit, and the next
run removes the ``.tmp-<pid>`` files beside its target whose process is gone.
An existing file whose manifest matches the requested settings is kept (``force=true`` remakes it).
In ad-hoc mode (``out=``) all rows are training rows unless ``n_val=`` / ``n_test=`` are given.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ups_lightning.errors import UserError
from ups_lightning.provenance import package_version
from ups_lightning.data import solver as _solver
from ups_lightning.pdes import get_pde, registered
from ups_lightning.pdes.initial import cell_centres
from ups_lightning.data.pdebench import (MANIFEST_FORMAT, SPLITS, PDEBenchFile, compute_normalizer,
                                         load_manifest, manifest_path, write_manifest)

__all__ = ["SEED_STRIDE", "SPLIT_SEED_OFFSETS", "RETIRED_SEED_OFFSETS", "split_seeds", "dataset_settings",
           "write_dataset", "prepare_target", "seeds_record", "remove_stale_temps", "run", "on_signal"]

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_000
SPLIT_SEED_OFFSETS = {"train": 0, "val": 300_000, "test": 900_000}
RETIRED_SEED_OFFSETS = {"test (v1)": 600_000}   # never drawn again: chosen on (benchmark.md v2)
# rows a split can hold before its seeds run into the next split's (or the next seed's) range
_SPLIT_CAPACITY = {"train": 300_000, "val": 300_000, "test": 100_000}
# seed * SEED_STRIDE + offsets must stay inside int64
_MAX_SEED = (np.iinfo(np.int64).max - SEED_STRIDE) // SEED_STRIDE


def split_seeds(seed: int, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Seeds of each split: ``seed * 1_000_000 + offset[split] + i``."""
    return {s: seed * SEED_STRIDE + SPLIT_SEED_OFFSETS[s] + np.arange(counts.get(s, 0), dtype=np.int64)
            for s in SPLITS}


def _num(name: str, value: Any, kind: type, *, minimum: float | None = None,
         positive: bool = False, maximum: float | None = None, why: str = "") -> Any:
    why = f" ({why})" if why else ""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        v = kind(value)
        if kind is int and float(value) != v:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"setting {name}={value!r} must be "
                        f"{'an integer' if kind is int else 'a number'}{why}.") from None
    if not np.isfinite(v) or (positive and v <= 0) or (minimum is not None and v < minimum):
        need = "> 0" if positive else f">= {minimum}"
        raise UserError(f"setting {name}={value!r} must be a finite number {need}{why}.")
    if maximum is not None and v > maximum:
        raise UserError(f"setting {name}={value!r} must be <= {maximum}{why}.")
    return v


def dataset_settings(*, pde, params, nx, nt, t_max, seed, n_train, n_val=0, n_test=0,
                     where: str = "setting") -> dict:
    """Validated generation settings (the manifest's ``settings``, used to tell a file is current).
    ``where`` names the parameters' origin in errors (``setting``, ``setting data.params``)."""
    spec = get_pde(pde, "setting data.pde")
    s = {
        "pde": spec.name,
        **spec.check_params(dict(params), where),
        "nx": _num("nx", nx, int, minimum=8, why="cells of the periodic grid"),
        "nt": _num("nt", nt, int, minimum=2, why="saved frames, including t = 0"),
        "t_max": _num("t_max", t_max, float, positive=True, why="the last frame's time"),
        "seed": _num("seed", seed, int, minimum=0, maximum=_MAX_SEED),
        "n_train": _num("n_train", n_train, int, minimum=0),
        "n_val": _num("n_val", n_val, int, minimum=0),
        "n_test": _num("n_test", n_test, int, minimum=0),
        "scheme": spec.solver_settings["scheme"],
        "initial_condition": spec.recipe_id,
    }
    if "cfl" in spec.solver_settings:
        s["cfl"] = spec.solver_settings["cfl"]
    for split, cap in _SPLIT_CAPACITY.items():
        if s[f"n_{split}"] > cap:
            raise UserError(f"setting n_{split}={s[f'n_{split}']}: at most {cap} {split} rows (the "
                            f"splits' seed ranges would overlap).")
    if s["n_train"] + s["n_val"] + s["n_test"] < 1:
        raise UserError("settings n_train + n_val + n_test (or n_samples) must be at least 1.")
    return s


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0          # someone else's process (or a pid we cannot test): keep its file
    stat = Path(f"/proc/{pid}/stat")     # a zombie is dead too (where /proc tells)
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove ``<target>.tmp-<pid>`` and ``<target>.manifest.json.tmp-<pid>`` left beside
    ``target`` by a run that was killed outright (its pid no longer runs); return them."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(target.name)}(?:\.manifest\.json)?\.tmp-(\d+)$")
    removed = []
    for p in sorted(target.parent.iterdir()):
        m = pattern.match(p.name)
        if m is None or not p.is_file() or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):     # another run may clean up at once
            p.unlink()
            removed.append(p)
            log.warning("removed %s: a temporary file left by process %s, which is no longer "
                        "running (killed mid-write)", p, m.group(1))
    return removed


def _is_current(path: Path, manifest: dict | None, settings: dict) -> bool:
    if manifest is None or manifest.get("settings") != settings:
        return False
    try:
        if manifest.get("file_bytes") != path.stat().st_size:
            return False
        with PDEBenchFile(path, pde=settings["pde"]) as f:
            n = settings["n_train"] + settings["n_val"] + settings["n_test"]
            return f.meta.shape == (n, settings["nt"], settings["nx"], f.spec.n_channels)
    except UserError:
        return False


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def prepare_target(target: Path, is_current: Callable[[dict | None], bool], force: bool,
                   say: Callable[[str], None]) -> dict | None:
    """Before a long generation (1D and 2D alike): the kept manifest when ``target`` is current (and
    ``force`` is off), else None once ``target`` may be written; an existing file of other settings
    is refused unless ``force``, a directory in the way or an unmakeable parent is one paragraph."""
    for p in (target, manifest_path(target)):    # found now, not after a long generation
        if p.exists() and not p.is_file():
            raise UserError(f"output path {str(p)!r} exists and is not a file.")
    remove_stale_temps(target)
    if target.exists():
        try:
            manifest = load_manifest(target)
        except UserError:
            if not force:
                raise
            manifest = None
        if not force and is_current(manifest):
            say(f"{target} is up to date (manifest {manifest_path(target).name} matches these "
                f"settings); nothing to do. Pass force=true to remake it.")
            return manifest
        if not force:
            why = ("has no manifest" if manifest is None else
                   "was made with different settings (or its manifest is stale)")
            raise UserError(f"{str(target)!r} already exists and {why}; refusing to overwrite it. "
                            f"Pass force=true to remake it, or choose another output path.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the directory of output path {str(target)!r}: "
                        f"{exc.strerror or exc}.") from None
    return None


def seeds_record(seed: int, seeds_by_split: dict[str, np.ndarray]) -> dict:
    """The manifest's ``seeds``: the rule, the offsets and each split's seed range."""
    return {"rule": "row i of split s: seed * 1_000_000 + offset[s] + i", "seed": seed,
            "offsets": dict(SPLIT_SEED_OFFSETS), "retired_offsets": dict(RETIRED_SEED_OFFSETS),
            **{s: {"start": int(v[0]) if v.size else None, "stop": int(v[-1]) + 1 if v.size else None}
               for s, v in seeds_by_split.items()}}


def write_dataset(
    path: str | os.PathLike,
    *,
    pde: str,
    params: dict,
    nx: int,
    nt: int,
    t_max: float,
    seed: int,
    n_train: int,
    n_val: int = 0,
    n_test: int = 0,
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
    norm_reductions: tuple[tuple[int, int], ...] = (),
    quiet: bool = False,
    where: str = "setting",
) -> dict:
    """Make (or keep, when current) the data file at ``path`` and its manifest; return the manifest.

    ``norm_reductions``: extra (reduced_resolution, reduced_resolution_t) pairs at which to record
    the training split's normalisation too (the (1, 1) entry is always recorded).
    """
    settings = dataset_settings(pde=pde, params=params, nx=nx, nt=nt, t_max=t_max, seed=seed,
                                n_train=n_train, n_val=n_val, n_test=n_test, where=where)
    spec = get_pde(settings["pde"])
    params = {k: settings[k] for k in spec.param_names}
    workers = _num("workers", workers, int, minimum=1)
    target = Path(path)
    kept = prepare_target(target, lambda m: _is_current(target, m, settings), force, lambda m: _say(m, quiet))
    if kept is not None:
        return kept

    counts = {s: settings[f"n_{s}"] for s in SPLITS}
    seeds_by_split = split_seeds(settings["seed"], counts)
    seeds = np.concatenate([seeds_by_split[s] for s in SPLITS])
    n = int(seeds.size)
    starts = np.cumsum([0] + [counts[s] for s in SPLITS])
    splits = {s: {"start": int(starts[i]), "stop": int(starts[i + 1])} for i, s in enumerate(SPLITS)}
    x = cell_centres(nx)
    t = np.linspace(0.0, settings["t_max"], settings["nt"])

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    t0 = time.perf_counter()
    _say(f"generating {n} trajectories ({counts['train']} train / {counts['val']} val / "
         f"{counts['test']} test) of {spec.title} ({', '.join(f'{k}={v:g}' for k, v in params.items())}), "
         f"{nx} cells x {nt} frames, "
         f"t in [0, {settings['t_max']}], workers={workers} -> {target}", quiet)
    try:
        _write_h5(tmp, seeds, settings, x, t, workers, progress)
        seconds = time.perf_counter() - t0
        norms = []
        with PDEBenchFile(tmp, pde=spec.name) as f:     # validates what was written (finite, layout)
            norm_rows = np.arange(splits["train"]["start"], splits["train"]["stop"])
            pairs = [(1, 1)] + [tuple(p) for p in norm_reductions if tuple(p) != (1, 1)]
        for rr, rr_t in pairs:
            if norm_rows.size == 0:
                break
            if nx % rr or (nt - 1) % rr_t:
                continue
            with PDEBenchFile(tmp, rr, rr_t, spec.name) as f:
                stats = compute_normalizer(f, norm_rows).to_dict()
            norms.append({"split": "train", "rows": [int(norm_rows[0]), int(norm_rows[-1]) + 1],
                          "reduced_resolution": int(rr), "reduced_resolution_t": int(rr_t),
                          **stats})
        manifest = {
            "format": MANIFEST_FORMAT,
            "file": target.name,
            "pde": settings["pde"],
            "n_samples": n,
            "file_bytes": tmp.stat().st_size,
            "settings": settings,
            "params": params,
            "grid": {"nx": nx, "nt": nt, "t_max": settings["t_max"], "x_left": 0.0,
                     "domain_length": 1.0, "dx": 1.0 / nx,
                     "dt_save": settings["t_max"] / (nt - 1)},
            "splits": splits,
            "seeds": seeds_record(settings["seed"], seeds_by_split),
            "solver": dict(spec.solver_settings),
            "normalization": norms,
            "generation": {
                "seconds": round(seconds, 3),
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "workers": workers,
                "package_version": package_version(),
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        _check_stop()
        old_manifest = manifest_path(target)
        if old_manifest.exists():
            old_manifest.unlink()        # never leave an old manifest beside new data
        os.replace(tmp, target)
        write_manifest(target, manifest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _say(f"wrote {target} ({n} x {nt} x {nx}, {target.stat().st_size / 1e6:.1f} MB) and "
         f"{manifest_path(target).name}; generation time {seconds:.1f} s", quiet)
    return manifest


def _write_h5(tmp: Path, seeds: np.ndarray, settings: dict, x: np.ndarray, t: np.ndarray,
              workers: int, progress: bool) -> None:
    import h5py

    n, nx, nt = int(seeds.size), settings["nx"], settings["nt"]
    spec = get_pde(settings["pde"])
    try:
        h5 = h5py.File(tmp, "w")
    except OSError as exc:
        raise UserError(f"cannot write {str(tmp)!r} (the temporary file beside the target): "
                        f"{exc}.") from None
    chunks = _solver.iter_trajectory_chunks(spec.name, {k: settings[k] for k in spec.param_names}, n,
                                            nx, nt, settings["t_max"], seeds, workers=workers)
    bar = _solver._progress_bar(progress, "trajectories", n)
    with h5, contextlib.closing(chunks), bar as (prog, task):
        c = spec.n_channels     # PDEBench's layout: (N, T, X) for one field, (N, T, X, C) else
        shape = (n, nt, nx) if c == 1 else (n, nt, nx, c)
        ds = h5.create_dataset("tensor", shape=shape, dtype=np.float32, chunks=(1, *shape[1:]))
        h5.create_dataset("x-coordinate", data=x.astype(np.float32))
        h5.create_dataset("t-coordinate", data=t.astype(np.float32))
        h5.attrs["pde"] = spec.name
        for p in spec.params:
            h5.attrs[p.attrs[0]] = float(settings[p.name])
        for rows, fields in chunks:
            _check_stop()
            for r, field in zip(rows, fields):
                ds[int(r)] = field if c > 1 else field[..., 0]
            if prog is not None:
                prog.advance(task, len(rows))
        h5.flush()
        _check_stop()


def _flag(name: str, value: Any, default: bool) -> bool:
    # bool("maybe") is True: a mistyped force= must not remake (overwrite) a data set
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"setting {name}={value!r} must be true or false.")
    return value


_AD_HOC_KEYS = ("n_samples", "nx", "nt", "t_max", "seed", "n_val", "n_test")


def _param_keys() -> list[str]:
    """Every registered equation's parameter names: top-level keys of the single-file mode."""
    return sorted({p.name for spec in registered().values() for p in spec.params})


def run(cfg: Any) -> dict | list:
    """The CLI's task, on a composed config (DictConfig or mapping). A mixed data config (one with
    ``members``) makes each member's file; returns the manifest(s)."""
    from omegaconf import OmegaConf

    get = (lambda k: OmegaConf.select(cfg, k)) if OmegaConf.is_config(cfg) else cfg.get
    workers = get("workers") if get("workers") is not None else 2
    progress = _flag("progress", get("progress"), True)
    force = _flag("force", get("force"), False)
    data = get("data")
    d = ((lambda k: OmegaConf.select(data, k)) if OmegaConf.is_config(data) else data.get) \
        if data is not None else (lambda k: None)
    out = get("out")
    given = {k: get(k) for k in _param_keys() if get(k) is not None}
    if out is not None:
        if d("pde") is None:
            raise UserError(f"single-file generation (out={out}) needs the equation: choose it with "
                            "data=NAME (a single-equation config under conf/data/).")
        pde = get_pde(d("pde"), "setting data.pde") if d("pde") != "mixed" else None
        if pde is None:
            raise UserError("out=FILE makes one file of one equation: choose it with data=<name> (e.g. "
                            "data=<a single-equation config under conf/data/>), not a mixed data config.")
        if pde.spatial_dims != 1:
            two_d = sorted(f.stem for f in (Path(__file__).parents[1] / "conf" / "data").glob("*.yaml")
                           if f.stem.startswith(pde.name))
            raise UserError(f"out=FILE makes a 1D file, and {pde.name} is {pde.spatial_dims}D: make it from its "
                            f"data config instead (data={' or data='.join(two_d) or '<a ' + pde.name + ' config>'}, "
                            f"with data.path=, data.nx=, data.ny=, data.n_train=... to change it).")
        missing = [k for k in ("n_samples", "nx", "nt", "t_max") if get(k) is None]
        if missing:
            raise UserError(f"single-file generation (out={out}) also needs "
                            f"{', '.join(k + '=...' for k in missing)}.")
        foreign = sorted(set(given) - set(pde.param_names))
        if foreign:
            raise UserError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a "
                            f"parameter of {pde.name} ({pde.equation}); its parameters are "
                            f"{', '.join(pde.param_names)}.")
        params = {**(_container(d("params")) or pde.default_params()), **given}
        n_samples = _num("n_samples", get("n_samples"), int, minimum=1)
        n_val = _num("n_val", get("n_val") or 0, int, minimum=0)
        n_test = _num("n_test", get("n_test") or 0, int, minimum=0)
        if n_val + n_test > n_samples:
            raise UserError(f"settings n_val={n_val} + n_test={n_test} exceed n_samples={n_samples}.")
        return write_dataset(out, pde=pde.name, params=params, nx=get("nx"), nt=get("nt"),
                             t_max=get("t_max"), seed=get("seed") if get("seed") is not None else 0,
                             n_train=n_samples - n_val - n_test, n_val=n_val, n_test=n_test,
                             workers=workers, progress=progress, force=force)
    stray = [k for k in (*_AD_HOC_KEYS, *_param_keys()) if get(k) is not None]
    if stray:
        raise UserError(f"{', '.join(k + '=' + str(get(k)) for k in stray)}: these are single-file "
                        f"settings and need out=PATH; to change the data config's file use "
                        f"data.<key>=... (e.g. data.params.<name>=... data.path=...).")
    if data is None:
        raise UserError("no data config selected: pass data=NAME (a file under conf/data/)"
                        ", or out=PATH with n_samples=, nx=, nt=, t_max= and the "
                        "equation's parameters.")
    if d("members") is not None:
        return [run({"data": member, "workers": workers, "progress": progress, "force": force})
                for member in d("members").values()]
    spec = get_pde(d("pde"), "setting data.pde") if d("pde") is not None else None
    two_d = spec is not None and spec.spatial_dims == 2
    for key in ("path", "pde", "nx", *(("ny",) if two_d else ()), "nt", "t_max", "seed", "n_train", "n_val",
                "n_test"):
        if d(key) is None:
            raise UserError(f"data config {d('name')!r} has no data.{key}.")
    rr = _check_trainable(d)
    if two_d:
        from ups_lightning.data.generation2d import write_dataset_2d

        return write_dataset_2d(spec, d("path"), shape=(d("ny"), d("nx")), nt=d("nt"), t_max=d("t_max"),
                                seed=d("seed"), counts={s: d(f"n_{s}") for s in SPLITS},
                                params=_container(d("params")) or {}, force=force, workers=workers)
    return write_dataset(d("path"), pde=d("pde"), params=_container(d("params")) or {}, nx=d("nx"),
                         nt=d("nt"), t_max=d("t_max"), seed=d("seed"), n_train=d("n_train"),
                         n_val=d("n_val"), n_test=d("n_test"), workers=workers, progress=progress,
                         force=force, norm_reductions=(tuple(int(v) for v in rr),),
                         where="setting data.params")


def _container(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _check_trainable(d: Any) -> tuple[int, int]:
    """A data config's file is made to be trained and evaluated on: refuse settings training
    would only reject after the (long) generation. Returns the config's reduction."""
    for key, why in (("n_train", "training needs at least one trajectory"),
                     ("n_val", "training validates on the val split"),
                     ("n_test", "evaluation scores the test split")):
        _num(f"data.{key}", d(key), int, minimum=1, why=why)
    nt = _num("data.nt", d("nt"), int, minimum=2)
    rr = _num("data.reduced_resolution", 1 if d("reduced_resolution") is None
              else d("reduced_resolution"), int, minimum=1)
    rr_t = _num("data.reduced_resolution_t", 1 if d("reduced_resolution_t") is None
                else d("reduced_resolution_t"), int, minimum=1)
    for axis in ("nx", "ny") if d("ny") is not None else ("nx",):
        n = _num(f"data.{axis}", d(axis), int, minimum=8)
        if n % rr:
            raise UserError(f"setting data.reduced_resolution={rr} does not divide data.{axis}={n}; "
                            f"choose a divisor of {n} (the reader refuses a non-uniform grid).")
    if (nt - 1) % rr_t:
        raise UserError(f"setting data.reduced_resolution_t={rr_t} does not divide the {nt - 1} "
                        f"intervals between data.nt={nt} frames; choose a divisor of {nt - 1}.")
    if d("initial_step") is not None:
        k = _num("data.initial_step", d("initial_step"), int, minimum=1)
        frames = (nt - 1) // rr_t + 1
        if frames < k + 1:
            raise UserError(f"settings data.nt={nt} with data.reduced_resolution_t={rr_t} give "
                            f"{frames} frame(s), but data.initial_step={k} needs at least {k + 1} "
                            f"(the given frames plus one to predict); raise data.nt or lower "
                            f"data.initial_step.")
    return rr, rr_t


_STOP: dict[str, int | None] = {"signal": None}


def _raise_for(signum: int):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def on_signal(signum, frame) -> None:
    """CLI handler for SIGINT/SIGTERM: remember the request and unwind. Python can swallow an
    exception raised inside a finaliser or C callback, so the write loop also polls the flag
    (``_check_stop``) and aborts at its next checkpoint."""
    _STOP["signal"] = signum
    _raise_for(signum)


def _check_stop() -> None:
    if _STOP["signal"] is not None:
        _raise_for(_STOP["signal"])
