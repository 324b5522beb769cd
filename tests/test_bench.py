"""The benchmark suite: FNO peer, solver sweep, summary files, settings. Numbers are never asserted
against targets here: the benchmark prints them."""
from __future__ import annotations

from ups_lightning import CONF_DIR

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("bench", overrides=list(overrides))


def _tiny_view(path: Path, initial_step: int = 5):
    from omegaconf import OmegaConf

    from ups_lightning.data.datamodule import open_run_data

    data = OmegaConf.create({"name": "tiny", "path": str(path), "n_train": 16, "n_val": 4, "n_test": 4,
                             "reduced_resolution": 1, "reduced_resolution_t": 1, "pde": "burgers1d",
                             "params": {"nu": 0.001}, "initial_step": initial_step})
    return open_run_data(data)


# --- FNO peer ------------------------------------------------------------------------------------
def test_fno_matches_pdebench_fno1d_size():
    from ups_lightning.bench.fno import FNOSettings, build_fno, count_params

    model = build_fno(10, 1, FNOSettings())
    # PDEBench's FNO1d(num_channels=1, modes=12, width=20, initial_step=10): 23,937 parameters
    assert count_params(model) == 23937
    spectral = [p for n, p in model.named_parameters() if p.is_complex()]
    assert spectral and all(p.shape[-1] == 12 for p in spectral)      # 12 real-FFT modes kept
    out = model(torch.randn(3, 10, 64, 1))
    assert out.shape == (3, 64, 1)


def test_fno_trains_and_rollout_reads_only_given_frames(tiny_burgers_file):
    from ups_lightning.bench.fno import FNOSettings, build_fno, predict_test, train_fno

    torch.set_num_threads(1)
    view = _tiny_view(tiny_burgers_file)
    train = torch.from_numpy(view.read("train"))
    val = torch.from_numpy(view.read("val"))
    test = torch.from_numpy(view.read("test"))
    k = 5
    torch.manual_seed(0)
    settings = FNOSettings(modes=8, batch_size=8, max_epochs=3)
    model = build_fno(k, 1, settings)
    rec = train_fno(model, train, val, settings, budget_s=20.0, seed=0, log=None)
    assert rec["optimizer_steps"] >= 1 and rec["epochs"] > 0
    assert math.isfinite(rec["best_val_nrmse"]) and rec["best_epoch"] in [h["epoch"] for h in rec["history"]]

    pred, wall = predict_test(model, test, k, batch=3)
    assert pred.shape == (len(test), test.shape[1] - k, test.shape[2], 1) and wall >= 0
    poisoned = test.clone()
    poisoned[:, k:] = float("nan")
    poisoned[:, k:, ::2] = 1e6
    pred2, _ = predict_test(model, poisoned, k, batch=3)
    assert torch.equal(pred, pred2)
    assert torch.isfinite(pred).all()


def test_fno_budget_stops_training(tiny_burgers_file):
    from ups_lightning.bench.fno import FNOSettings, build_fno, train_fno

    view = _tiny_view(tiny_burgers_file)
    train, val = (torch.from_numpy(view.read(s)) for s in ("train", "val"))
    settings = FNOSettings(modes=4, width=8, batch_size=4, max_epochs=10_000)
    model = build_fno(5, 1, settings)
    rec = train_fno(model, train, val, settings, budget_s=0.5, seed=0, log=None)
    assert rec["stopped_by"] == "budget" and rec["train_s"] < 10.0


# --- solver sweep --------------------------------------------------------------------------------
def test_cell_average_and_linear_upsampling_round_trip():
    from ups_lightning.bench.solver_sweep import cell_average, upsample_linear

    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 64))
    assert np.array_equal(upsample_linear(u, 64), u)                 # n == N: identity
    assert np.allclose(cell_average(u, 16).mean(-1), u.mean(-1))     # averages keep the mean
    x = (np.arange(64) + 0.5) / 64
    smooth = np.sin(2 * np.pi * x)[None]
    err = [np.abs(upsample_linear(cell_average(smooth, n), 64) - smooth).max() for n in (8, 16, 32)]
    assert err[0] > err[1] > err[2]                                  # second order on smooth data
    with pytest.raises(ValueError):
        cell_average(u, 24)


def test_solver_sweep_errors_fall_with_resolution(tiny_burgers_file):
    from ups_lightning.bench.solver_sweep import sweep

    view = _tiny_view(tiny_burgers_file)
    test = torch.from_numpy(view.read("test"))
    k = 5
    m = view.meta
    t_rel = m.t[k - 1:] - m.t[k - 1]
    assert view.params == {"burgers1d": {"nu": pytest.approx(0.001)}}     # the file's own Nu
    rows = sweep(test[:, k - 1], test[:, k:], "burgers1d", view.params["burgers1d"], t_rel, m.dx,
                 m.domain_length, grids=(8, 16, 32, 64), log=None)
    errs = [r["nrmse"] for r in rows]
    assert [r["grid"] for r in rows] == [8, 16, 32, 64]
    assert errs[0] > errs[-1] and errs[1] > errs[-1] and errs[2] > errs[-1]
    assert sum(a >= b for a, b in zip(errs, errs[1:])) >= 2          # monotone-ish
    assert errs[-1] < 1e-5          # the file was made on 64 cells by this solver: exact
    assert all(r["ms_per_traj"] > 0 for r in rows)


def test_solve_on_grid_at_the_full_grid_is_the_spec_solver(tiny_burgers_file):
    """n = N: no averaging, no interpolation, just the equation's own solver (frames (B, N, C))."""
    from ups_lightning.bench.solver_sweep import solve_on_grid
    from ups_lightning.pdes import get_pde

    view = _tiny_view(tiny_burgers_file)
    u0 = view.read("test")[:2, 4].astype(np.float64)                   # (2, 64, 1)
    t_rel = np.array([0.0, 0.1, 0.2])
    pred, wall = solve_on_grid(u0, 64, "burgers1d", {"nu": 0.001}, t_rel, 1.0)
    assert pred.shape == (2, 2, 64, 1) and wall >= 0
    ref = get_pde("burgers1d").solve(u0, {"nu": 0.001}, t_rel)[:, 1:]
    np.testing.assert_array_equal(pred, ref)
    coarse, _ = solve_on_grid(u0, 16, "burgers1d", {"nu": 0.001}, t_rel, 1.0)
    assert coarse.shape == (2, 2, 64, 1) and not np.array_equal(coarse, ref)


def test_cheapest_grid_meeting_a_threshold():
    from ups_lightning.bench.solver_sweep import cheapest_meeting

    rows = [{"grid": 32, "nrmse": 0.30, "ms_per_traj": 1.0},
            {"grid": 64, "nrmse": 0.10, "ms_per_traj": 3.0},
            {"grid": 128, "nrmse": 0.04, "ms_per_traj": 9.0},
            {"grid": 256, "nrmse": 0.01, "ms_per_traj": 30.0}]
    assert cheapest_meeting(rows, 0.10)["grid"] == 64
    assert cheapest_meeting(rows, 0.05)["grid"] == 128
    assert cheapest_meeting(rows, 1.0)["grid"] == 32
    assert cheapest_meeting(rows, 0.001) is None
    rows[3]["ms_per_traj"] = 2.0                     # cheaper and more accurate wins
    assert cheapest_meeting(rows, 0.05)["grid"] == 256


# --- summary files -------------------------------------------------------------------------------
def test_summary_files_have_the_expected_columns(tmp_path):
    from ups_lightning.bench.report import SUMMARY_COLUMNS, TABLE_COLUMNS, add_equal_accuracy, write_summary

    metrics = {k: 0.1 for k in ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "crmse", "frmse_low",
                                "frmse_mid", "frmse_high", "correlation_horizon")}
    rows = [{"method": "FNO", "kind": "surrogate", **metrics, "train_s": 60.0, "rollout_ms_per_traj": 0.5,
             "params": 23937},
            {"method": "persistence", "kind": "baseline", **metrics, "nrmse": 0.9},
            {"method": "solver 64 cells", "kind": "solver", **metrics, "nrmse": 0.05, "rollout_ms_per_traj": 2.0,
             "extra_col": 1}]
    solver = [{"grid": 64, "nrmse": 0.05, "ms_per_traj": 2.0}]
    add_equal_accuracy(rows, solver)
    assert rows[0]["solver_grid_at_equal_nrmse"] == 64 and rows[0]["speedup_vs_solver"] == pytest.approx(4.0)
    paths = write_summary(tmp_path, rows, header="# test", notes=["a note"])
    with open(paths["csv"]) as fh:
        read = list(csv.DictReader(fh))
    assert [r["method"] for r in read] == ["FNO", "persistence", "solver 64 cells"]
    assert set(SUMMARY_COLUMNS) <= set(read[0]) and "extra_col" in read[0]
    md = paths["md"].read_text()
    for _, head, _ in TABLE_COLUMNS:
        assert f"| {head} " in md or f" {head} |" in md
    assert "| FNO |" in md and "a note" in md
    assert not list(tmp_path.glob("*.tmp-*"))


# --- settings and the whole bench ----------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("budget_min=0", "budget_min"),
    ("budget_min=abc", "budget_min"),
    ("n_test=0", "n_test"),
    ("shares.autoencoder=0.9", "shares"),
    ("solver_grids=[]", "solver_grids"),
    ("+fno.bogus=1", "fno"),
    ("fno.modes=0", "modes"),
    ("skip_fno=maybe", "skip_fno"),
])
def test_bad_settings_are_user_errors(override, needle):
    from ups_lightning.bench import check_config
    from ups_lightning.errors import UserError

    cfg = _bench_cfg(override)
    with pytest.raises(UserError, match=needle):
        check_config(cfg)


def test_default_settings_are_valid():
    from ups_lightning.bench import check_config

    checked = check_config(_bench_cfg())
    assert checked["budget_min"] == 10 and sum(checked["shares"].values()) == pytest.approx(1.0)


def test_cli_reports_a_bad_setting_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ups_lightning.bench", "budget_min=-1", f"out_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2
    assert "error:" in res.stderr and "budget_min" in res.stderr and "Traceback" not in res.stderr


def test_bench_without_ours_writes_summary(tiny_burgers_file, tmp_path):
    from ups_lightning.bench import run_bench

    cfg = _bench_cfg("data=smoke", f"data.path={tiny_burgers_file}", "data.n_train=16", "data.n_val=4",
                     "data.n_test=4", "budget_min=0.02", "skip_ours=true", "threads=1", f"out_dir={tmp_path}",
                     "solver_grids=[16,32,64,128]", "fno.modes=8", "fno.batch_size=8")
    out = run_bench(cfg, say=lambda *a: None)
    methods = [r["method"] for r in out["rows"]]
    assert methods[0].startswith("FNO") and "persistence" in methods
    assert [m for m in methods if m.startswith("solver")] == ["solver 16 cells", "solver 32 cells", "solver 64 cells"]
    with open(tmp_path / "summary.csv") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == 5 and all(r["n_test"] == "4" for r in read)
    assert (tmp_path / "summary.md").read_text().count("\n|") >= 6
    # a second run reuses the finished FNO
    out2 = run_bench(cfg, say=lambda *a: None)
    assert out2["rows"][0]["nrmse"] == out["rows"][0]["nrmse"]


@pytest.mark.slow
def test_bench_with_ours_on_smoke_data(smoke_data, tmp_path):
    from ups_lightning.bench import run_bench

    cfg = _bench_cfg("data=smoke", f"data.root={smoke_data / 'data'}", "model=dim16", "budget_min=0.3",
                     "threads=1", f"out_dir={tmp_path}", f"leaderboard={tmp_path / 'lb.csv'}",
                     f"html={tmp_path / 'lb.html'}")
    out = run_bench(cfg, say=lambda *a: None)
    methods = [r["method"] for r in out["rows"]]
    assert "ours (plain)" in methods and "ours (TTC)" in methods
    assert (tmp_path / "lb.csv").exists()
    for r in out["rows"]:
        assert math.isfinite(r["nrmse"])


def test_ttc_headroom_measures_candidates_against_plain_and_oracle(smoke_run, tmp_path):
    from omegaconf import OmegaConf

    from ups_lightning.bench.ttc_headroom import run_headroom
    from ups_lightning.errors import UserError

    cfg, _ = smoke_run
    hcfg = OmegaConf.create(dict(run_dir=cfg.run_dir, split="test", corrector="student", n_candidates=3,
                                 scales=[0.0, 1.0], seed=0, num_threads=None))
    r = run_headroom(hcfg)["scales"]
    # scale 0: every candidate is the operator step, so every pick is the plain rollout
    same = r["0.0"]
    assert same["ttc_score"]["nrmse"] == same["plain"]["nrmse"] == same["oracle"]["nrmse"]
    assert same["plain"]["operator_step_kept"] == 1.0
    assert all(v == 0.0 for v in same["penalty_pick_change"].values())
    # real candidates: the oracle's first step is never worse than the operator step, and it uses them
    real = r["1.0"]
    assert real["oracle"]["nrmse_1"] <= real["plain"]["nrmse_1"]
    assert real["oracle"]["operator_step_kept"] < 1.0
    assert real["plain"]["nrmse"] == pytest.approx(same["plain"]["nrmse"], rel=1e-6)
    with pytest.raises(UserError, match="n_candidates"):
        run_headroom(OmegaConf.merge(hcfg, {"n_candidates": 1}))
