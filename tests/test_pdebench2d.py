"""PDEBench's 2D layouts read unchanged (data/pdebench2d.py, issue 25): groups per sample and the
per-field CFD layout, with reduction in x, y and t, and a clear error for each kind of bad file."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from ups_lightning.data.pdebench2d import CFD_FIELDS, PDEBench2DFile
from ups_lightning.errors import UserError


def _grid(n, lo=-1.0, hi=1.0):
    e = np.linspace(lo, hi, n + 1)
    return 0.5 * (e[1:] + e[:-1])


def _groups(path, samples=3, shape=(11, 8, 6, 2), nan_in=None):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for s in range(samples):
            g = f.create_group(f"{s:04d}")
            d = rng.standard_normal(shape).astype(np.float32)
            if s == nan_in:
                d[3, 2, 1, 0] = np.nan
            g["data"] = d
            g["grid/x"], g["grid/y"] = _grid(shape[1]), _grid(shape[2])
            g["grid/t"] = np.linspace(0.0, 1.0, shape[0])
    return path


def _fields(path, n=2, shape=(11, 8, 6)):
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        for name in CFD_FIELDS:
            f[name] = rng.standard_normal((n, *shape)).astype(np.float32)
        f["x-coordinate"], f["y-coordinate"] = _grid(shape[1]), _grid(shape[2])
        f["t-coordinate"] = np.linspace(0.0, 1.0, shape[0] + 1)      # one more, as the 1D releases
    return path


def test_the_group_per_sample_layout_reads_with_reduction(tmp_path):
    path = _groups(tmp_path / "2D_diff-react_NA_NA.h5")
    with h5py.File(path) as f:
        raw = f["0001/data"][...]
    with PDEBench2DFile(path) as f:
        assert f.meta.layout == "groups" and f.meta.shape == (3, 11, 8, 6, 2)
        np.testing.assert_array_equal(f.read(1)[0], raw)
    with PDEBench2DFile(path, reduced_resolution=2, reduced_resolution_t=5) as f:
        m = f.meta
        assert m.shape == (3, 3, 4, 3, 2) and m.dx == pytest.approx(0.5) and m.dt == pytest.approx(0.5)
        np.testing.assert_array_equal(f.read([1])[0], raw[::5, ::2, ::2])


def test_the_per_field_cfd_layout_reads_with_its_extra_time(tmp_path):
    path = _fields(tmp_path / "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5")
    with h5py.File(path) as f:
        vy = f["Vy"][1]
    with PDEBench2DFile(path, reduced_resolution=2) as f:
        assert f.meta.fields == CFD_FIELDS and f.meta.shape == (2, 11, 4, 3, 4) and f.meta.t.size == 11
        np.testing.assert_array_equal(f.read(slice(1, 2))[0, ..., 3], vy[:, ::2, ::2])


@pytest.mark.parametrize("damage,match", [
    ("nothing", "neither of PDEBench's 2D layouts"),
    ("no_data", "has no 'data' dataset"),
    ("shapes", "every sample must be on one grid"),
    ("grid", "coordinates but the data"),
    ("fields", "must share one"),
])
def test_bad_2d_files_are_one_error_naming_the_file(tmp_path, damage, match):
    path = tmp_path / "bad.h5"
    if damage == "fields":
        _fields(path)
        with h5py.File(path, "a") as f:
            del f["Vx"]
            f["Vx"] = np.zeros((2, 11, 8, 5), np.float32)
    else:
        _groups(path)
        with h5py.File(path, "a") as f:
            if damage == "nothing":
                for k in list(f.keys()):
                    del f[k]
                f["tensor"] = np.zeros(3)
            elif damage == "no_data":
                del f["0000/data"]
            elif damage == "shapes":
                del f["0002/data"]
                f["0002/data"] = np.zeros((11, 8, 5, 2), np.float32)
            elif damage == "grid":
                del f["0000/grid/x"]
                f["0000/grid/x"] = _grid(7)
    with pytest.raises(UserError, match=match) as err:
        PDEBench2DFile(path)
    assert str(path) in str(err.value)


def test_a_sample_holding_nan_is_named(tmp_path):
    with PDEBench2DFile(_groups(tmp_path / "nan.h5", nan_in=2)) as f:
        f.read([0, 1])
        with pytest.raises(UserError, match="sample 2 holds NaN"):
            f.read(2)


def test_inspect_shows_both_2d_layouts_and_checks_their_values(tmp_path, capsys):
    from ups_lightning.data import inspect as I

    assert I.main([str(_groups(tmp_path / "g.h5")), "--full"]) == 0
    out = capsys.readouterr().out
    assert "PDEBench 2D, one group per sample (groups)" in out and "(N, T, X, Y, C) = (3, 11, 8, 6, 2)" in out
    assert "finite over 3 of 3 rows: OK" in out and "dt = 0.1" in out
    assert I.main([str(_fields(tmp_path / "f.h5")), "--reduced-resolution", "2", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "one dataset per field (fields); fields density, pressure, Vx, Vy" in out
    assert "(N, T, X, Y, C) = (2, 11, 4, 3, 4)" in out and "finite over 2 of 2 rows" in out   # first and last
    with pytest.raises(SystemExit) as exit_:
        I.main([str(_groups(tmp_path / "nan.h5", nan_in=1)), "--full"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "sample 1 holds NaN/Inf" in err and "Traceback" not in err
