"""Split protocol v2 (benchmark.md section 1): every shipped data set's test split is a fresh seed
range, disjoint from every earlier split (the retired v1 test range included) and from the other
sets' splits of the same equation, frozen in the manifest; a file with the retired splits is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ups_lightning import CONF_DIR
from ups_lightning.data import generation as G
from ups_lightning.data.pdebench import MANIFEST_FORMAT, load_manifest, manifest_path, open_dataset
from ups_lightning.errors import UserError

SHIPPED = ("burgers1d", "burgers1d_small", "advection1d", "advection1d_small", "reacdiff1d",
           "reacdiff1d_small")
# Frozen: the first test seed of each shipped set. Changing one re-draws a test split, which needs a
# new split protocol (and every reported figure re-measured), not an edit of this table.
FROZEN_TEST_START = {"burgers1d": 900_000, "burgers1d_small": 1_900_000, "advection1d": 900_000,
                     "advection1d_small": 1_900_000, "reacdiff1d": 900_000, "reacdiff1d_small": 1_900_000}
# v1: every set used seed 0 with test offset 600_000 (its test rows were looked at while choosing)
V1 = {"train": (0, 2000), "val": (300_000, 300_200), "test": (600_000, 600_200)}


def _data(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"data={name}"]).data


def _ranges(d):
    seeds = G.split_seeds(int(d.seed), {s: int(d[f"n_{s}"]) for s in ("train", "val", "test")})
    return {s: (int(v[0]), int(v[-1]) + 1) for s, v in seeds.items()}


def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


def test_test_splits_are_fresh_disjoint_and_frozen():
    data = {name: _data(name) for name in SHIPPED}
    ranges = {name: _ranges(d) for name, d in data.items()}
    for name, r in ranges.items():
        assert r["test"][0] == FROZEN_TEST_START[name], name
        for split, v1 in V1.items():
            assert not _overlap(r["test"], v1), f"{name} test overlaps the v1 {split} split"
        for other, r2 in ranges.items():
            if data[other].pde != data[name].pde:
                continue
            for split, rng in r2.items():
                if (other, split) != (name, "test"):
                    assert not _overlap(r["test"], rng), f"{name} test overlaps {other} {split}"
    # the retired v1 test range is never drawn by any split of any set
    retired = (G.RETIRED_SEED_OFFSETS["test (v1)"], G.SPLIT_SEED_OFFSETS["test"])
    for name, r in ranges.items():
        for split, rng in r.items():
            lo, hi = rng[0] % G.SEED_STRIDE, (rng[1] - 1) % G.SEED_STRIDE + 1
            assert not _overlap((lo, hi), retired), f"{name} {split} draws retired seeds"


def test_manifest_freezes_the_splits_and_v1_files_are_refused(tmp_path):
    path = tmp_path / "d.hdf5"
    G.write_dataset(path, pde="burgers1d", params={"nu": 0.01}, nx=16, nt=3, t_max=0.1, seed=1,
                    n_train=3, n_val=2, n_test=2, workers=1, progress=False)
    man = load_manifest(path)
    assert man["format"] == MANIFEST_FORMAT
    assert man["seeds"]["test"] == {"start": 1_900_000, "stop": 1_900_002}
    assert man["seeds"]["retired_offsets"] == {"test (v1)": 600_000}
    view = open_dataset(path, n_train=3, n_val=2, n_test=2)
    np.testing.assert_array_equal(view.splits["test"], [5, 6])
    # the same file under a v1 manifest: refused with the command that remakes it
    old = dict(man, format="ups_lightning.manifest/1")
    manifest_path(path).write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"retired v1 splits.*force=true"):
        open_dataset(path, n_train=3, n_val=2, n_test=2)
    with pytest.raises(UserError, match="retired v1 splits"):
        G.write_dataset(path, pde="burgers1d", params={"nu": 0.01}, nx=16, nt=3, t_max=0.1, seed=1,
                        n_train=3, n_val=2, n_test=2, workers=1, progress=False)
    # force=true remakes it under v2
    G.write_dataset(path, pde="burgers1d", params={"nu": 0.01}, nx=16, nt=3, t_max=0.1, seed=1,
                    n_train=3, n_val=2, n_test=2, workers=1, progress=False, force=True)
    assert load_manifest(path)["format"] == MANIFEST_FORMAT


def test_test_split_capacity_is_checked():
    with pytest.raises(UserError, match="at most 100000 test rows"):
        G.dataset_settings(pde="burgers1d", params={"nu": 0.01}, nx=16, nt=3, t_max=0.1, seed=0,
                           n_train=1, n_test=100_001)
