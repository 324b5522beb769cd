"""The 2D equations end to end (issue 25): each 2D data config generates its set, the reader hands it
(and a released-layout file) to training, every smoke stage trains on it, and evaluation scores it
plainly and with a search, with the reference solver's row, 2D plots in the report and the guard.

Tiny grids (16 x 16 cells, 7 frames) and the smoke stages: a few seconds per equation."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from ups_lightning.errors import UserError

TINY = ["data.nx=16", "data.ny=16", "data.nt=7", "data.t_max=0.6", "data.n_train=6", "data.n_val=2",
        "data.n_test=2", "data.initial_step=3", "data.reduced_resolution=1", "data.batch_size=4",
        "model.n_tokens=16"]


def _tiny_cfg(tmp_path, name, *more):
    from conftest import smoke_cfg

    return smoke_cfg(tmp_path, f"data={name}", *TINY, *more)


@pytest.fixture(scope="module", params=["reacdiff2d_small", "swe2d_small"], ids=["reaction-diffusion", "shallow-water"])
def trained_2d(request, tmp_path_factory):
    """(config, records, tmp dir) of the smoke stages trained on a tiny set made from a 2D data config."""
    from ups_lightning.data.generation import run as generate
    from ups_lightning.training import run as train

    tmp = tmp_path_factory.mktemp(request.param)
    cfg = _tiny_cfg(tmp, request.param)
    generate({"data": cfg.data, "workers": 1, "progress": False})
    return cfg, train(cfg), tmp


def test_a_2d_set_trains_every_stage_on_its_grid(trained_2d):
    from ups_lightning.data.datamodule import open_run_data

    cfg, records, _ = trained_2d
    assert set(records) == {"autoencoder", "operator", "diffusion", "distill"}
    data = open_run_data(cfg.data)
    assert data.contract.spatial_shape == (16, 16) and data.contract.n_channels == len(data.meta.fields)
    assert data.read("train").shape == (6, 7, 16, 16, data.contract.n_channels)
    for rec in records.values():
        assert math.isfinite(rec["best_val_nrmse"])


def test_a_2d_run_evaluates_with_the_solver_from_a_whole_state_and_2d_plots(trained_2d):
    from conftest import eval_cfg
    from ups_lightning.eval import leaderboard as lb
    from ups_lightning.evaluation import evaluate
    from ups_lightning.pdes import get_pde

    cfg, _, tmp = trained_2d
    spec = get_pde(cfg.data.pde)
    row = evaluate(eval_cfg(tmp / "run", tmp, "ttc=default", "ttc.reward.name=physics", "ttc.n_candidates=2",
                            "corrector_rows=true"))
    assert row["pde"] == spec.name and row["method"] == "ttc" and math.isfinite(row["nrmse"])
    assert row["persistence_nrmse"] > 0
    # the data were made on this grid by this solver: its row reproduces them, from the last given
    # frame (reaction-diffusion) or from frame 0 (shallow water: a later frame lacks the momentum)
    assert row["solver_nrmse"] < 1e-4
    art = tmp / "run" / "eval" / row["run_id"]
    with np.load(art / "samples.npz") as z:
        assert z["true"].shape[2:4] == (16, 16) and z["y"].shape == (16,)
        fig = lb._fields_2d(z["true"], z["pred"], z["x"], z["y"], z["t"], "run")
    assert len(fig.axes) == 2 * 9      # truth, prediction, error at 3 frames, each with its colour bar
    plots = lb._row_plots(art, "run")   # the report's: the 2D fields and the curves
    assert len(plots) == 2 and all(p.startswith("<img") for p in plots)
    assert (tmp / "lb.html").read_text().count("<img") >= len(plots)


def test_the_2d_solver_row_would_miss_from_a_partial_state(trained_2d):
    """Why the shallow-water row starts from frame 0: from the last given depth with the momentum
    set to zero, the solver is far from the file (so the test above can tell the two apart)."""
    from ups_lightning.data.datamodule import open_run_data
    from ups_lightning.pdes import get_pde

    cfg, _, _ = trained_2d
    spec = get_pde(cfg.data.pde)
    if spec.frames_hold_state:
        pytest.skip("a whole state in every frame: any frame is a start")
    data = open_run_data(cfg.data)
    rows = data.read("test")
    k = int(cfg.data.initial_step) - 1
    t = np.asarray(data.meta.t[k:], dtype=np.float64) - data.meta.t[k]
    sol = spec.solve(rows[:, k].astype(np.float64), cfg.data.params, t, data.meta.domain_length)
    miss = np.sqrt(np.mean((sol[:, 1:] - rows[:, k + 1:]) ** 2)) / np.sqrt(np.mean(rows[:, k + 1:] ** 2))
    assert miss > 1e-3


def test_the_search_refuses_a_reward_the_2d_equation_cannot_use(trained_2d):
    from conftest import eval_cfg
    from ups_lightning.evaluation import evaluate

    _, _, tmp = trained_2d
    with pytest.raises(UserError, match="ttc.reward.name=consistency cannot score .*Use ttc.reward.name=physics"):
        evaluate(eval_cfg(tmp / "run", tmp, "ttc=default", "corrector_rows=true"))


def test_the_api_rolls_out_2d_frames_and_names_the_grid(trained_2d):
    from ups_lightning.api import load
    from ups_lightning.data.datamodule import open_run_data

    cfg, _, tmp = trained_2d
    model = load(tmp / "run")
    frames = torch.from_numpy(open_run_data(cfg.data).read("test"))[:, :3]
    out = model.rollout(frames, 2)
    assert out.shape == (2, 2, 16, 16, frames.shape[-1]) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\(B, T, 16, 16, C\)"):
        model.rollout(frames[:, :, :8], 2)


# --- the reader's 2D path -------------------------------------------------------------------------
def _released_groups(path, n=6, cells=16, frames=7, channels=1, dy=None):
    """A file in PDEBench's released groups layout: no attributes, the equation in its name."""
    rng = np.random.default_rng(0)
    centres = (np.arange(cells) + 0.5) / cells * 5.0 - 2.5
    with h5py.File(path, "w") as f:
        for s in range(n):
            g = f.create_group(f"{s:04d}")
            g["data"] = (1.0 + 0.1 * rng.random((frames, cells, cells, channels))).astype(np.float32)
            g["grid/x"] = centres
            g["grid/y"] = centres if dy is None else centres[0] + dy * np.arange(cells)
            g["grid/t"] = np.linspace(0.0, 1.0, frames)
    return path


def test_a_released_2d_file_is_read_by_its_name_with_pdebench_splits(tmp_path, caplog):
    from omegaconf import OmegaConf

    from ups_lightning.data.datamodule import open_run_data, unit_coords
    from ups_lightning.data.pdebench import open_dataset

    path = _released_groups(tmp_path / "2D_rdb_NA_NA.h5", n=20)
    view = open_dataset(path, n_train=4, n_val=2, n_test=2, split_layout="pdebench", pdebench_test_ratio=0.1)
    assert view.pde == "swe2d" and view.meta.params == {} and view.meta.spatial_shape == (16, 16)
    assert view.splits["test"].tolist() == [0, 1] and view.read("val").shape == (2, 7, 16, 16, 1)
    xi = unit_coords(view)
    assert xi.shape == (16, 16, 2) and float(xi.min()) > 0 and float(xi.max()) < 1
    assert torch.allclose(xi[:, 0, 0], xi[:, 5, 0]) and torch.allclose(xi[0, :, 1], xi[5, :, 1])
    cfg = OmegaConf.create({"pde": "swe2d", "path": str(path), "params": {"g": 1.0}, "n_train": 4, "n_val": 2,
                            "n_test": 2, "reduced_resolution": 1, "reduced_resolution_t": 1, "initial_step": 3})
    data = open_run_data(cfg)          # g is not in the file: the config's, said in the log
    assert data.params == {"swe2d": {"g": 1.0}} and "states no g" in caplog.text


def test_2d_files_no_equation_holds_or_with_oblong_cells_are_refused(tmp_path):
    from ups_lightning.data.pdebench import open_dataset, open_file
    from ups_lightning.data.pdebench2d import CFD_FIELDS

    cfd = tmp_path / "2D_CFD_Rand_M0.1.hdf5"
    with h5py.File(cfd, "w") as f:
        for name in CFD_FIELDS:
            f[name] = np.ones((2, 3, 4, 4), np.float32)
        for c in ("x", "y", "t"):
            f[f"{c}-coordinate"] = np.arange(4 if c != "t" else 3, dtype=np.float64)
    with pytest.raises(UserError, match="of no equation this project knows.*data.inspect"):
        open_file(cfd)
    oblong = _released_groups(tmp_path / "2D_rdb_NA_NA.h5", dy=0.1)
    with pytest.raises(UserError, match="square cells"):
        open_dataset(oblong, n_train=2, n_val=1, n_test=1)
    with pytest.raises(UserError, match="2D file .* burgers1d is a 1D equation"):
        open_file(oblong, pde="burgers1d")


def test_a_1d_file_or_setting_meets_no_2d_path(tmp_path, tiny_burgers_file):
    from ups_lightning.data.generation import run as generate
    from ups_lightning.data.pdebench import PDEBenchFile, is_2d_file, open_file

    assert not is_2d_file(tiny_burgers_file) and not is_2d_file(tmp_path / "missing.h5")
    with open_file(tiny_burgers_file) as f:
        assert isinstance(f, PDEBenchFile) and f.meta.spatial_shape == (64,)
    with pytest.raises(UserError, match="out=FILE makes a 1D file.*data=reacdiff2d"):
        generate({"data": {"pde": "reacdiff2d"}, "out": str(tmp_path / "x.h5"), "n_samples": 2, "nx": 8,
                  "nt": 3, "t_max": 0.1})


def test_1d_runs_keep_their_stage_hashes_under_the_2d_keys():
    """data.ny (null) and data.n_tokens (32) came with the 2D sets: a 1D run's stage hash is the one
    it had before them, so finished 1D stages are reused; model.n_tokens follows the data's."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from conftest import smoke_cfg
    from ups_lightning.artifacts import stage_config_hash
    from ups_lightning.config import compose_config, validate_train_config

    cfg = validate_train_config(smoke_cfg(Path("/nonexistent")))
    before = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))    # as a run made before the keys
    del before.data["ny"]
    del before.data["n_tokens"]
    assert stage_config_hash(cfg, "autoencoder", None) == stage_config_hash(before, "autoencoder", None)
    other = cfg.copy()
    other.data.n_tokens = 64
    assert stage_config_hash(other, "autoencoder", None) != stage_config_hash(cfg, "autoencoder", None)
    assert compose_config("train", ["data=reacdiff2d_small"]).model.n_tokens == 64
    assert compose_config("train", ["data=burgers1d_small"]).model.n_tokens == 32
    assert compose_config("train", ["data=reacdiff2d_small", "model.n_tokens=16"]).model.n_tokens == 16


def test_a_2d_set_made_by_a_pool_is_the_one_made_in_process(tmp_path):
    from ups_lightning.data.generation2d import write_dataset_2d
    from ups_lightning.data.pdebench2d import PDEBench2DFile
    from ups_lightning.pdes import get_pde

    spec = get_pde("reacdiff2d")
    common = dict(shape=(8, 8), nt=3, t_max=0.05, seed=2, counts={"train": 5})
    write_dataset_2d(spec, tmp_path / "one.h5", workers=1, **common)
    write_dataset_2d(spec, tmp_path / "two.h5", workers=2, **common)
    with PDEBench2DFile(tmp_path / "one.h5") as a, PDEBench2DFile(tmp_path / "two.h5") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_the_2d_fno_is_pdebenchs_fno2d_in_size_and_pads_a_walled_domain():
    """PDEBench's FNO2d(num_channels=2, modes 12 x 12, width 20, initial_step 10): lift (10 * 2 + 2
    grid channels -> 20), four layers of 2 x (20 x 20 x 12 x 12) complex weights plus a 1 x 1
    convolution, projection 20 -> 128 -> 2."""
    pytest.importorskip("neuralop")
    from ups_lightning.bench.fno import FNOSettings, build_fno

    expected = (22 * 20 + 20) + 4 * (2 * 20 * 20 * 12 * 12 + 20 * 20 + 20) + (20 * 128 + 128) + (128 * 2 + 2)
    walled = build_fno(10, 2, FNOSettings(), spatial_shape=(64, 64), periodic=False)
    assert sum(p.numel() for p in walled.parameters()) == expected == 465_886
    assert walled.net.domain_padding is not None
    periodic = build_fno(10, 2, FNOSettings(), spatial_shape=(64, 64), periodic=True)
    assert periodic.net.domain_padding is None
    torch.manual_seed(0)
    small = build_fno(3, 2, FNOSettings(modes=4, width=8), spatial_shape=(16, 12), periodic=False)
    assert small(torch.randn(2, 3, 16, 12, 2)).shape == (2, 16, 12, 2)
    with pytest.raises(ValueError, match=r"expects \(B, 3, X, Y, 2\) windows"):
        small(torch.randn(2, 3, 16, 2))


def test_the_bench_runs_on_a_two_field_walled_2d_set(tmp_path):
    """The benchmark on the 2-field, zero-flux 2D set (the water's was smoked at full size:
    results/issue25/bench_smoke_swe2d): both peers train at PDEBench's 2D batch of 5 and are scored
    beside persistence and the solver on coarser grids, with 2D labels."""
    pytest.importorskip("neuralop")
    import csv
    import json

    from hydra import compose, initialize_config_dir

    from ups_lightning import CONF_DIR
    from ups_lightning.bench import run_bench
    from ups_lightning.data.generation import run as generate

    # 10 training rows: whole batches of 5 (a batch of one meets the U-Net's batch norm at a 1 x 1 bottleneck)
    made = _tiny_cfg(tmp_path, "reacdiff2d_small", "data.n_train=10")
    generate({"data": made.data, "workers": 1, "progress": False})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "data=reacdiff2d_small", f"data.path={made.data.path}", *TINY, "data.n_train=10", "budget_min=0.02",
            "methods=[fno,unet]", "seeds=[0]", "search.rates=1", "search.widen=0", "search.keep=1",
            "search.rungs=[1.0]", "threads=1", f"out_dir={tmp_path / 'bench'}", "solver_grids=[8,16]",
            "fno.modes=4", "unet.init_features=4", f"leaderboard={tmp_path / 'lb.csv'}",
            f"html={tmp_path / 'lb.html'}"])
    out = run_bench(cfg, say=lambda *a: None)
    assert [r["method"] for r in out["fixed"]] == ["persistence", "solver 8 cells", "solver 16 cells"]
    for method in ("fno", "unet"):
        (run,) = out["results"][method]["runs"]
        assert math.isfinite(run["nrmse"]) and run["settings"]["batch_size"] == 5
    md = (tmp_path / "bench" / "summary.md").read_text()
    assert "FNO2d" in md and "U-Net2d" in md and "16 x 16" in md
    with open(tmp_path / "bench" / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    assert json.loads((tmp_path / "bench" / "provenance.json").read_text())["test_scored"] == 2 + 3
