"""2D data sets (data/generation2d.py, issue 25): PDEBench's groups layout written from the specs' own
solvers on their domains, the 1D data sets' seeds and splits, the training split's normaliser, a
current file kept, and nothing half-written. Tiny grids and a few frames: the whole file is quick."""
from __future__ import annotations

import itertools
import json
import logging

import h5py
import numpy as np
import pytest

from ups_lightning.data.generation import split_seeds
from ups_lightning.data.generation2d import write_dataset_2d
from ups_lightning.data.pdebench import MANIFEST_FORMAT, SPLITS, load_manifest, manifest_path
from ups_lightning.data.pdebench2d import PDEBench2DFile, write_groups_file
from ups_lightning.errors import UserError
from ups_lightning.pdes import get_pde
from ups_lightning.pdes.reacdiff2d import ReactionDiffusion2D
from ups_lightning.pdes.swe2d import ShallowWater2D

# ny != nx, so a missed (or doubled) transposition cannot pass
TINY = dict(shape=(6, 8), nt=3, t_max=0.05, seed=3)


def _centres(lo: float, hi: float, n: int) -> np.ndarray:
    edges = np.linspace(lo, hi, n + 1)
    return 0.5 * (edges[1:] + edges[:-1])


def _files(root) -> list:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


# the water's grid puts a cell centre within 0.3 of the origin, so every dam (R >= 0.3) shows
@pytest.mark.parametrize("spec, shape", [(ReactionDiffusion2D(), (6, 8)), (ShallowWater2D(), (14, 12))],
                         ids=["reaction-diffusion", "shallow-water"])
def test_a_written_set_is_the_specs_own_solution_in_the_files_x_first_order(tmp_path, spec, shape):
    counts = {"train": 2, "val": 1, "test": 1}
    path = tmp_path / "set.h5"
    ny, nx = shape
    manifest = write_dataset_2d(spec, path, counts=counts, **{**TINY, "shape": shape})

    seeds = np.concatenate([split_seeds(TINY["seed"], counts)[s] for s in SPLITS])
    t = np.linspace(0.0, TINY["t_max"], TINY["nt"])
    (x_lo, x_hi), (y_lo, y_hi) = spec.domain
    want = spec.solve(spec.initial_conditions(seeds, shape), spec.default_params(), t, x_hi - x_lo)
    with PDEBench2DFile(path) as f:
        assert f.meta.layout == "groups" and f.meta.shape == (4, 3, nx, ny, spec.n_channels)
        np.testing.assert_allclose(f.meta.x, _centres(x_lo, x_hi, nx), rtol=0, atol=1e-6)
        np.testing.assert_allclose(f.meta.y, _centres(y_lo, y_hi, ny), rtol=0, atol=1e-6)
        np.testing.assert_allclose(f.meta.t, t, rtol=0, atol=1e-7)
        got = f.read()
    np.testing.assert_allclose(got, want.transpose(0, 1, 3, 2, 4), rtol=1e-6, atol=1e-6)
    assert all(np.ptp(row) > 0 for row in got[:, 0])     # no constant field, which any order would match
    with h5py.File(path) as h5:
        assert sorted(h5) == ["0000", "0001", "0002", "0003"] and h5["0002/data"].dtype == np.float32
        assert h5.attrs["pde"] == spec.name
        assert {p.attrs[0]: h5.attrs[p.attrs[0]] for p in spec.params} == spec.default_params()

    assert manifest["format"] == MANIFEST_FORMAT and manifest["pde"] == spec.name
    assert manifest["splits"] == {"train": {"start": 0, "stop": 2}, "val": {"start": 2, "stop": 3},
                                  "test": {"start": 3, "stop": 4}}
    s = manifest["settings"]
    assert (s["shape"], s["nt"], s["t_max"], s["seed"], s["params"]) == ([ny, nx], 3, 0.05, 3, spec.default_params())
    assert s["initial_condition"] == spec.recipe_id and s["scheme"] == spec.solver_settings["scheme"]
    assert manifest["solver"] == spec.solver_settings
    assert manifest["generation"]["package_version"] and manifest["generation"]["seconds"] >= 0
    assert manifest["file_bytes"] == path.stat().st_size
    assert load_manifest(path) == json.loads(json.dumps(manifest))        # what was returned is on disk


def test_splits_take_disjoint_seed_ranges_and_a_growing_split_leaves_the_others(tmp_path):
    spec = ReactionDiffusion2D()
    small = write_dataset_2d(spec, tmp_path / "a.h5", counts={"train": 2, "val": 1, "test": 1}, **TINY)
    grown = write_dataset_2d(spec, tmp_path / "b.h5", counts={"train": 2, "val": 3, "test": 1}, **TINY)
    for m in (small, grown):
        ranges = [(m["seeds"][s]["start"], m["seeds"][s]["stop"]) for s in SPLITS]
        assert all(a1 <= b0 or b1 <= a0 for (a0, a1), (b0, b1) in itertools.combinations(ranges, 2))
    assert small["seeds"]["train"] == {"start": 3_000_000, "stop": 3_000_002}     # the 1D rule, seed 3
    assert grown["seeds"]["val"] == {"start": 3_300_000, "stop": 3_300_003}
    assert grown["splits"]["test"] == {"start": 5, "stop": 6}
    with PDEBench2DFile(tmp_path / "a.h5") as a, PDEBench2DFile(tmp_path / "b.h5") as b:
        for split in SPLITS:
            ra, rb = small["splits"][split], grown["splits"][split]
            k = ra["stop"] - ra["start"]        # the small set's rows are the first of the grown one's
            np.testing.assert_array_equal(a.read(slice(ra["start"], ra["stop"])),
                                          b.read(slice(rb["start"], rb["start"] + k)))


def test_the_manifest_normaliser_is_numpys_over_the_train_rows_and_progress_is_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ups_lightning.data.generation2d")
    path = tmp_path / "set.h5"
    manifest = write_dataset_2d(ReactionDiffusion2D(), path, counts={"train": 3, "val": 1, "test": 1}, **TINY)
    with PDEBench2DFile(path) as f:
        train = f.read(slice(0, 3)).astype(np.float64)
    (norm,) = manifest["normalization"]
    assert (norm["split"], norm["rows"]) == ("train", [0, 3])
    assert (norm["reduced_resolution"], norm["reduced_resolution_t"]) == (1, 1)
    np.testing.assert_allclose(norm["mean"], train.mean(axis=(0, 1, 2, 3)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(norm["std"], train.std(axis=(0, 1, 2, 3)), rtol=1e-12)
    progress = [r.getMessage() for r in caplog.records if "samples solved after" in r.getMessage()]
    assert progress and "5/5 samples solved" in progress[-1]
    assert write_dataset_2d(ReactionDiffusion2D(), tmp_path / "t.h5", counts={"test": 1},
                            **TINY)["normalization"] == []      # no training rows: nothing to record


def test_a_current_file_is_kept_a_different_one_refused_and_force_remakes_it(tmp_path, monkeypatch):
    spec, path = ReactionDiffusion2D(), tmp_path / "set.h5"
    counts = {"train": 1, "test": 1}
    write_dataset_2d(spec, path, counts=counts, **TINY)
    first, before = load_manifest(path), path.stat()
    calls = []
    real = spec.solve
    monkeypatch.setattr(spec, "solve", lambda *a, **k: calls.append(1) or real(*a, **k))

    assert write_dataset_2d(spec, path, counts=counts, **TINY) == first
    after = path.stat()
    assert calls == [] and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(UserError, match="different settings.*refusing to overwrite"):
        write_dataset_2d(spec, path, counts={"train": 2, "test": 1}, **TINY)
    assert calls == [] and load_manifest(path) == first

    again = write_dataset_2d(spec, path, counts=counts, force=True, **TINY)
    assert len(calls) == 2 and path.stat().st_ino != before.st_ino
    assert again["settings"] == first["settings"] and load_manifest(path) == json.loads(json.dumps(again))
    manifest_path(path).unlink()
    with pytest.raises(UserError, match="has no manifest"):
        write_dataset_2d(spec, path, counts=counts, **TINY)
    assert _files(tmp_path) == ["set.h5"]


def test_a_failure_mid_write_leaves_no_file_and_an_old_set_untouched(tmp_path, monkeypatch):
    spec = ReactionDiffusion2D()
    calls = []
    real = spec.solve

    def dies_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver died")
        return real(*a, **k)

    monkeypatch.setattr(spec, "solve", dies_on_the_second)
    with pytest.raises(RuntimeError, match="solver died"):
        write_dataset_2d(spec, tmp_path / "new" / "set.h5", counts={"train": 3}, **TINY)
    assert _files(tmp_path) == []

    old = tmp_path / "old.h5"
    monkeypatch.setattr(spec, "solve", real)
    write_dataset_2d(spec, old, counts={"train": 3}, **TINY)
    data, manifest = old.read_bytes(), manifest_path(old).read_text()
    calls.clear()
    monkeypatch.setattr(spec, "solve", dies_on_the_second)
    with pytest.raises(RuntimeError, match="solver died"):
        write_dataset_2d(spec, old, counts={"train": 3}, force=True, **TINY)
    assert _files(tmp_path) == ["old.h5", "old.h5.manifest.json"]
    assert old.read_bytes() == data and manifest_path(old).read_text() == manifest


def test_the_writer_transposes_to_x_first_and_a_failing_finish_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    fields = rng.standard_normal((2, 3, 4, 5, 2))              # (N, T, Y, X, C)
    x, y, t = _centres(0, 1, 5), _centres(-1, 1, 4), np.linspace(0, 1, 3)
    path = write_groups_file(tmp_path / "g.h5", fields, x, y, t, {"pde": "test"})
    with PDEBench2DFile(path) as f:
        assert f.meta.shape == (2, 3, 5, 4, 2)
        np.testing.assert_array_equal(f.read(), fields.transpose(0, 1, 3, 2, 4).astype(np.float32))

    def finish(tmp):
        assert tmp.is_file() and not (tmp_path / "h.h5").exists()
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        write_groups_file(tmp_path / "h.h5", fields, x, y, t, {}, finish=finish)
    with pytest.raises(ValueError, match=r"sample 0 of 2 has shape \(3, 4, 5, 2\)"):
        write_groups_file(tmp_path / "h.h5", fields, y, x, t, {})      # x and y swapped
    assert _files(tmp_path) == ["g.h5"]


GOOD = dict(shape=(8, 8), nt=3, t_max=0.05, seed=0, counts={"train": 1})


@pytest.mark.parametrize("change, match", [
    ({"shape": (3, 8)}, r"setting shape\[0\]=3 must be a finite number >= 4"),
    ({"shape": (8, 8.5)}, r"setting shape\[1\]=8.5 must be an integer"),
    ({"shape": (8,)}, r"setting shape=\(8,\) must be two integers"),
    ({"shape": "8x8"}, r"setting shape='8x8' must be two integers"),
    ({"nt": 1}, r"setting nt=1 must be a finite number >= 2"),
    ({"t_max": 0.0}, r"setting t_max=0.0 must be a finite number > 0"),
    ({"t_max": -1}, r"setting t_max=-1 must be a finite number > 0"),
    ({"counts": {"train": -1}}, r"setting counts\['train'\]=-1 must be a finite number >= 0"),
    ({"counts": {"train": 0, "val": 0, "test": 0}}, r"must hold at least one row"),
    ({"counts": {"bogus": 1}}, r"setting counts names bogus; the splits are train, val, test"),
    ({"seed": -1}, r"setting seed=-1 must be"),
    ({"params": {"bogus": 1.0}}, r"setting params: bogus is not a parameter"),
    ({"force": "yes"}, r"setting force='yes' must be true or false"),
])
def test_bad_settings_are_user_errors_naming_the_setting(tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        write_dataset_2d(ReactionDiffusion2D(), tmp_path / "x.h5", **{**GOOD, **change})
    assert _files(tmp_path) == []


def test_a_1d_equation_and_a_directory_in_the_way_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"makes 2D data sets.*spatial_dims=1 \(expected 2\)"):
        write_dataset_2d(get_pde("burgers1d"), tmp_path / "x.h5", **GOOD)
    (tmp_path / "x.h5").mkdir()
    with pytest.raises(UserError, match="exists and is not a file"):
        write_dataset_2d(ReactionDiffusion2D(), tmp_path / "x.h5", **GOOD)
