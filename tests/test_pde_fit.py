"""The equation a file follows is checked on the file itself before the reference solver is used on
it (pdes/fit.py, issue 23): our own files fit in their own coordinates, a file in PDEBench's
released Burgers layout (x stored in (-1, 1)) is recognised, and a file no form fits is refused."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from ups_lightning.errors import UserError
from ups_lightning.pdes import get_pde
from ups_lightning.pdes.fit import FITS, fit_domain


def _rows(path: Path, n: int = 4) -> tuple:
    with h5py.File(path, "r") as f:
        u = np.asarray(f["tensor"][:n], dtype=np.float64)
        x, t = np.asarray(f["x-coordinate"]), np.asarray(f["t-coordinate"])
    return (u[..., None] if u.ndim == 3 else u), x, t


def _released_copy(src: Path, dest: Path, frames=None) -> Path:
    """``src`` rewritten as PDEBench releases its Burgers files: the same values, x stored in (-1, 1),
    no manifest (the file alone)."""
    with h5py.File(src, "r") as f:
        u, x, t = np.asarray(f["tensor"]), np.asarray(f["x-coordinate"]), np.asarray(f["t-coordinate"])
    if frames is not None:
        u = u[:, frames]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dest, "w") as f:
        f["tensor"] = u
        f["x-coordinate"] = 2.0 * x - 1.0
        f["t-coordinate"] = t
    return dest


@pytest.mark.parametrize("pde,params", [("burgers1d", {"nu": 0.001}), ("advection1d", {"beta": 0.1}),
                                        ("reacdiff1d", {"nu": 0.5, "rho": 1.0})])
def test_our_own_files_fit_in_their_own_coordinates(tmp_path, pde, params):
    from ups_lightning.data.generation import write_dataset

    spec = get_pde(pde)
    path = tmp_path / spec.file_name(params)
    write_dataset(path, pde=pde, params=params, nx=64, nt=11, t_max=1.0, seed=0, n_train=4, n_val=0, n_test=0,
                  workers=1, progress=False, quiet=True)
    u, x, t = _rows(path)
    fit = fit_domain(spec, params, u, float(t[1] - t[0]), float(len(x) * (x[1] - x[0])), str(path), k=2)
    assert fit.label == "the file's coordinates" and fit.domain_length == pytest.approx(1.0)
    assert fit.misses[fit.label] < 0.1 * FITS


def test_a_released_layout_burgers_file_is_recognised_and_its_solver_rows_score_as_ours(tiny_burgers_file, tmp_path):
    from omegaconf import OmegaConf

    from ups_lightning.evaluation import eval_data, file_physics

    released = _released_copy(tiny_burgers_file, tmp_path / "released" / tiny_burgers_file.name)
    d = OmegaConf.create({"pde": "burgers1d", "path": str(tiny_burgers_file), "params": {"nu": 0.001},
                          "reduced_resolution": 1, "reduced_resolution_t": 1, "initial_step": 5,
                          "n_train": 16, "n_val": 4, "n_test": 4, "split_layout": "tail",
                          "pdebench_test_ratio": 0.1})
    ours = file_physics(eval_data(d, None, "test"), d)
    theirs_data = eval_data(d, str(released), "all")
    assert theirs_data.meta.domain_length == pytest.approx(2.0)      # what its coordinates say
    theirs = file_physics(theirs_data, d)
    assert ours.domain_length == pytest.approx(1.0) and theirs.domain_length == pytest.approx(1.0)
    assert theirs.dx == pytest.approx(ours.dx)
    # in its stored coordinates the solver would miss by about the frames' own change: the check can fail
    u, x, t = _rows(released)
    spec = get_pde("burgers1d")
    fit = fit_domain(spec, {"nu": 0.001}, u, float(t[1] - t[0]), 2.0, "released", k=4)
    assert fit.misses["the file's coordinates"] > FITS > 10 * min(fit.misses.values())


def test_a_file_no_form_fits_is_refused_naming_the_misses(tiny_burgers_file, tmp_path):
    from omegaconf import OmegaConf

    from ups_lightning.evaluation import eval_data, file_physics

    frames = list(range(20, -1, -1))      # time runs backwards: no viscous Burgers flow does that
    backwards = _released_copy(tiny_burgers_file, tmp_path / "b" / tiny_burgers_file.name, frames=frames)
    d = OmegaConf.create({"pde": "burgers1d", "path": str(tiny_burgers_file), "params": {"nu": 0.001},
                          "reduced_resolution": 1, "reduced_resolution_t": 1, "initial_step": 5,
                          "n_train": 16, "n_val": 4, "n_test": 4, "split_layout": "tail",
                          "pdebench_test_ratio": 0.1})
    with pytest.raises(UserError, match=r"does not follow 1D viscous Burgers.*the unit interval"):
        file_physics(eval_data(d, str(backwards), "all"), d)


def test_a_dam_break_read_coarser_than_it_was_made_fits_through_its_given_frames():
    """The water's frames hold the depth alone, so the check starts at frame 0 and integrates through
    the given frames: a file made on a finer grid and read reduced (as a released 2D_rdb file with
    reduced_resolution 2) fits there, while the first interval alone misses by the dam edge's
    discretisation. A time-reversed copy is still refused."""
    spec, params = get_pde("swe2d"), {"g": 1.0}
    t = np.arange(10) * 0.02                       # PDEBench's dt_save 0.01, every other frame
    fine = spec.solve(spec.initial_conditions([1, 2], (64, 64)), params, t)
    rows = fine[:, :, ::2, ::2]                    # read at 32 x 32 (reduced_resolution 2)
    with pytest.raises(UserError, match=r"from frame 0 miss frame 1 by the file's coordinates"):
        fit_domain(spec, params, rows[:, :2], 0.02, 5.0, "file", k=0)     # the first interval alone
    fit = fit_domain(spec, params, rows, 0.02, 5.0, "file", k=8)           # 10 given frames
    assert fit.misses["the file's coordinates"] <= FITS
    with pytest.raises(UserError, match=r"from frame 0 miss frame 9"):
        fit_domain(spec, params, rows[:, ::-1], 0.02, 5.0, "file", k=8)   # time runs backwards
