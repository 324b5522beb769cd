"""data.split_layout: PDEBench's own splits for a released file (no manifest beside it).

PDEBench's loaders (FNODatasetSingle, UNetDatasetSingle) keep the first int(N * test_ratio) rows as
their test set and train on the rest; split_layout=pdebench scores those rows (val and train come
after them), split_layout=tail (the default) keeps the project's layout (test = the last rows)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ups_lightning import CONF_DIR
from ups_lightning.config import validate_train_config
from ups_lightning.data.datamodule import open_run_data
from ups_lightning.data.pdebench import (MANIFEST_FORMAT, SPLITS, compute_normalizer, PDEBenchFile,
                                         manifest_path, open_dataset, write_manifest)
from ups_lightning.errors import UserError

N, T, X = 50, 5, 16


def _file(directory: Path, n: int = N) -> tuple[Path, np.ndarray]:
    """A released-PDEBench-like Burgers file without a manifest; row i holds values near i."""
    rng = np.random.default_rng(0)
    tensor = (np.arange(n)[:, None, None] + 0.1 * rng.standard_normal((n, T, X))).astype(np.float32)
    path = directory / "1D_Burgers_Sols_Nu0.001.hdf5"
    dx = 2.0 / X
    with h5py.File(path, "w") as h5:
        h5.create_dataset("tensor", data=tensor)
        h5.create_dataset("x-coordinate", data=(-1.0 + (np.arange(X) + 0.5) * dx).astype(np.float32))
        h5.create_dataset("t-coordinate", data=(np.arange(T + 1) * 0.05).astype(np.float32))
        h5.attrs["Nu"] = 0.001
    assert not manifest_path(path).exists()
    return path, tensor


def _disjoint(splits: dict) -> bool:
    rows = np.concatenate([splits[s] for s in SPLITS])
    return np.unique(rows).size == rows.size


def _paragraph(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message


def test_pdebench_layout_tests_on_the_first_rows(tmp_path):
    path, tensor = _file(tmp_path)
    view = open_dataset(path, n_train=10, n_val=4, n_test=5, split_layout="pdebench")
    np.testing.assert_array_equal(view.splits["test"], np.arange(5))      # int(50 * 0.1) = 5
    np.testing.assert_array_equal(view.splits["val"], np.arange(5, 9))
    np.testing.assert_array_equal(view.splits["train"], np.arange(9, 19))
    np.testing.assert_array_equal(view.read("test")[..., 0], tensor[0:5])
    np.testing.assert_array_equal(view.read("val")[..., 0], tensor[5:9])
    assert _disjoint(view.splits)
    assert view.splits["val"].min() >= 5 and view.splits["train"].min() >= 5   # PDEBench's training rows
    assert view.split_source.startswith("PDEBench layout") and "10%" in view.split_source
    with PDEBenchFile(path) as f:                    # the normaliser is the training split's
        assert view.normalizer == compute_normalizer(f, np.arange(9, 19))


def test_a_smaller_n_test_takes_the_first_of_pdebench_test_rows(tmp_path):
    path, _ = _file(tmp_path)
    view = open_dataset(path, n_train=3, n_val=2, n_test=3, split_layout="pdebench")
    np.testing.assert_array_equal(view.splits["test"], [0, 1, 2])
    np.testing.assert_array_equal(view.splits["val"], [5, 6])       # rows 3, 4 stay unused
    np.testing.assert_array_equal(view.splits["train"], [7, 8, 9])
    wide = open_dataset(path, n_train=40, n_val=0, n_test=10, split_layout="pdebench",
                        pdebench_test_ratio=0.2)
    np.testing.assert_array_equal(wide.splits["test"], np.arange(10))
    np.testing.assert_array_equal(wide.splits["train"], np.arange(10, 50))   # every training row
    assert wide.splits["val"].size == 0 and _disjoint(wide.splits)
    assert "20%" in wide.split_source


def test_tail_layout_is_the_default_and_keeps_the_last_rows(tmp_path):
    path, tensor = _file(tmp_path)
    for kwargs in ({}, {"split_layout": "tail"}):
        view = open_dataset(path, n_train=10, n_val=4, n_test=5, **kwargs)
        np.testing.assert_array_equal(view.splits["train"], np.arange(10))
        np.testing.assert_array_equal(view.splits["val"], np.arange(10, 14))
        np.testing.assert_array_equal(view.splits["test"], np.arange(45, 50))
        np.testing.assert_array_equal(view.read("test")[..., 0], tensor[45:50])
        assert view.split_source == "index ranges" and _disjoint(view.splits)


def test_pdebench_layout_errors_name_the_setting(tmp_path):
    path, _ = _file(tmp_path)
    with pytest.raises(UserError, match=r"data.n_test=6 .*1D_Burgers_Sols_Nu0.001.hdf5.*holds 5 test "
                                        r"rows \(rows 0..4\)") as info:
        open_dataset(path, n_train=10, n_val=4, n_test=6, split_layout="pdebench")
    _paragraph(str(info.value))
    with pytest.raises(UserError, match=r"has 50 rows, 45 of them PDEBench training rows.*n_val=4 "
                                        r"\+ n_train=42") as info:
        open_dataset(path, n_train=42, n_val=4, n_test=5, split_layout="pdebench")
    _paragraph(str(info.value))
    with pytest.raises(UserError, match=r"data.split_layout='foo' is not a split layout: expected "
                                        r"'tail' .* or 'pdebench'") as info:
        open_dataset(path, n_train=10, n_val=4, n_test=5, split_layout="foo")
    _paragraph(str(info.value))
    for ratio in (0, 0.0, 1, 1.5, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(UserError, match=r"data.pdebench_test_ratio=.* expected a number strictly "
                                            r"between 0 and 1") as info:
            open_dataset(path, n_train=10, n_val=4, n_test=5, split_layout="pdebench",
                         pdebench_test_ratio=ratio)
        _paragraph(str(info.value))


def test_a_manifest_backed_file_refuses_the_pdebench_layout(tmp_path):
    path, _ = _file(tmp_path)
    write_manifest(path, {"format": MANIFEST_FORMAT, "n_samples": N,
                          "splits": {"train": {"start": 0, "stop": 30}, "val": {"start": 30, "stop": 40},
                                     "test": {"start": 40, "stop": 50}}})
    with pytest.raises(UserError, match=r"data.split_layout=pdebench, but .* has a manifest .*frozen "
                                        r"splits") as info:
        open_dataset(path, n_train=10, n_val=4, n_test=5, split_layout="pdebench")
    _paragraph(str(info.value))
    view = open_dataset(path, n_train=10, n_val=4, n_test=5)        # the manifest's splits
    np.testing.assert_array_equal(view.splits["test"], np.arange(40, 45))
    assert view.split_source == "manifest"
    assert json.loads(manifest_path(path).read_text())["format"] == MANIFEST_FORMAT


# --- through the normal data path: a composed config, data.path=<file>, open_run_data ------------
def _cfg(path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=burgers1d_small", f"data.path={path}", "data.n_train=10",
                                          "data.n_val=4", "data.n_test=5", "data.initial_step=2",
                                          *overrides])
    return validate_train_config(cfg)


def test_the_option_reaches_the_reader_through_the_config(tmp_path):
    path, tensor = _file(tmp_path)
    cfg = _cfg(path, "data.split_layout=pdebench")
    assert cfg.data.split_layout == "pdebench" and cfg.data.pdebench_test_ratio == pytest.approx(0.1)
    view = open_run_data(cfg.data).views[0]
    np.testing.assert_array_equal(view.splits["test"], np.arange(5))
    np.testing.assert_array_equal(view.splits["val"], np.arange(5, 9))
    np.testing.assert_array_equal(view.read("test")[..., 0], tensor[:5])
    assert view.split_source.startswith("PDEBench layout")

    from ups_lightning.evaluation import eval_data          # evaluation scores the same rows
    scored = eval_data(cfg.data, None, None)
    assert scored.split == "test"
    np.testing.assert_array_equal(scored.fields.numpy()[..., 0], tensor[:5])

    default = open_run_data(_cfg(path).data).views[0]       # the shipped default: tail
    np.testing.assert_array_equal(default.splits["test"], np.arange(45, 50))


@pytest.mark.parametrize("override,msg", [
    ("data.split_layout=foo", r"data.split_layout='foo' is not a split layout"),
    ("data.pdebench_test_ratio=0", r"data.pdebench_test_ratio=0.0 is out of range"),
    ("data.pdebench_test_ratio=1.5", r"data.pdebench_test_ratio=1.5 is out of range"),
])
def test_bad_values_are_refused_by_the_config(tmp_path, override, msg):
    with pytest.raises(UserError, match=msg) as info:
        _cfg(tmp_path / "absent.hdf5", override)
    _paragraph(str(info.value))


def test_mixed_members_carry_and_check_the_layout():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate_train_config(compose("train", overrides=["data=mixed_small"]))
        assert {m.split_layout for m in cfg.data.members.values()} == {"tail"}
        bad = compose("train", overrides=["data=mixed_small", "data.members.advection1d.split_layout=foo"])
    with pytest.raises(UserError, match=r"data.split_layout='foo'"):
        validate_train_config(bad)
