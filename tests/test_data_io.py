"""PDEBench-layout reader, splits, normaliser, manifest, generation CLI and inspect CLI."""
from __future__ import annotations

from ups_lightning import CONF_DIR

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ups_lightning.data import generation as G
from ups_lightning.data import solver as S
from ups_lightning.data.pdebench import (Normalizer, PDEBenchFile, compute_normalizer,
                                         load_manifest, manifest_path, open_dataset)
from ups_lightning.errors import UserError

PY = sys.executable


# -- synthetic files in both PDEBench layouts --------------------------------------------------
def _write(path: Path, data: np.ndarray, *, domain=(0.0, 1.0), extra_t=False, t_max=2.0,
           nu_attr="Nu", nu=0.001, **overrides) -> Path:
    n_t, n_x = data.shape[1], data.shape[2]
    dx = (domain[1] - domain[0]) / n_x
    x = domain[0] + (np.arange(n_x) + 0.5) * dx
    dt = t_max / (n_t - 1)
    t = np.arange(n_t + (1 if extra_t else 0)) * dt
    with h5py.File(path, "w") as h5:
        h5.create_dataset(overrides.get("tensor_key", "tensor"), data=data)
        h5.create_dataset("x-coordinate", data=overrides.get("x", x).astype(np.float32))
        h5.create_dataset("t-coordinate", data=overrides.get("t", t).astype(np.float32))
        if nu_attr:
            h5.attrs[nu_attr] = nu
    return path


def _data(n=12, n_t=11, n_x=32, channels=False, seed=0):
    rng = np.random.default_rng(seed)
    d = (rng.standard_normal((n, n_t, n_x)) * 0.5 + 0.1 * np.arange(n)[:, None, None])
    d = d.astype(np.float32)
    return d[..., None] if channels else d


@pytest.fixture
def layout_a(tmp_path):
    """Ours: x in (0, 1), T t-coordinates, (N, T, X)."""
    d = _data()
    return _write(tmp_path / "a.hdf5", d), d


@pytest.fixture
def layout_b(tmp_path):
    """Released PDEBench: x in (-1, 1), T+1 t-coordinates, here (N, T, X, 1), attr `nu`."""
    d = _data(channels=True, seed=1)
    return _write(tmp_path / "b.hdf5", d, domain=(-1.0, 1.0), extra_t=True, nu_attr="nu",
                  nu=0.01), d


def test_reader_layout_unit_interval(layout_a):
    path, d = layout_a
    with PDEBenchFile(path) as f:
        m = f.meta
        assert (m.n_samples, m.n_t, m.n_x, m.n_channels) == (12, 11, 32, 1)
        assert m.dx == pytest.approx(1 / 32, rel=1e-6)
        assert m.x_left == pytest.approx(0.0, abs=1e-6)
        assert m.domain_length == pytest.approx(1.0, rel=1e-6)
        assert m.dt == pytest.approx(0.2, rel=1e-6) and m.t.size == 11
        assert m.pde == "burgers1d" and f.spec.name == "burgers1d"      # inferred from attr `Nu`
        assert m.params == {"nu": pytest.approx(0.001)}
        np.testing.assert_allclose(m.xi, (np.arange(32) + 0.5) / 32, atol=1e-6)
        out = f.read(slice(None))
        assert out.shape == (12, 11, 32, 1) and out.dtype == np.float32
        np.testing.assert_array_equal(out[..., 0], d)


def test_reader_layout_pdebench_release(layout_b):
    path, d = layout_b
    with PDEBenchFile(path) as f:
        m = f.meta
        assert m.shape == (12, 11, 32, 1)
        assert m.dx == pytest.approx(2 / 32, rel=1e-6)
        assert m.x_left == pytest.approx(-1.0, abs=1e-6)
        assert m.domain_length == pytest.approx(2.0, rel=1e-6)
        assert m.t.size == 11 and m.t[-1] == pytest.approx(2.0)     # the extra entry dropped
        assert m.dt == pytest.approx(0.2, rel=1e-6)
        assert m.pde == "burgers1d"                                    # inferred from attr `nu`
        assert m.params == {"nu": pytest.approx(0.01)}
        np.testing.assert_allclose(m.xi, (np.arange(32) + 0.5) / 32, atol=1e-6)
        np.testing.assert_array_equal(f.read([3, 4]), d[[3, 4]])


def test_reader_without_nu_attribute(tmp_path):
    path = _write(tmp_path / "c.hdf5", _data(n=2), nu_attr=None)
    with PDEBenchFile(path, pde="burgers1d") as f:          # the equation named, nu not stated
        assert f.meta.pde == "burgers1d" and f.meta.params == {}
    with pytest.raises(UserError, match="cannot tell which equation"):   # nothing stated at all
        PDEBenchFile(path)
    # PDEBench's released files often carry nu in the file name only
    named = _write(tmp_path / "1D_Burgers_Sols_Nu0.002.hdf5", _data(n=2), nu_attr=None)
    with PDEBenchFile(named) as f:
        assert f.meta.pde == "burgers1d" and f.meta.params == {"nu": pytest.approx(0.002)}


def test_read_order_duplicates_and_index_kinds(layout_a):
    path, d = layout_a
    with PDEBenchFile(path) as f:
        idx = [7, 2, 3, 2, 11, 0]
        np.testing.assert_array_equal(f.read(idx)[..., 0], d[idx])
        np.testing.assert_array_equal(f.read(np.array(idx))[..., 0], d[idx])
        np.testing.assert_array_equal(f.read(5)[..., 0], d[[5]])
        np.testing.assert_array_equal(f.read(-1)[..., 0], d[[-1]])
        np.testing.assert_array_equal(f.read(slice(2, 9, 3))[..., 0], d[2:9:3])
        assert f.read([]).shape == (0, 11, 32, 1)
        with pytest.raises(UserError, match="row 12 requested.*12 rows"):
            f.read([1, 12])


def test_reduction_is_strided_slicing(layout_b):
    path, d = layout_b
    with PDEBenchFile(path, reduced_resolution=4, reduced_resolution_t=5) as f:
        m = f.meta
        assert m.shape == (12, 3, 8, 1)
        assert m.dx == pytest.approx(2 / 32 * 4, rel=1e-6)
        assert m.dt == pytest.approx(1.0, rel=1e-6)
        np.testing.assert_allclose(m.t, [0.0, 1.0, 2.0], atol=1e-6)
        # the physical domain is unchanged; xi are the true positions of the kept points
        assert m.x_left == pytest.approx(-1.0, abs=1e-6)
        assert m.domain_length == pytest.approx(2.0, rel=1e-6)
        np.testing.assert_allclose(m.xi, (4 * np.arange(8) + 0.5) / 32, atol=1e-6)
        np.testing.assert_array_equal(f.read([5, 1]), d[[5, 1]][:, ::5, ::4])


@pytest.mark.parametrize("kw,msg", [
    (dict(reduced_resolution=3), "reduced_resolution=3 does not divide the grid of X = 32"),
    (dict(reduced_resolution_t=3), "reduced_resolution_t=3 does not divide the 10 intervals"),
    (dict(reduced_resolution=0), "reduced_resolution=0 must be a positive integer"),
    (dict(reduced_resolution_t=-2), "reduced_resolution_t=-2 must be a positive integer"),
    (dict(reduced_resolution=1.5), "reduced_resolution=1.5 must be a positive integer"),
    (dict(pde="navier_stokes"), "'navier_stokes' is not a known equation.*burgers1d"),
])
def test_bad_settings(layout_a, kw, msg):
    with pytest.raises(UserError, match=msg):
        PDEBenchFile(layout_a[0], **kw)


def test_bad_files(tmp_path):
    cases = []
    missing = tmp_path / "missing.hdf5"
    cases.append((missing, r"does not exist.*make data"))
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5")
    cases.append((text, "is not an HDF5 file"))
    no_tensor = tmp_path / "no_tensor.hdf5"
    _write(no_tensor, _data(n=2), tensor_key="u")
    cases.append((no_tensor, r"no 'tensor' dataset \(found keys: \['t-coordinate', 'u', "
                             r"'x-coordinate'\]\)"))
    rank = tmp_path / "rank.hdf5"
    with h5py.File(rank, "w") as h5:
        h5["tensor"] = np.zeros((2, 3), np.float32)
        h5.attrs["Nu"] = 0.001                 # says its equation: the layout is what is wrong
    cases.append((rank, r"'tensor' has shape \(2, 3\) \(rank 2\)"))
    xbad = tmp_path / "xbad.hdf5"
    _write(xbad, _data(n=2), x=np.linspace(0, 1, 31))
    cases.append((xbad, "'x-coordinate' has 31 entries but 'tensor' has X = 32"))
    tbad = tmp_path / "tbad.hdf5"
    _write(tbad, _data(n=2), t=np.arange(13.0))
    cases.append((tbad, "'t-coordinate' has 13 entries but 'tensor' has T = 11"))
    uneven = tmp_path / "uneven.hdf5"
    _write(uneven, _data(n=2), x=np.sort(np.random.default_rng(0).uniform(0, 1, 32)))
    cases.append((uneven, "'x-coordinate' must be increasing and evenly spaced"))
    chans = tmp_path / "chans.hdf5"
    _write(chans, np.zeros((2, 11, 32, 3), np.float32))
    cases.append((chans, "3 channels.*burgers1d has 1"))
    silent = tmp_path / "silent.hdf5"
    _write(silent, _data(n=2), nu_attr=None)
    cases.append((silent, "cannot tell which equation the file holds.*data.pde"))
    for path, msg in cases:
        with pytest.raises(UserError, match=msg) as info:
            PDEBenchFile(path)
        assert str(path) in str(info.value)
    with pytest.raises(UserError, match="is not a file"):
        PDEBenchFile(tmp_path)


def test_nan_is_reported_with_file_and_row(tmp_path):
    d = _data(n=6)
    d[4, 7, 3] = np.nan
    path = _write(tmp_path / "nan.hdf5", d)
    with PDEBenchFile(path) as f:
        f.read([0, 1, 5])                                  # clean rows read fine
        with pytest.raises(UserError, match=r"nan.hdf5: row 4 of 'tensor' holds NaN/Inf.*frame 7"):
            f.read([1, 4])
    d[4, 7, 3] = np.inf
    path = _write(tmp_path / "inf.hdf5", d)
    with pytest.raises(UserError, match="row 4"):
        open_dataset(path, n_train=6, n_val=0, n_test=0)


def test_big_file_opens_without_reading_it(tmp_path):
    """A 10000 x 201 x 1024 (7.7 GB) dataset: opening and reading two rows is instant."""
    path = tmp_path / "big.hdf5"
    with h5py.File(path, "w") as h5:           # chunks never written: nothing on disk
        ds = h5.create_dataset("tensor", shape=(10000, 201, 1024), dtype=np.float32,
                               chunks=(1, 201, 1024))
        ds[9999] = 1.0
        h5["x-coordinate"] = (-1 + (np.arange(1024) + 0.5) * 2 / 1024).astype(np.float32)
        h5["t-coordinate"] = (np.arange(202) * 0.01).astype(np.float32)
        h5.attrs["Nu"] = 0.001
    assert path.stat().st_size < 10e6
    t0 = time.perf_counter()
    with PDEBenchFile(path, reduced_resolution=4, reduced_resolution_t=5) as f:
        assert f.meta.shape == (10000, 41, 256, 1)
        out = f.read([9999, 17])
    assert time.perf_counter() - t0 < 5.0
    assert out.shape == (2, 41, 256, 1) and (out[0] == 1).all() and (out[1] == 0).all()


# -- normaliser ---------------------------------------------------------------------------------
def test_normalizer_numpy_and_torch():
    import torch

    norm = Normalizer([0.5], [2.0])
    u = np.random.default_rng(0).standard_normal((3, 4, 5, 1)).astype(np.float32)
    z = norm.normalize(u)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, (u - 0.5) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(norm.denormalize(z), u, rtol=1e-6, atol=1e-6)
    ut = torch.from_numpy(u)
    zt = norm.normalize(ut)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-6)
    np.testing.assert_allclose(norm.denormalize(zt).numpy(), u, rtol=1e-6, atol=1e-6)
    assert norm.denormalize(ut.double()).dtype == torch.float64
    back = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert back == norm
    with pytest.raises(ValueError):
        Normalizer([0.0], [0.0])


def test_compute_normalizer_is_exact_over_rows(layout_b):
    path, d = layout_b
    rows = [0, 3, 4, 5, 9]
    with PDEBenchFile(path) as f:
        norm = compute_normalizer(f, rows, chunk=2)
    ref = d[rows].astype(np.float64)
    np.testing.assert_allclose(norm.mean, [ref.mean()], rtol=1e-12)
    np.testing.assert_allclose(norm.std, [ref.std()], rtol=1e-12)
    with PDEBenchFile(path, 4, 5) as f:
        red = compute_normalizer(f, rows)
    np.testing.assert_allclose(red.mean, [d[rows][:, ::5, ::4].astype(np.float64).mean()],
                               rtol=1e-12)


# -- splits -------------------------------------------------------------------------------------
def test_splits_from_index_ranges_without_manifest(layout_a):
    path, d = layout_a
    view = open_dataset(path, n_train=5, n_val=3, n_test=2)
    assert view.manifest is None and view.split_source == "index ranges"
    assert view.splits["train"].tolist() == [0, 1, 2, 3, 4]
    assert view.splits["val"].tolist() == [5, 6, 7]
    assert view.splits["test"].tolist() == [10, 11]          # the LAST rows, as PDEBench
    train = d[:5].astype(np.float64)
    np.testing.assert_allclose(view.normalizer.mean, [train.mean()], rtol=1e-12)
    np.testing.assert_allclose(view.normalizer.std, [train.std()], rtol=1e-12)
    assert abs(view.normalizer.mean[0] - d.astype(np.float64).mean()) > 1e-3   # train only
    np.testing.assert_array_equal(view.read("test")[..., 0], d[10:])
    np.testing.assert_array_equal(view.read("val", rows=[2, 0])[..., 0], d[[7, 5]])
    with pytest.raises(UserError, match=r"has 12 rows but the splits ask for 13 \(data.n_train=8"):
        open_dataset(path, n_train=8, n_val=3, n_test=2)
    with pytest.raises(UserError, match="data.n_train=0"):
        open_dataset(path, n_train=0, n_val=3, n_test=2)
    with pytest.raises(UserError, match="data.n_val=-1"):
        open_dataset(path, n_train=1, n_val=-1, n_test=2)


def test_splits_and_normaliser_from_manifest(tiny_burgers_file):
    man = load_manifest(tiny_burgers_file)
    assert man["splits"] == {"train": {"start": 0, "stop": 16}, "val": {"start": 16, "stop": 20},
                             "test": {"start": 20, "stop": 24}}
    view = open_dataset(tiny_burgers_file, n_train=16, n_val=4, n_test=4)
    assert view.split_source == "manifest"
    assert view.meta.shape == (24, 21, 64, 1)
    entry = man["normalization"][0]
    assert entry["rows"] == [0, 16] and entry["reduced_resolution"] == 1
    assert view.normalizer == Normalizer.from_dict(entry)
    with PDEBenchFile(tiny_burgers_file) as f:
        computed = compute_normalizer(f, np.arange(16))
        everything = compute_normalizer(f, np.arange(24))
    np.testing.assert_allclose(view.normalizer.mean, computed.mean, rtol=1e-12)
    np.testing.assert_allclose(view.normalizer.std, computed.std, rtol=1e-12)
    assert not np.allclose(computed.mean, everything.mean, rtol=1e-6)
    # smaller n: the first n of each manifest split
    small = open_dataset(tiny_burgers_file, n_train=10, n_val=2, n_test=3)
    assert small.splits["train"].tolist() == list(range(10))
    assert small.splits["val"].tolist() == [16, 17]
    assert small.splits["test"].tolist() == [20, 21, 22]
    assert small.read("test").shape == (3, 21, 64, 1)
    with PDEBenchFile(tiny_burgers_file) as f:
        np.testing.assert_allclose(small.normalizer.mean,
                                   compute_normalizer(f, np.arange(10)).mean, rtol=1e-12)
    # reduced: computed at that reduction
    red = open_dataset(tiny_burgers_file, n_train=16, n_val=4, n_test=4, reduced_resolution=2,
                       reduced_resolution_t=4)
    assert red.meta.shape == (24, 6, 32, 1)
    with PDEBenchFile(tiny_burgers_file, 2, 4) as f:
        assert red.normalizer.mean[0] == pytest.approx(compute_normalizer(f, range(16)).mean[0],
                                                       rel=1e-12)
    with pytest.raises(UserError, match="data.n_val=5 but the manifest .* holds 4 val rows"):
        open_dataset(tiny_burgers_file, n_train=16, n_val=5, n_test=4)


def test_manifest_problems_are_user_errors(tmp_path, layout_a):
    path, _ = layout_a
    mp = manifest_path(path)
    assert mp.name == "a.hdf5.manifest.json"
    assert load_manifest(path) is None
    mp.write_text("{not json")
    with pytest.raises(UserError, match="a.hdf5.manifest.json' is not valid JSON"):
        open_dataset(path, n_train=1, n_val=0, n_test=0)
    mp.write_text(json.dumps({"splits": {"train": {"start": 0, "stop": 20}}, "n_samples": 20}))
    with pytest.raises(UserError, match="describes 20 rows .* has 12: the manifest is stale"):
        open_dataset(path, n_train=1, n_val=0, n_test=0)
    mp.write_text(json.dumps({"splits": {"train": {"start": 5}}}))
    with pytest.raises(UserError, match="split 'train' must be"):
        load_manifest(path)


# -- generation ---------------------------------------------------------------------------------
def test_generated_file_layout_and_manifest(tiny_burgers_file):
    with h5py.File(tiny_burgers_file, "r") as h5:
        assert h5["tensor"].shape == (24, 21, 64) and h5["tensor"].dtype == np.float32
        assert h5["x-coordinate"].shape == (64,) and h5["t-coordinate"].shape == (21,)
        assert float(h5.attrs["Nu"]) == 0.001 and h5.attrs["pde"] == "burgers1d"
        np.testing.assert_allclose(h5["x-coordinate"][...], (np.arange(64) + 0.5) / 64, rtol=1e-6)
        np.testing.assert_allclose(h5["t-coordinate"][...], np.linspace(0, 2, 21), rtol=1e-6)
        data = h5["tensor"][...]
    man = load_manifest(tiny_burgers_file)
    assert man["seeds"]["val"] == {"start": 300_000, "stop": 300_004}
    assert man["solver"]["cfl"] == 0.25 and man["params"] == {"nu": 0.001}
    assert man["pde"] == "burgers1d" and man["settings"]["nu"] == 0.001
    assert man["generation"]["seconds"] > 0 and man["generation"]["package_version"]
    # rows are the solver's trajectories for the recorded seeds (test row 1 -> seed 900_001)
    ref = S.generate_trajectories("burgers1d", {"nu": 0.001}, 1, 64, 21, 2.0, [900_001], workers=1,
                                  progress=False)
    np.testing.assert_array_equal(data[21], ref[0, ..., 0])


def test_generate_keeps_current_file_and_refuses_foreign_one(tmp_path, capsys):
    path = tmp_path / "d.hdf5"
    kw = dict(pde="burgers1d", params={"nu": 0.01}, nx=16, nt=3, t_max=0.1, seed=1, n_train=3,
              workers=1, progress=False)
    G.write_dataset(path, **kw)
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    G.write_dataset(path, **kw)
    assert "up to date" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="already exists and was made with different settings"):
        G.write_dataset(path, **{**kw, "params": {"nu": 0.02}})
    G.write_dataset(path, force=True, **{**kw, "params": {"nu": 0.02}})
    assert load_manifest(path)["params"] == {"nu": 0.02}
    foreign = _write(tmp_path / "foreign.hdf5", _data(n=2))
    with pytest.raises(UserError, match="already exists and has no manifest"):
        G.write_dataset(foreign, **kw)


@pytest.mark.parametrize("exc", [RuntimeError("solver crashed"), KeyboardInterrupt()])
def test_generation_is_atomic(tmp_path, monkeypatch, exc):
    real = S.iter_trajectory_chunks

    def failing(*args, **kwargs):
        it = real(*args, **kwargs)
        yield next(it)            # one chunk written, then the failure
        raise exc

    monkeypatch.setattr(G._solver, "iter_trajectory_chunks", failing)
    kw = dict(pde="burgers1d", params={"nu": 0.01}, nx=16, nt=3, t_max=0.1, seed=0, n_train=40,
              workers=1, progress=False)
    target = tmp_path / "x.hdf5"
    with pytest.raises(type(exc)):
        G.write_dataset(target, **kw)
    assert sorted(os.listdir(tmp_path)) == []            # no target, no temp file, no manifest
    # an existing file is left untouched by an interrupted remake
    monkeypatch.setattr(G._solver, "iter_trajectory_chunks", real)
    G.write_dataset(target, **kw)
    before = (target.read_bytes(), manifest_path(target).read_text())
    monkeypatch.setattr(G._solver, "iter_trajectory_chunks", failing)
    with pytest.raises(type(exc)):
        G.write_dataset(target, force=True, **{**kw, "params": {"nu": 0.02}})
    assert (target.read_bytes(), manifest_path(target).read_text()) == before
    assert sorted(os.listdir(tmp_path)) == ["x.hdf5", "x.hdf5.manifest.json"]


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_generate_cli_interrupted_leaves_nothing(tmp_path, signame, code):
    """A real Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM mid-solve:
    the worker pool stops, the temporary file is removed, no target appears."""
    import signal

    proc = subprocess.Popen(
        [PY, "-m", "ups_lightning.data.generate", f"out={tmp_path / 'x.hdf5'}", "nu=0.001",
         "n_samples=200", "nx=1024", "nt=201", "t_max=2", "progress=false", "workers=2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list(tmp_path.glob("x.hdf5.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)                                  # the worker pool is up and solving
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # no Hydra run dir either
    assert "Traceback" not in err


def _cli(args, cwd):
    return subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ad_hoc_generate_cli(tmp_path):
    out = tmp_path / "sub" / "adhoc.hdf5"
    r = _cli(["-m", "ups_lightning.data.generate", f"out={out}", "nu=0.01", "n_samples=3",
              "nx=32", "nt=5", "t_max=0.5", "seed=7", "progress=false"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "generation time" in r.stdout
    with h5py.File(out, "r") as h5:
        assert sorted(h5.keys()) == ["t-coordinate", "tensor", "x-coordinate"]
        assert h5["tensor"].shape == (3, 5, 32) and h5["tensor"].dtype == np.float32
        assert h5["t-coordinate"].shape == (5,)
        np.testing.assert_allclose(h5["t-coordinate"][...], [0, 0.125, 0.25, 0.375, 0.5], atol=1e-7)
        assert float(h5.attrs["Nu"]) == 0.01 and h5.attrs["pde"] == "burgers1d"
        data = h5["tensor"][...]
    man = load_manifest(out)
    assert man["splits"]["train"] == {"start": 0, "stop": 3}
    assert man["seeds"]["train"] == {"start": 7_000_000, "stop": 7_000_003}
    ref = S.generate_trajectories("burgers1d", {"nu": 0.01}, 3, 32, 5, 0.5, 7_000_000 + np.arange(3),
                                  workers=1, progress=False)
    np.testing.assert_array_equal(data, ref[..., 0])
    assert not (tmp_path / "sub" / f"adhoc.hdf5.tmp-{os.getpid()}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]   # no Hydra run dir or log
    # and it opens with splits via n_val / n_test
    out2 = tmp_path / "adhoc2.hdf5"
    r = _cli(["-m", "ups_lightning.data.generate", f"out={out2}", "nu=0.01", "n_samples=6",
              "nx=16", "nt=3", "t_max=0.1", "n_val=2", "n_test=1", "progress=false",
              "workers=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    view = open_dataset(out2, n_train=3, n_val=2, n_test=1)
    assert view.sizes() == {"train": 3, "val": 2, "test": 1}


@pytest.mark.parametrize("args,msg", [
    (["out=x.hdf5", "nu=0.01"], "also needs n_samples=..., nx=..., nt=..., t_max=..."),
    (["out=x.hdf5", "nu=-1", "n_samples=2", "nx=16", "nt=3", "t_max=1"], "nu = -1"),
    (["out=x.hdf5", "nu=0.01", "n_samples=2", "nx=16", "nt=3", "t_max=0"], "t_max=0"),
    (["nu=0.1"], "single-file settings and need out=PATH"),
])
def test_generate_cli_user_errors(tmp_path, args, msg):
    r = _cli(["-m", "ups_lightning.data.generate", "progress=false", *args], tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and msg in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "x.hdf5").exists()


def test_inspect_cli(tmp_path, tiny_burgers_file, layout_b):
    r = _cli(["-m", "ups_lightning.data.inspect", str(tiny_burgers_file), "--full"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(N, T, X, C) = (24, 21, 64, 1)" in r.stdout
    assert "train 16 (rows 0..15), val 4 (rows 16..19), test 4 (rows 20..23)" in r.stdout
    assert "dt = 0.1" in r.stdout and "parameters  nu = 0.001" in r.stdout
    assert "equation    burgers1d" in r.stdout
    r = _cli(["-m", "ups_lightning.data.inspect", str(layout_b[0]), "--reduced-resolution", "4",
              "--reduced-resolution-t", "5", "--rows", "3"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "x in (-1, 1)" in r.stdout and "(12, 3, 8, 1)" in r.stdout
    assert "finite over 3 of 12 rows" in r.stdout
    for args, msg in [([str(tmp_path / "nope.hdf5")], "does not exist"),
                      ([str(layout_b[0]), "--reduced-resolution", "5"], "does not divide")]:
        r = _cli(["-m", "ups_lightning.data.inspect", *args], tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr
        assert "Traceback" not in r.stderr
    d = _data(n=4)
    d[2, 0, 0] = np.nan
    bad = _write(tmp_path / "bad.hdf5", d)
    r = _cli(["-m", "ups_lightning.data.inspect", str(bad), "--full"], tmp_path)
    assert r.returncode == 2 and "row 2" in r.stderr and "Traceback" not in r.stderr


def test_data_configs_have_the_agreed_keys():
    from omegaconf import OmegaConf

    root = CONF_DIR / "data"
    keys = ["name", "pde", "root", "path", "params", "nx", "ny", "n_tokens", "nt", "t_max", "seed", "n_train", "n_val",
            "n_test", "split_layout", "pdebench_test_ratio", "reduced_resolution", "reduced_resolution_t", "initial_step", "batch_size",
            "num_workers"]
    expect = {"burgers1d_small": (256, 41, 512, 64, 128, 1, 1),
              "burgers1d": (1024, 201, 2000, 200, 200, 4, 5),
              "smoke": (64, 21, 48, 16, 16, 1, 1)}
    for name, (nx, nt, ntr, nva, nte, rr, rrt) in expect.items():
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert list(cfg.keys()) == keys
        assert cfg.ny is None and cfg.n_tokens == 32     # 1D sets, the token count every 1D run has used
        assert (cfg.nx, cfg.nt, cfg.n_train, cfg.n_val, cfg.n_test, cfg.reduced_resolution,
                cfg.reduced_resolution_t) == (nx, nt, ntr, nva, nte, rr, rrt)
        assert cfg.path == f"data/{name}/1D_Burgers_Sols_Nu0.001.hdf5" and cfg.pde == "burgers1d"
        assert OmegaConf.to_container(cfg.params) == {"nu": 0.001}
        assert nx % rr == 0 and (nt - 1) % rrt == 0
