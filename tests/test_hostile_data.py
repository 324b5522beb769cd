"""Hostile input on the data / leaderboard / compare side: every bad file, override or artifact is
one ``error: ...`` paragraph (exit code 2), never a traceback, garbage or a half-written artifact."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ups_lightning import CONF_DIR
from ups_lightning import compare as C
from ups_lightning.data import generation as G
from ups_lightning.data import inspect as I
from ups_lightning.data.contract import DataContract
from ups_lightning.data.datamodule import check_frames, open_run_data, resolve_params
from ups_lightning.data.pdebench import PDEBenchFile, load_manifest, manifest_path, open_dataset
from ups_lightning.errors import UserError
from ups_lightning.eval.leaderboard import append_row, read_rows, write_html

PY = sys.executable


def _paragraph(text: str) -> str:
    """The one-paragraph contract: a single line, no traceback."""
    text = text.strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _exits_2(capsys, fn, *args) -> str:
    """Run an in-process CLI entry point; return its `error:` paragraph."""
    with pytest.raises(SystemExit) as info:
        fn(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return _paragraph(err)


# --------------------------------------------------------------------------------------------
# hostile data files
# --------------------------------------------------------------------------------------------
def _h5(path: Path, *, n=6, nt=11, nx=16, data=None, nu: object = 0.001, nu_attr="Nu",
        tensor_key="tensor", x=None, t=None, skip=(), **dataset_kw) -> Path:
    """A small PDEBench-layout file; every piece can be replaced or left out (``skip``)."""
    if data is None:
        data = np.random.default_rng(0).standard_normal((n, nt, nx)).astype(np.float32)
    x = (np.arange(nx) + 0.5) / nx if x is None else x
    t = np.linspace(0.0, 2.0, nt) if t is None else t
    with h5py.File(path, "w") as h5:
        h5.create_dataset(tensor_key, data=data, **dataset_kw)
        if "x" not in skip:
            h5["x-coordinate"] = x
        if "t" not in skip:
            h5["t-coordinate"] = t
        if nu_attr:
            h5.attrs[nu_attr] = nu
    return path


def _truncated(p: Path) -> Path:
    _h5(p, n=64)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _damaged_chunk(p: Path) -> Path:
    """A gzip chunk overwritten with garbage: the file opens, reading that row fails."""
    _h5(p, chunks=(1, 11, 16), compression="gzip")
    with h5py.File(p, "r") as h5:
        info = h5["tensor"].id.get_chunk_info(0)
    with open(p, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xde\xad\xbe\xef" * (info.size // 4))
    return p


def _group_tensor(p: Path) -> Path:
    with h5py.File(p, "w") as h5:
        h5.create_group("tensor")
        h5.attrs["Nu"] = 0.001           # it says its equation: the layout is what is wrong
    return p


def _nan_row(p: Path) -> Path:
    d = np.zeros((6, 11, 16), np.float32)
    d[0, 3, 2] = np.nan       # row 0: the training split, read to normalise
    return _h5(p, data=d)


BAD_FILES = {
    # the viscosity attribute: log10(nu / 0.001) conditions the models
    "nu-zero": (lambda p: _h5(p, nu=0.0),
                r"attribute 'Nu' = 0.0: nu \(the viscosity.*\) must be a finite number > 0"),
    "nu-negative": (lambda p: _h5(p, nu=-0.01), r"'Nu' = -0.01: nu \(the viscosity.* must be"),
    "nu-nan": (lambda p: _h5(p, nu=np.nan), r"'Nu' = nan: nu \(the viscosity"),
    "nu-inf": (lambda p: _h5(p, nu=np.inf), r"'Nu' = inf: nu \(the viscosity"),
    "nu-neg-inf-lowercase": (lambda p: _h5(p, nu=-np.inf, nu_attr="nu"), r"'nu' = -inf"),
    "nu-text": (lambda p: _h5(p, nu="abc"), r"'Nu' = 'abc' .*is not one number"),
    "nu-numeric-text": (lambda p: _h5(p, nu="0.001"), r"'Nu' = '0.001' .*is not one number"),
    "nu-bool": (lambda p: _h5(p, nu=True), r"'Nu' = True \(dtype bool.*not one number"),
    "nu-array": (lambda p: _h5(p, nu=np.array([0.1, 0.2])), r"'Nu' = \[0.1, 0.2\].*2 value"),
    "nu-empty-array": (lambda p: _h5(p, nu=np.zeros(0)), r"'Nu' = .*0 value\(s\)"),
    # PDEBench's released files state nu in the file name only: it is checked just the same
    "nu-in-name-negative": (lambda p: _h5(p.with_name("1D_Burgers_Sols_Nu-0.5.hdf5"), nu_attr=None),
                            r"Nu in the file name = -0.5: nu \(the viscosity.* must be"),
    # a file that states no equation at all (no 'pde' or parameter attribute, no PDEBench name)
    "no-equation": (lambda p: _h5(p, nu_attr=None), r"cannot tell which equation the file holds"),
    # the file itself
    "missing": (lambda p: p, "does not exist"),
    "directory": (lambda p: (p.mkdir(), p)[1], "is not a file"),
    "empty": (lambda p: (p.write_bytes(b""), p)[1], "is not an HDF5 file"),
    "text": (lambda p: (p.write_text("u,t,x\n1,2,3\n"), p)[1], "is not an HDF5 file"),
    "truncated-hdf5": (_truncated, r"cannot open data file .* as HDF5"),
    "damaged-chunk": (_damaged_chunk, r"cannot read rows 0\.\.\d+ of 'tensor'.*damaged"),
    "nan-row": (_nan_row, r"row 0 of 'tensor' holds NaN/Inf.*frame 3"),
    # the datasets
    "wrong-key": (lambda p: _h5(p, tensor_key="u"), r"no 'tensor' dataset \(found keys"),
    # neither the dataset nor an equation's attributes: the missing dataset is named, not the equation
    "wrong-key-no-attrs": (lambda p: _h5(p, tensor_key="data", nu_attr=None), r"no 'tensor' dataset \(found keys"),
    "tensor-group": (_group_tensor, r"no 'tensor' dataset"),
    "rank-2": (lambda p: _h5(p, data=np.zeros((6, 11), np.float32)), r"rank 2\)"),
    "rank-5": (lambda p: _h5(p, data=np.zeros((2, 11, 16, 1, 1), np.float32)), r"rank 5\)"),
    "int-dtype": (lambda p: _h5(p, data=np.zeros((2, 11, 16), np.int32)), "expected floats"),
    "zero-rows": (lambda p: _h5(p, data=np.zeros((0, 11, 16), np.float32)), "no data"),
    "three-channels": (lambda p: _h5(p, data=np.zeros((2, 11, 16, 3), np.float32)), "3 channels"),
    "no-x": (lambda p: _h5(p, skip=("x",)), r"no 'x-coordinate' dataset"),
    "no-t": (lambda p: _h5(p, skip=("t",)), r"no 't-coordinate' dataset"),
    "x-text": (lambda p: _h5(p, x=np.array([b"a"] * 16)), r"'x-coordinate' .*does not hold numbers"),
    "x-wrong-length": (lambda p: _h5(p, x=np.arange(15.0)), "'x-coordinate' has 15 entries"),
    "x-nan": (lambda p: _h5(p, x=np.full(16, np.nan)), "'x-coordinate' holds NaN/Inf"),
    "t-decreasing": (lambda p: _h5(p, t=np.linspace(2, 0, 11)), "'t-coordinate' must be increasing"),
    "t-wrong-length": (lambda p: _h5(p, t=np.arange(20.0)), "'t-coordinate' has 20 entries"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_paragraph(tmp_path, capsys, case):
    build, msg = BAD_FILES[case]
    path = build(tmp_path / "d.hdf5")
    err = _exits_2(capsys, I.main, [str(path), "--full"])
    assert str(path) in err
    assert re.search(msg, err), err
    # the trainer's route says the same
    with pytest.raises(UserError, match=msg):
        open_dataset(path, n_train=1, n_val=1, n_test=1)


BAD_MANIFESTS = {
    "not-json": (b"{not json", "is not valid JSON"),
    "not-utf8": (b'{"splits": "\xff"}', "is not valid JSON"),
    "a-list": (b"[1, 2]", "has no 'splits' mapping"),
    "bool-start": (b'{"splits": {"train": {"start": true, "stop": 3}}}', "split 'train' must be"),
    "negative-range": (b'{"splits": {"train": {"start": 4, "stop": 2}}}', "split 'train' must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest(tmp_path, capsys, case):
    raw, msg = BAD_MANIFESTS[case]
    path = _h5(tmp_path / "d.hdf5")
    manifest_path(path).write_bytes(raw)
    with pytest.raises(UserError, match=msg):
        open_dataset(path, n_train=1, n_val=1, n_test=1)
    assert msg in _exits_2(capsys, I.main, [str(path)])


@pytest.mark.parametrize("extra", [{"normalization": 5}, {"normalization": {"a": 1}},
                                   {"normalization": [{"rows": "x"}], "generation": "yesterday"}])
def test_odd_informational_manifest_fields_are_tolerated(tmp_path, capsys, extra):
    """Fields only reported or used as a shortcut: the statistics are recomputed, not crashed on."""
    path = _h5(tmp_path / "d.hdf5")
    manifest_path(path).write_text(json.dumps({"splits": {"train": {"start": 0, "stop": 3}},
                                               **extra}))
    view = open_dataset(path, n_train=3, n_val=0, n_test=0)
    assert view.normalizer.std[0] > 0
    assert I.main([str(path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# data.* overrides at the trainer's entry (open_run_data, resolve_params, DataContract.conditioning)
# --------------------------------------------------------------------------------------------
def _data_cfg(path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["data=smoke", f"data.path={path}", "data.n_train=2",
                                              "data.n_val=1", "data.n_test=1",
                                              "data.initial_step=5", *overrides])
    return cfg.data


@pytest.mark.parametrize("override,msg", [
    ("data.n_val=0", r"data.n_val=0 must be an integer >= 1: training validates"),
    ("data.n_test=0", r"data.n_test=0 must be an integer >= 1: evaluation scores"),
    ("data.n_train=0", r"data.n_train=0 must be an integer >= 1"),
    ("data.n_val=-1", r"data.n_val=-1 must be"),
    ("data.n_test=-3", r"data.n_test=-3 must be"),
    ("data.n_val=abc", r"data.n_val='abc' must be"),
    ("data.n_val=1.5", r"data.n_val=1.5 must be"),
    ("data.n_test=true", r"data.n_test=True must be"),
    ("data.initial_step=11", r"11 frame\(s\) after reduced_resolution_t=1 \(11 in the file\), but "
                             r"data.initial_step=11 needs at least 12"),
    ("data.initial_step=40", r"data.initial_step=40 needs at least 41"),
    ("data.initial_step=0", r"data.initial_step=0 must be an integer >= 1"),
    ("data.initial_step=-2", r"data.initial_step=-2 must be"),
    ("data.reduced_resolution=0", r"reduced_resolution=0 must be a positive integer"),
    ("data.reduced_resolution_t=3", r"reduced_resolution_t=3 does not divide"),
    ("data.pde=heat", r"data.pde='heat' is not a known equation.*burgers1d"),
    ("data.pde=advection1d", r"carries attribute\(s\) Nu of burgers1d.*data.pde='advection1d'"),
])
def test_bad_data_overrides(tmp_path, override, msg):
    path = _h5(tmp_path / "d.hdf5")
    with pytest.raises(UserError, match=msg) as info:
        open_run_data(_data_cfg(path, override))
    _paragraph(str(info.value))


def test_frame_check_after_time_reduction(tmp_path):
    path = _h5(tmp_path / "d.hdf5")                      # 11 frames; rr_t=2 keeps 6
    cfg = _data_cfg(path, "data.reduced_resolution_t=2", "data.initial_step=5")
    view = open_run_data(cfg)                            # 5 given + 1 to predict: fits exactly
    assert check_frames(view, 5) == 5 and check_frames(view.views[0], 5) == 5
    with pytest.raises(UserError, match=r"6 frame\(s\) after reduced_resolution_t=2 \(11 in the "
                                        r"file\), but data.initial_step=6 needs at least 7"):
        check_frames(view, 6)


@pytest.mark.parametrize("nu_override,file_nu_attr,msg", [
    ("data.params.nu=0", None,
     r"setting data.params.nu = 0: nu \(the viscosity.*\) must be a finite number > 0"),
    ("data.params.nu=-0.001", None, r"data.params.nu = -0.001"),
    ("data.params.nu=nan", None, r"data.params.nu = nan"),
    ("data.params.nu=inf", None, r"data.params.nu = inf"),
    ("data.params.nu=abc", None, r"data.params.nu = 'abc'"),
    ("data.params.nu=null", None, r"states no nu .*Set data.params.nu to the value"),
    ("~data.params.nu", None, r"states no nu .*Set data.params.nu to the value"),
    ("data.params.nu=0", 0.001, r"data.params.nu = 0"),   # unused beside the file's Nu, but still a typo
    ("+data.params.rho=1.0", 0.001, r"data.params has rho, which is not a parameter of burgers1d"),
])
def test_bad_nu_override(tmp_path, nu_override, file_nu_attr, msg):
    path = _h5(tmp_path / "d.hdf5", nu=file_nu_attr, nu_attr="Nu" if file_nu_attr else None)
    cfg = _data_cfg(path, nu_override)
    view = open_dataset(path, n_train=2, n_val=1, n_test=1, pde=cfg.pde)   # the file itself is fine
    with pytest.raises(UserError, match=msg) as info:
        resolve_params(view.meta, cfg.params, "data")
    _paragraph(str(info.value))
    with pytest.raises(UserError, match=msg):                 # the trainer's route says the same
        open_run_data(cfg)


def test_good_nu_conditioning(tmp_path):
    data = open_run_data(_data_cfg(_h5(tmp_path / "d.hdf5", nu_attr=None), "data.params.nu=0.01"))
    assert data.params == {"burgers1d": {"nu": 0.01}}
    cond = data.cond("train")
    assert cond.shape == (2, 2)
    assert math.isclose(float(cond[0, 1]), 1.0, abs_tol=1e-6)      # log10(0.01 / 0.001)
    assert math.isclose(float(cond[0, 0]), 0.2 / 0.05, rel_tol=1e-6)   # dt / dt_ref
    # the file's own Nu wins over the configured value
    data = open_run_data(_data_cfg(_h5(tmp_path / "e.hdf5", nu=0.1), "data.params.nu=0.01"))
    assert data.params == {"burgers1d": {"nu": pytest.approx(0.1)}}
    assert math.isclose(float(data.cond("val")[0, 1]), 2.0, abs_tol=1e-6)
    # the contract refuses a viscosity it cannot take the logarithm of
    contract = DataContract(("burgers1d",), (16,), 1)
    for bad in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(UserError, match="nu"):
            contract.conditioning("burgers1d", {"nu": bad}, 0.2)


# --------------------------------------------------------------------------------------------
# generate: refuse up front, write nothing
# --------------------------------------------------------------------------------------------
_AD_HOC = dict(data={"pde": "burgers1d", "params": {"nu": 0.001}}, out=None, nu=0.01, n_samples=3,
               nx=16, nt=3, t_max=0.1, seed=0, progress=False, workers=1)


@pytest.mark.parametrize("change,msg", [
    ({"nu": 0}, r"setting nu = 0: nu \(the viscosity.*\) must be a finite number > 0"),
    ({"nu": -1e-3}, r"nu = -0.001: nu \(the viscosity.* must be"),
    ({"nu": float("nan")}, r"nu = nan: nu \(the viscosity.* must be"),
    ({"nu": float("inf")}, r"nu = inf: nu \(the viscosity.* must be"),
    ({"nu": "abc"}, r"nu = 'abc': nu \(the viscosity.* must be a finite number"),
    ({"beta": 0.1}, r"beta is not a parameter of burgers1d"),
    ({"data": {"pde": "heat"}}, r"data.pde.*'heat' is not a known equation"),
    ({"data": {"pde": "mixed"}}, r"out=FILE makes one file of one equation"),
    ({"t_max": 0}, r"t_max=0 must be a finite number > 0"),
    ({"t_max": -2}, r"t_max=-2 must be"),
    ({"nx": 4}, r"nx=4 must be a finite number >= 8"),
    ({"nx": 0}, r"nx=0 must be"),
    ({"nx": 16.5}, r"nx=16.5 must be an integer"),
    ({"nt": 1}, r"nt=1 must be a finite number >= 2"),
    ({"nt": 0}, r"nt=0 must be"),
    ({"n_samples": 0}, r"n_samples=0 must be"),
    ({"n_val": -1}, r"n_val=-1 must be"),
    ({"n_test": -1}, r"n_test=-1 must be"),
    ({"n_val": 2, "n_test": 2}, r"n_val=2 \+ n_test=2 exceed n_samples=3"),
    ({"seed": -1}, r"seed=-1 must be"),
    ({"seed": 10**15}, r"seed=1000000000000000 must be <= "),
    ({"workers": 0}, r"workers=0 must be"),
    ({"nu": None, "data": {"pde": "burgers1d", "params": {"nu": None}}}, r"burgers1d needs nu="),
    ({"force": "maybe"}, r"force='maybe' must be true or false"),
    ({"progress": 3}, r"progress=3 must be true or false"),
])
def test_generate_refuses_bad_settings(tmp_path, change, msg):
    out = tmp_path / "x.hdf5"
    with pytest.raises(UserError, match=msg) as info:
        G.run({**_AD_HOC, "out": str(out), **change})
    _paragraph(str(info.value))
    assert list(tmp_path.iterdir()) == []


def test_generate_parameters_default_to_the_data_config(tmp_path):
    """Without nu= the single-file mode takes the data config's data.params (as the CLI's default
    data config gives it); nu= on the command line wins."""
    out = tmp_path / "x.hdf5"
    G.run({**_AD_HOC, "out": str(out), "nu": None, "data": {"pde": "burgers1d", "params": {"nu": 0.002}}})
    assert load_manifest(out)["params"] == {"nu": 0.002}
    with PDEBenchFile(out) as f:
        assert f.meta.pde == "burgers1d" and f.meta.params == {"nu": pytest.approx(0.002)}
    out2 = tmp_path / "y.hdf5"
    G.run({**_AD_HOC, "out": str(out2)})
    assert load_manifest(out2)["params"] == {"nu": 0.01}


def _generate_cfg(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("generate", overrides=["data=smoke", f"data.root={tmp_path}",
                                              "progress=false", "workers=1", *overrides])


@pytest.mark.parametrize("override,msg", [
    ("data.n_val=0", r"data.n_val=0 must be a finite number >= 1 \(training validates"),
    ("data.n_test=0", r"data.n_test=0 must be .*evaluation scores"),
    ("data.n_train=0", r"data.n_train=0 must be"),
    ("data.n_val=-4", r"data.n_val=-4 must be"),
    ("data.params.nu=0", r"nu = 0: nu \(the viscosity.*\) must be a finite number > 0"),
    ("data.params.nu=-1", r"nu = -1: nu \(the viscosity.* must be"),
    ("+data.params.rho=1.0", r"rho is not a parameter of burgers1d"),
    ("data.nt=5", r"data.nt=5 .* give 5 frame\(s\), but data.initial_step=5 needs at least 6"),
    ("data.reduced_resolution=3", r"data.reduced_resolution=3 does not divide data.nx=64"),
    ("data.reduced_resolution_t=3", r"data.reduced_resolution_t=3 does not divide the 20"),
    ("data.reduced_resolution=0", r"data.reduced_resolution=0 must be"),
    ("data.pde=heat", r"data.pde='heat'"),
])
def test_generate_config_mode_refuses_untrainable_files(tmp_path, override, msg):
    with pytest.raises(UserError, match=msg):
        G.run(_generate_cfg(tmp_path, override))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make_out,msg", [
    (lambda d: (d / "dir.hdf5").mkdir() or d / "dir.hdf5", "exists and is not a file"),
    (lambda d: (d / "f").write_text("") or d / "f" / "x.hdf5", "cannot create the directory"),
    (lambda d: (d / "m.hdf5.manifest.json").mkdir() or d / "m.hdf5",
     r"m.hdf5.manifest.json' exists and is not a file"),
])
def test_generate_bad_output_path(tmp_path, make_out, msg):
    out = make_out(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=msg):
        G.run({**_AD_HOC, "out": str(out)})
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_stale_temps_are_removed_only_for_dead_pids(tmp_path):
    target = tmp_path / "x.hdf5"
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f"x.hdf5.tmp-{dead}", tmp_path / f"x.hdf5.manifest.json.tmp-{dead}"]
    kept = [tmp_path / f"x.hdf5.tmp-{os.getpid()}", tmp_path / f"y.hdf5.tmp-{dead}",
            tmp_path / "x.hdf5.tmp-notapid"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    assert sorted(G.remove_stale_temps(target)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


# --------------------------------------------------------------------------------------------
# the CLIs, end to end: exit code 2, one paragraph, nothing left in the cwd
# --------------------------------------------------------------------------------------------
def _cli(args, cwd: Path, timeout: float = 120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([PY, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args,msg", [
    (["ups_lightning.data.generate", "out=x.hdf5", "nu=0", "n_samples=2", "nx=16", "nt=3",
      "t_max=1"], "nu = 0: nu (the viscosity"),
    (["ups_lightning.data.generate", "out=x.hdf5", "nu=0", "n_samples=2", "nx=16", "nt=3",
      "t_max=1"], "must be a finite number > 0"),
    (["ups_lightning.data.generate", "out=x.hdf5", "nu=0.01", "n_samples=2", "nx=16", "nt=1",
      "t_max=1"], "nt=1 must be"),
    (["ups_lightning.data.generate", "data=smoke", "data.root=data", "data.n_val=0"],
     "data.n_val=0 must be"),
    (["ups_lightning.data.inspect", "x.hdf5"], "does not exist"),
])
def test_cli_errors_end_to_end(tmp_path, args, msg):
    r = _cli([*args, *(["progress=false"] if "generate" in args[0] else [])], tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and msg in _paragraph(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_generate_leaves_only_the_file_and_manifest_in_cwd(tmp_path):
    r = _cli(["ups_lightning.data.generate", "out=sub/f.hdf5", "nu=0.01", "n_samples=3", "nx=16",
              "nt=3", "t_max=0.1", "progress=false", "workers=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli(["ups_lightning.data.generate", "data=smoke", "data.root=data", "data.n_train=2",
              "data.n_val=1", "data.n_test=1", "data.nx=16", "data.nt=6", "data.initial_step=2",
              "progress=false", "workers=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert made == ["data/smoke/1D_Burgers_Sols_Nu0.001.hdf5",
                    "data/smoke/1D_Burgers_Sols_Nu0.001.hdf5.manifest.json",
                    "sub/f.hdf5", "sub/f.hdf5.manifest.json"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a re-parented child may stay a zombie under a non-reaping init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_generate_takes_its_workers_along_and_next_run_cleans_up(tmp_path):
    target = tmp_path / "x.hdf5"
    proc = subprocess.Popen(
        [PY, "-m", "ups_lightning.data.generate", f"out={target}", "nu=0.001", "n_samples=128",
         "nx=512", "nt=101", "t_max=2", "progress=false", "workers=2"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    children: list[int] = []
    try:
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            children = _children(proc.pid)
            # two solver workers plus multiprocessing's resource tracker
            if len(children) >= 3 and list(tmp_path.glob("x.hdf5.tmp-*")):
                break
            time.sleep(0.05)
        time.sleep(0.5)                                  # the workers are solving
        children = sorted(set(children) | set(_children(proc.pid)))
        assert proc.poll() is None and len(children) >= 3, children
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 5
        while any(map(_running, children)) and time.time() < deadline:
            time.sleep(0.05)
        assert not [c for c in children if _running(c)], "solver workers outlived a killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in children:                               # only processes this test started
            if _running(c):
                os.kill(c, signal.SIGKILL)
    leftover = list(tmp_path.glob("x.hdf5.tmp-*"))
    assert leftover and not target.exists()
    r = _cli(["ups_lightning.data.generate", f"out={target}", "nu=0.01", "n_samples=2", "nx=16",
              "nt=3", "t_max=0.1", "progress=false", "workers=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"removed {leftover[0]}" in r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.hdf5", "x.hdf5.manifest.json"]
    assert load_manifest(target)["n_samples"] == 2


# --------------------------------------------------------------------------------------------
# leaderboard
# --------------------------------------------------------------------------------------------
def _board(tmp_path: Path) -> Path:
    path = tmp_path / "board.csv"
    for rid, v in (("r1", 0.1), ("r2", 0.2)):
        append_row(path, {"run_id": rid, "nrmse": v, "steps": 31, "model": "ups"})
    assert path.read_text().splitlines()[0] == "run_id,nrmse,steps,model"
    return path


BAD_BOARDS = {
    "too-many-fields": (lambda b: b + b"r3,0.3,31,ups,oops\n", 4, "5 fields where the header has 4"),
    "too-few-fields": (lambda b: b + b"r3,0.3\n", 4, "2 fields where the header has 4"),
    "truncated": (lambda b: b[:-5], 3, "3 fields where the header has 4"),
    "text-metric": (lambda b: b + b"r3,abc,31,ups\n", 4, "column 'nrmse' holds 'abc', not a number"),
    "text-steps": (lambda b: b + b"r3,0.3,many,ups\n", 4, "column 'steps' holds 'many'"),
    "not-utf8": (lambda b: b + b"r3,0.3,31,\xff\xfe\n", 4, "byte 0xff is not UTF-8"),
    "latin1-row-2": (lambda b: b.replace(b"r1,", b"r\xe9,"), 2, "byte 0xe9 is not UTF-8"),
    "open-quote": (lambda b: b + b'r3,0.3,31,"ups\nr4,0.4,31,ups\n', 4, "unreadable CSV"),
    "text-after-quote": (lambda b: b + b'r3,0.3,31,"ups"x\n', 4, "unreadable CSV"),
    "duplicate-header": (lambda b: b.replace(b"model", b"nrmse", 1), 1, "repeats a column"),
    "blank-header": (lambda b: b"\n" + b, 1, "header [] is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_BOARDS))
def test_damaged_board_keeps_the_new_row(tmp_path, case):
    mutate, line, msg = BAD_BOARDS[case]
    path = _board(tmp_path)
    path.write_bytes(mutate(path.read_bytes()))
    before = path.read_bytes()
    with pytest.raises(UserError) as info:
        append_row(path, {"run_id": "new/1", "nrmse": 0.05, "steps": 31})
    err = _paragraph(str(info.value))
    assert f"leaderboard {str(path)!r}, line {line}: " in err and msg in err, err
    saved = tmp_path / "board.csv.rejected-new_1.json"
    assert f"saved in {saved}" in err
    assert json.loads(saved.read_text())["row"] == {"run_id": "new/1", "nrmse": "0.05", "steps": "31"}
    assert path.read_bytes() == before                   # the board is left for a human
    assert not list(tmp_path.glob("*.tmp-*"))
    for reader in (read_rows, lambda p: write_html(p, tmp_path / "b.html")):
        with pytest.raises(UserError, match=f"line {line}: "):
            reader(path)


@pytest.mark.parametrize("row", ["r3,nan,31,ups\n", "r3,inf,,ups\n", "r3,,31,\n", "\n",
                                 'r3,0.3,31,"u,p\ns"\n'])
def test_unusual_but_valid_rows_are_accepted(tmp_path, row):
    path = _board(tmp_path)
    path.write_bytes(path.read_bytes() + row.encode())
    append_row(path, {"run_id": "new", "nrmse": 0.05})
    assert read_rows(path)[-1]["run_id"] == "new"


def test_board_that_is_a_directory(tmp_path, monkeypatch):
    board = tmp_path / "board.csv"
    board.mkdir()
    with pytest.raises(UserError, match=r"board.csv' cannot be read.*saved in .*board.csv.rejected-r9"):
        append_row(board, {"run_id": "r9", "nrmse": 0.1})
    assert (tmp_path / "board.csv.rejected-r9.json").is_file()


def test_unwritable_board_folder_falls_back_to_temp(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "file").write_text("")
    board = tmp_path / "file" / "board.csv"               # its folder is a file
    with pytest.raises(UserError, match="cannot be written.*saved in .*tmp/board.csv.rejected-r9"):
        append_row(board, {"run_id": "r9", "nrmse": 0.1})
    assert json.loads((tmp_path / "tmp" / "board.csv.rejected-r9.json").read_text())["row"]["nrmse"] == "0.1"


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
def _run_dir(root: Path, name: str, config: bytes | None = b"model:\n  dim: 16\n") -> Path:
    d = root / name
    d.mkdir()
    if config is not None:
        (d / "config.yaml").write_bytes(config)
    return d


@pytest.mark.parametrize("config,msg", [
    (b"model:\n  dim: \xff16\n", "byte 0xff at offset 14 is not UTF-8 text"),
    (b"model: [1, 2\n", "is not a readable YAML mapping"),
    (b"5\n", "is not a readable YAML mapping"),
    (b"a: ${oops\n", "is not a readable YAML mapping"),
    ("dir", "is not a readable YAML mapping"),
])
def test_compare_bad_config(tmp_path, capsys, config, msg):
    a = _run_dir(tmp_path, "a", None if config == "dir" else config)
    if config == "dir":
        (a / "config.yaml").mkdir()
    b = _run_dir(tmp_path, "b")
    err = _exits_2(capsys, C.main, [str(a), str(b), "--leaderboard", str(tmp_path / "none.csv")])
    assert str(a / "config.yaml") in err and msg in err


@pytest.mark.parametrize("case", ["not-utf8", "text-metric", "truncated"])
def test_compare_bad_board(tmp_path, capsys, case):
    mutate, line, msg = BAD_BOARDS[case]
    path = _board(tmp_path)
    path.write_bytes(mutate(path.read_bytes()))
    err = _exits_2(capsys, C.main, ["r1", "r2", "--leaderboard", str(path)])
    assert f"{str(path)!r}, line {line}: {msg}" in err


def test_compare_board_is_a_directory(tmp_path, capsys):
    (tmp_path / "board.csv").mkdir()
    err = _exits_2(capsys, C.main, ["r1", "r2", "--leaderboard", str(tmp_path / "board.csv")])
    assert "board.csv' cannot be read" in err


def test_compare_rows_without_run_dir(tmp_path, capsys):
    """Rows found by run id with no run_dir column compare their metrics (no KeyError)."""
    path = _board(tmp_path)
    C.main(["r1", "r2", "--leaderboard", str(path)])
    out = capsys.readouterr().out
    assert "nrmse" in out and "configs are identical" in out


def test_compare_cli_non_utf8_end_to_end(tmp_path):
    a = _run_dir(tmp_path, "a", b"x: \xfe\n")
    b = _run_dir(tmp_path, "b")
    r = _cli(["ups_lightning.compare", str(a), str(b), "--leaderboard", "none.csv"], tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not UTF-8" in _paragraph(r.stderr)
