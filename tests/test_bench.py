"""The benchmark suite: FNO peer, solver sweep, summary files, settings. Numbers are never asserted
against targets here: the benchmark prints them."""
from __future__ import annotations

from ups_lightning import CONF_DIR

import csv
import json
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
    from ups_lightning.bench.fno import FNOSettings, build_fno
    from ups_lightning.bench.peers import count_params

    model = build_fno(10, 1, FNOSettings())
    # PDEBench's FNO1d(num_channels=1, modes=12, width=20, initial_step=10): 23,937 parameters
    assert count_params(model) == 23937
    spectral = [p for n, p in model.named_parameters() if p.is_complex()]
    assert spectral and all(p.shape[-1] == 12 for p in spectral)      # 12 real-FFT modes kept
    out = model(torch.randn(3, 10, 64, 1))
    assert out.shape == (3, 64, 1)


def _peer_fit(tiny_burgers_file, method="fno", max_minutes=0.2, max_epochs=2, lr=1e-3, recipe="project",
              **settings):
    """A tiny peer trained through the bench's path (the stages' trainer): (module, trainer)."""
    from omegaconf import OmegaConf

    from ups_lightning.bench.peers import PEERS, PeerModule, TrajectoryData
    from ups_lightning.training import build_trainer

    _, cls, build = PEERS[method]
    s = cls.from_mapping({"batch_size": 8, **settings})
    view = _tiny_view(tiny_burgers_file)
    train, val = (torch.from_numpy(view.read(k)) for k in ("train", "val"))
    cfg = _train_cfg()
    cfg.stages.peer = {"max_epochs": max_epochs, "max_minutes": max_minutes, "lr": lr, "batch_size": 8}
    torch.manual_seed(0)
    module = PeerModule(build(5, 1, s), lr, OmegaConf.to_container(cfg.optim), relative_loss=True,
                        t_train=s.t_train, grad_frames=s.grad_frames, recipe=recipe)
    return module, cfg, TrajectoryData(train, val, 8, 8), build_trainer


def _train_cfg(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", "callbacks.progress_bar=none", *overrides])
    OmegaConf.set_struct(cfg, False)
    return cfg


def test_peers_train_with_our_trainer_timer_and_schedule(tiny_burgers_file, tmp_path):
    """A peer and our operator get the same Trainer (Timer of their budget, checkpoint on the best
    val/nrmse, EMA, clipping) and the same optimiser and warm-up + cosine schedule."""
    from lightning.pytorch.callbacks import ModelCheckpoint, Timer

    from ups_lightning.bench.peers import PeerModule
    from ups_lightning.stages import STAGE_ORDER, get_stage
    from ups_lightning.stages.base import ScheduledAdamW, lr_factor

    torch.set_num_threads(1)
    module, cfg, data, build_trainer = _peer_fit(tiny_burgers_file, modes=4, width=8)
    cfg.stages.operator.max_minutes = 0.2
    peer_trainer = build_trainer(cfg, "peer", tmp_path / "peer")
    ours_trainer = build_trainer(cfg, "operator", tmp_path / "ours")
    kinds = [sorted(type(c).__name__ for c in t.callbacks) for t in (peer_trainer, ours_trainer)]
    assert kinds[0] == kinds[1] and "Timer" in kinds[0] and "EMA" in kinds[0]
    timers = [next(c for c in t.callbacks if isinstance(c, Timer)) for t in (peer_trainer, ours_trainer)]
    assert timers[0]._duration == timers[1]._duration == 12.0
    ckpts = [t.checkpoint_callback for t in (peer_trainer, ours_trainer)]
    assert all(isinstance(c, ModelCheckpoint) and c.monitor == "val/nrmse" for c in ckpts)
    assert peer_trainer.gradient_clip_val == ours_trainer.gradient_clip_val
    for stage in map(get_stage, STAGE_ORDER):
        assert stage.configure_optimizers is ScheduledAdamW.configure_optimizers
    assert isinstance(module, ScheduledAdamW) and module.recipe == "project"
    peer_trainer.fit(module, datamodule=data)
    # the learning rate followed lr_factor (warm-up + cosine on steps or the clock, whichever is ahead)
    sched = peer_trainer.lr_scheduler_configs[0].scheduler
    assert sched.lr_lambdas[0].__qualname__.startswith("ScheduledAdamW")
    step = peer_trainer.global_step
    assert step >= 2 and peer_trainer.current_epoch == 2
    last_lr = sched.get_last_lr()[0]
    assert last_lr <= 1e-3 and last_lr == pytest.approx(1e-3 * sched.lr_lambdas[0](step), rel=0.05)
    assert math.isfinite(float(peer_trainer.checkpoint_callback.best_model_score))
    assert "val/nrmse_persistence" in peer_trainer.callback_metrics


def test_peer_rollout_reads_only_given_frames_and_guard_projects(tiny_burgers_file):
    from ups_lightning.bench.peers import predict_peer
    from ups_lightning.pdes import get_pde

    module, *_ = _peer_fit(tiny_burgers_file, modes=4, width=8)
    view = _tiny_view(tiny_burgers_file)
    test = torch.from_numpy(view.read("test"))
    k = 5
    pred, wall = predict_peer(module.net, test, k, batch=3)
    assert pred.shape == (len(test), test.shape[1] - k, test.shape[2], 1) and wall >= 0
    poisoned = test.clone()
    poisoned[:, k:] = float("nan")
    pred2, _ = predict_peer(module.net, poisoned, k, batch=3)
    assert torch.equal(pred, pred2) and torch.isfinite(pred).all()
    spec = get_pde("burgers1d")
    guarded, _ = predict_peer(module.net, test, k, project=spec.project)
    # the guard keeps every predicted frame's mass at the last given frame's
    torch.testing.assert_close(guarded.mean(dim=2), test[:, k - 1:k].mean(dim=2).expand(-1, guarded.shape[1], -1),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(guarded, pred)


@pytest.mark.parametrize("method, grad_frames", [("fno", None), ("unet", 2)])
def test_peer_loss_is_the_autoregressive_unroll(tiny_burgers_file, method, grad_frames):
    """The loss covers the last grad_frames predictions of the unroll (all by default) and the
    earlier predictions of a pushforward unroll carry no gradient."""
    module, *_ = _peer_fit(tiny_burgers_file, method=method, grad_frames=grad_frames,
                           **({"modes": 4, "width": 8} if method == "fno" else {"init_features": 4}))
    view = _tiny_view(tiny_burgers_file)
    traj = torch.from_numpy(view.read("train"))[:4]
    calls = []
    net = module.net
    original = net.forward
    net.forward = lambda w: (calls.append(torch.is_grad_enabled()), original(w))[1]
    module.log = lambda *a, **k: None
    module.training_step((traj,), 0)
    frames = traj.shape[1] - 5
    assert len(calls) == frames
    assert calls == ([True] * frames if grad_frames is None else [False] * (frames - 2) + [True] * 2)


def test_pdebench_recipe_is_adam_steplr_summed_mse_without_ema_or_clipping(tiny_burgers_file, tmp_path):
    """PDEBench's recipe (train_models_forward.py): Adam with weight decay 1e-4, StepLR every 100
    epochs by 0.5, the frames' MSE summed; the bench builds its Trainer without EMA or clipping."""
    import types

    import ups_lightning.bench as B
    from ups_lightning.bench.peers import PDEBENCH_RECIPE

    module, cfg, data, build_trainer = _peer_fit(tiny_burgers_file, modes=4, width=8, recipe="pdebench")
    module.trainer = types.SimpleNamespace(estimated_stepping_batches=10, callbacks=[], precision="32")
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == PDEBENCH_RECIPE["weight_decay"] == 1e-4
    assert type(sched["scheduler"]) is torch.optim.lr_scheduler.StepLR and sched["interval"] == "epoch"
    assert sched["scheduler"].step_size == 100 and sched["scheduler"].gamma == 0.5
    # the loss: the per-frame MSE summed over the unrolled frames (the project recipe averages them)
    view = _tiny_view(tiny_burgers_file)
    traj = torch.from_numpy(view.read("train"))[:4]
    module.log = lambda *a, **k: None
    torch.manual_seed(0)
    summed = module.training_step((traj,), 0)
    window, per_frame = traj[:, :5], []
    with torch.no_grad():
        for t in range(5, traj.shape[1]):
            nxt = module.net(window)
            per_frame.append(torch.mean((nxt - traj[:, t]) ** 2))
            window = torch.cat([window[:, 1:], nxt.unsqueeze(1)], dim=1)
    assert float(summed.detach()) == pytest.approx(float(torch.stack(per_frame).sum()), rel=1e-5)
    # through the bench: the Trainer of a pdebench model has no EMA, no clipping and no early stop (it
    # trains to its clock and keeps its best on validation); the project's has all three
    seen = {}

    def fake_build_trainer(tcfg, name, out, spent_s=0.0):
        seen[name] = (bool(tcfg.optim.ema.enabled), tcfg.optim.grad_clip, tcfg.callbacks.early_stopping is not None)
        raise RuntimeError("stop here")

    import ups_lightning.training as T
    b = types.SimpleNamespace(checked={"peers": {"fno": B.check_config(_bench_cfg())["peers"]["fno"]},
                                       "relative_loss": True, "reuse": False},
                              base_cfg=cfg, data_cfg=cfg.data, n_given=5,
                              meta=types.SimpleNamespace(n_channels=1, spatial_shape=(64,), pde="burgers1d"),
                              split={}, say=lambda *a: None)
    orig = T.build_trainer
    T.build_trainer = fake_build_trainer
    try:
        for recipe in ("pdebench", "project"):
            with pytest.raises(RuntimeError, match="stop here"):
                B.models._train_peer(b, "fno", recipe, 1e-3, 0, 0.1, tmp_path / recipe)
            assert seen.pop("peer") == ((False, None, False) if recipe == "pdebench" else (True, cfg.optim.grad_clip, True))
    finally:
        T.build_trainer = orig
    assert cfg.optim.ema.enabled and cfg.optim.grad_clip and cfg.callbacks.early_stopping   # left as it was


def test_one_clock_counts_a_stage_preparation_in_its_budget():
    """max_minutes counts from the stage's start: what it spent before its fit (the latent cache)
    is taken off the Timer, so ours' budget holds everything before it can predict."""
    import datetime as dt

    from ups_lightning.training import time_limit

    assert time_limit(None, 30.0) is None and time_limit(0, 5.0) is None
    assert time_limit(2.0) == dt.timedelta(seconds=120)
    assert time_limit(2.0, 45.5) == dt.timedelta(seconds=74.5)
    assert time_limit(0.5, 90.0) == dt.timedelta(seconds=1)       # preparation ate the budget


def test_every_method_gets_the_same_clock():
    """ours' stage limits add up to the budget (each with its preparation inside), a peer's Timer is
    the budget, and validation is inside both (one Lightning Timer over the whole fit)."""
    from ups_lightning.bench import STAGE_SHARES, check_config, compose_train_config

    cfg = _bench_cfg()
    checked = check_config(cfg)
    tcfg = compose_train_config(cfg, checked, Path("/nonexistent/run"), seed=0, budget_min=8.0)
    assert sum(float(tcfg.stages[k].max_minutes) for k in STAGE_SHARES) == pytest.approx(8.0)
    assert not tcfg.trainer.compile          # the peers train eager; so does ours


# --- solver sweep --------------------------------------------------------------------------------
def test_cell_average_and_linear_upsampling_round_trip():
    from ups_lightning.pdes.coarse import cell_average, upsample_linear

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
    from ups_lightning.pdes.coarse import solve_on_grid
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


def test_ours_learned_is_the_peers_criterion_with_its_stage_flags_beside(monkeypatch, tmp_path):
    """Ours counts as learned when its validation rollout beats persistence's (the peers' criterion),
    not when every stage beat its own one-step reference: in 2D the operator's decoded one-step error
    sits on the autoencoder's, above one-step persistence, while its rollout beats persistence's. The
    stage flags stay in the record and the summary names them."""
    import types

    from ups_lightning.bench import models as M
    from ups_lightning.bench.context import Bench

    stage = {"autoencoder": {"learned": True, "wall_clock_s": 10.0, "prep_s": 1.0},
             "operator": {"learned": False, "wall_clock_s": 20.0, "prep_s": 2.0, "best_val_nrmse": 0.06,
                          "trivial_metric": "val/nrmse_persistence", "trivial_val_nrmse": 0.014}}
    val = {"nrmse": 0.06, "params": 10}
    monkeypatch.setattr("ups_lightning.training.run", lambda cfg: stage)
    monkeypatch.setattr(M, "compose_train_config", lambda *a, **k: types.SimpleNamespace())
    monkeypatch.setattr(M, "_evaluate_ours", lambda b, run_dir, split, guard: val)
    # persistence held from the last given frame, scored as every method is (Bench.score)
    fields = torch.linspace(0.5, 1.5, 12).reshape(1, 12, 1, 1).expand(2, 12, 4, 1).contiguous()
    b = types.SimpleNamespace(cfg=types.SimpleNamespace(model=types.SimpleNamespace(name="dim8")), checked={"reuse": True}, say=lambda *a: None, n_given=4, split={"val": fields},
                              meta=types.SimpleNamespace(dx=0.25, domain_length=1.0, spatial_shape=(4,)))
    b._persistence_nrmse = {}
    for name in ("score", "persistence", "persistence_nrmse"):
        setattr(b, name, types.MethodType(getattr(Bench, name), b))
    trivial = b.persistence_nrmse("val")
    assert 0.06 < trivial < 1.0 and b.persistence_nrmse("val") == trivial      # scored once, kept
    rec = M._train_ours(b, "project", 3e-3, 0, 1.0, tmp_path)
    assert rec["learned"] is True and rec["trivial_val_nrmse"] == trivial
    assert rec["stage_learned"] == {"autoencoder": True, "operator": False} and rec["train_s"] == 33.0
    val["nrmse"] = trivial + 0.01
    assert M._train_ours(b, "project", 3e-3, 0, 1.0, tmp_path)["learned"] is False

    from ups_lightning.bench.report import write_bench_summary

    run = {"method": "ours", "label": "ours", "recipe": "project", "lr": 3e-3, "seed": 0, "guard": False,
           "nrmse": 0.1, "learned": True, "stage_learned": {"autoencoder": True, "operator": False}}
    write_bench_summary(tmp_path, {"ours": {"runs": [run], "trials": [], "chosen": {}}}, [], [], "# t", {})
    md = (tmp_path / "summary.md").read_text()
    assert "stopped before they beat" not in md and "seed 0 operator" in md


# --- settings and the whole bench ----------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("budget_min=0", "budget_min"),
    ("budget_min=abc", "budget_min"),
    ("n_test=0", "n_test"),
    ("shares.autoencoder=0.9", "shares"),
    ("solver_grids=[]", "solver_grids"),
    ("+fno.bogus=1", "fno"),
    ("fno.modes=0", "modes"),
    ("fno.batch_size=0", r"fno.batch_size=0: expected an integer >= 1 or null \(PDEBench's batch"),
    ("unet.init_features=-1", "init_features"),
    ("skip_solver=maybe", "skip_solver"),
    ("relative_loss=maybe", "relative_loss"),
    ("methods=[ours,bogus]", "methods"),
    ("methods=[]", "methods"),
    ("seeds=[]", "seeds"),
    ("seeds=[0,0]", "seeds"),
    ("recipes.ours=[pdebench]", "recipes.ours"),
    ("recipes.fno=[]", "recipes.fno"),
    ("recipes.unet=[pdebench,bogus]", "recipes.unet"),
    ("lr_default.fno=0", "lr_default.fno"),
    ("search.rates=0", "search.rates"),
    ("search.step=1", "search.step"),
    ("search.widen=-1", "search.widen"),
    ("search.rungs=[0.5]", "search.rungs"),
    ("search.rungs=[1.0,0.5]", "search.rungs"),
    ("+search.bogus=1", "search"),
    ("curve_budgets=[0]", "curve_budgets"),
    ("curve_budgets=abc", "curve_budgets"),
    ("curve_seeds=[-1]", "curve_seeds"),
    ("curves_from=abc", "curves_from"),
    ("curves_only=true", "curves_only"),
    ("curves_only=2", "curves_only"),
])
def test_bad_settings_are_user_errors(override, needle):
    from ups_lightning.bench import check_config
    from ups_lightning.errors import UserError

    cfg = _bench_cfg(override)
    with pytest.raises(UserError, match=needle):
        check_config(cfg)


def test_default_settings_are_valid_and_fair():
    from ups_lightning.bench import check_config

    checked = check_config(_bench_cfg())
    assert checked["budget_min"] == 10 and sum(checked["shares"].values()) == pytest.approx(1.0)
    assert checked["seeds"] == [0, 1, 2] and checked["methods"] == ["ours", "fno", "unet"]
    # every peer is trained its authors' way and ours; the search spans 100x with an interior centre
    assert checked["recipes"] == {"ours": ["project"], "fno": ["project", "pdebench"], "unet": ["project", "pdebench"]}
    s = checked["search"]
    assert s.rates == 5 and s.step ** (s.rates - 1) == pytest.approx(100.0, rel=1e-3) and s.rungs[-1] == 1.0


def test_peers_train_at_pdebench_batch_size_for_the_data_dimension():
    """By default each peer trains at PDEBench's batch for the data's dimension (50 in 1D, 5 in 2D:
    config_Bgs.yaml, config_rdb.yaml); a given batch_size is kept. The 1D default resolves to the 50 the
    bench used before, so earlier 1D runs' fingerprints (which hold the resolved settings) still match."""
    from ups_lightning.bench import check_config
    from ups_lightning.bench.peers import with_batch_size

    checked = check_config(_bench_cfg())
    for name, settings in checked["peers"].items():
        assert settings.batch_size is None, name
        assert with_batch_size(settings, 1).batch_size == 50 and with_batch_size(settings, 2).batch_size == 5
        assert with_batch_size(settings, 1).as_dict() == {**settings.as_dict(), "batch_size": 50}
        with pytest.raises(ValueError, match="3 spatial dimensions"):
            with_batch_size(settings, 3)
    given = check_config(_bench_cfg("fno.batch_size=8"))["peers"]["fno"]
    assert with_batch_size(given, 2).batch_size == 8


def test_make_bench_passes_budget_and_seeds():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}   # not make test's
    res = subprocess.run(["make", "-s", "-n", "bench", "BUDGET=5", "SEEDS=2"], capture_output=True, text=True,
                         cwd=REPO, env=env)
    line = next(ln for ln in res.stdout.splitlines() if "ups_lightning.bench" in ln)
    assert "ups_lightning.bench" in line and "budget_min=5" in line and "seeds=[0,1]" in line


def test_cli_reports_a_bad_setting_without_traceback(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "ups_lightning.bench", "budget_min=-1", f"out_dir={out}"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2
    assert "error:" in res.stderr and "budget_min" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "logs").exists()        # a refused command leaves no empty log directory behind


def test_seed_statistics_and_winners_need_two_standard_errors():
    from ups_lightning.bench.report import aggregate, mean_std, winners

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_std([0.5])[1] == 0.0 and mean_std([])[2] == 0

    def runs(method, values, guard=False):
        return [{"method": method, "label": method.upper(), "guard": guard, "lr": 1e-3, "seed": i, "nrmse": v,
                 "nrmse_1": v, "nrmse_10": v, "nrmse_31": v, "learned": True} for i, v in enumerate(values)]

    clear = aggregate(runs("a", [0.10, 0.11, 0.12]) + runs("b", [0.20, 0.21, 0.22]))
    text = winners(clear)
    assert len(text) == 4 and all("**A wins**" in t for t in text)
    close = aggregate(runs("a", [0.10, 0.15, 0.20]) + runs("b", [0.12, 0.17, 0.22]))
    assert all("no clear winner" in t for t in winners(close))
    # a method's guard variant is not its rival: A + guard vs B, not vs A
    guarded = aggregate(runs("a", [0.10, 0.11, 0.12]) + runs("a", [0.13, 0.14, 0.15], guard=True)
                        + runs("b", [0.10, 0.115, 0.13]))
    assert all("no clear winner" in t and "B (" in t and "A + guard" not in t for t in winners(guarded))
    one = aggregate(runs("a", [0.1]) + runs("b", [0.2]))
    assert all("no winner is named" in t for t in winners(one))


SMALL_SEARCH = ("search.rates=2", "search.widen=0", "search.keep=1", "search.rungs=[0.5,1.0]")


def test_bench_of_peers_writes_summary_and_reuses_models(tiny_burgers_file, tmp_path):
    from ups_lightning.bench import run_bench

    cfg = _bench_cfg("data=smoke", f"data.path={tiny_burgers_file}", "data.n_train=16", "data.n_val=4",
                     "data.n_test=4", "budget_min=0.02", "methods=[fno,unet]", "seeds=[0,1]", *SMALL_SEARCH,
                     "recipes.unet=[pdebench]", "curve_budgets=[0.01,0.02]",
                     "threads=1", f"out_dir={tmp_path}", "solver_grids=[16,32,64,128]", "fno.modes=8",
                     "fno.batch_size=8", "unet.init_features=4", "unet.batch_size=8")
    out = run_bench(cfg, say=lambda *a: None)
    for m, recipes in (("fno", ["project", "pdebench"]), ("unet", ["pdebench"])):
        res = out["results"][m]
        trials, runs, chosen = res["trials"], res["runs"], res["chosen"]
        first = [t for t in trials if t["rung"] == 0]
        assert sorted((t["recipe"], t["lr"]) for t in first) == sorted(
            (r, lr) for r in recipes for lr in (0.000316, 0.001))
        assert all(t["budget_min"] == pytest.approx(0.01) for t in first)
        last = [t for t in trials if t["rung"] == 1]
        assert len(last) == 1 and last[0]["chosen"] and last[0]["budget_min"] == pytest.approx(0.02)
        best_first = min(first, key=lambda t: t["best_val_nrmse"])
        assert (last[0]["recipe"], last[0]["lr"]) == (best_first["recipe"], best_first["lr"])   # chosen on val
        assert chosen["first_rung_trials"] == {r: 2 for r in recipes}
        assert sorted(r["seed"] for r in runs) == [0, 1]            # test scored once per model
        assert all(r["lr"] == chosen["lr"] and r["recipe"] == chosen["recipe"] and r["guard"] == chosen["guard"]
                   and math.isfinite(r["nrmse"]) for r in runs)
        # the guard was chosen on validation, scored both ways for every seed
        offs, ons = [r["val_nrmse_guard_off"] for r in runs], [r["val_nrmse_guard_on"] for r in runs]
        assert chosen["guard"] == (sum(ons) < sum(offs))
        assert runs[0]["run_dir"] == last[0]["run_dir"]            # the chosen trial is seed 0's run
    methods = [r["method"] for r in out["fixed"]]
    assert methods == ["persistence", "solver 16 cells", "solver 32 cells", "solver 64 cells"]
    md = (tmp_path / "summary.md").read_text()
    assert "mean ± std over 2 training seeds" in md and "Who wins" in md and "The search" in md
    assert "U-Net1d (PDEBench)" in md and "FNO1d" in md and "| pdebench |" in md
    assert "Published figures" in md and "0.029" in md
    with open(tmp_path / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 + 4 and all(r["n_test"] == "4" for r in rows)
    # learning curves: the peer best on validation, at both budgets (the main budget with both seeds)
    curves = out["curves"]
    assert {c["budget_min"] for c in curves} == {0.01, 0.02} and len({c["method"] for c in curves}) == 1
    assert sum(c["budget_min"] == 0.02 for c in curves) == 2 and (tmp_path / "curves.csv").exists()
    assert (tmp_path / "curves.png").stat().st_size > 0
    # provenance.json (the one results layout): the command, the commit, and test scored once per row
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["driver"] == "bench" and prov["git_commit"] and prov["seeds"] == [0, 1]
    assert prov["settings"]["budget_min"] == 0.02 and "python" in prov["command"]
    extra_points = sum(c["budget_min"] != 0.02 for c in curves)      # the curve's other budget: its own models
    assert prov["test_scored"] == len(out["fixed"]) + sum(len(r["runs"]) for r in out["results"].values()) + extra_points
    assert prov["splits_scored"]["val"] == 2 * 4                       # the guard, both ways, per model
    # a second run reuses every finished model
    out2 = run_bench(cfg, say=lambda *a: None)
    assert [r["nrmse"] for r in out2["results"]["fno"]["runs"]] == [r["nrmse"] for r in out["results"]["fno"]["runs"]]


def _fake_bench(monkeypatch, tmp_path, val_of, test_of, seeds=(0, 1, 2), methods=("fno",)):
    """run_methods over fake models: val_of(method, recipe, lr, seed, budget) -> val figure (None:
    the model fails); test_of / the guard's effect read from the split asked for."""
    import types

    import ups_lightning.bench as B
    from ups_lightning.bench.search import SearchSettings
    from ups_lightning.errors import UserError

    def fake_train(b, method, recipe, lr, seed, budget_min, run_dir, **kw):
        v = val_of(method, recipe, lr, seed, budget_min)
        if v is None:
            raise UserError(f"{method} (lr {lr:g}, seed {seed}) diverged")
        return {"method": method, "label": method.upper(), "recipe": recipe, "lr": lr, "seed": seed,
                "budget_min": budget_min, "train_s": 1.0, "learned": True, "best_val_nrmse": v,
                "handle": (method, recipe, lr, seed)}

    scored = []

    def fake_score(b, method, handle, guard, split="test"):
        scored.append((split, guard))
        return {"nrmse": test_of(split, guard)}

    monkeypatch.setattr(B.models, "_train_ours", lambda b, *a, **k: fake_train(b, "ours", *a))
    monkeypatch.setattr(B.models, "_train_peer", fake_train)
    monkeypatch.setattr(B.models, "_score", fake_score)
    b = types.SimpleNamespace(checked={"seeds": list(seeds), "budget_min": 1.0, "methods": list(methods),
                                       "lr_default": {m: 1e-3 for m in methods},
                                       "recipes": {m: ["project"] if m == "ours" else ["project", "pdebench"]
                                                   for m in methods},
                                       "search": SearchSettings(rates=3, step=10.0, widen=1, rungs=(0.5, 1.0), keep=2),
                                       "given": {}},
                              out=tmp_path, say=lambda *a: None, cfg=types.SimpleNamespace(), trainer=None,
                              meta=types.SimpleNamespace(spatial_shape=(256,)))   # 1D: the peers' labels say so
    return B, b, scored


def test_a_failed_model_is_recorded_not_fatal_and_never_chosen(monkeypatch, tmp_path):
    """A learning rate that diverges is a result of the search (val inf, never chosen, never
    scored); a seed that fails counts as failed; only a method whose every rate fails is an error."""
    from ups_lightning.errors import UserError

    def val_of(method, recipe, lr, seed, budget):
        if lr > 5e-3 or seed == 2:
            return None
        return {1e-4: 0.7, 1e-3: 0.5}[lr] + (0.1 if recipe == "pdebench" else 0.0)

    B, b, _ = _fake_bench(monkeypatch, tmp_path, val_of, lambda split, guard: 0.4 if guard else 0.6)
    res = B.run_methods(b)["fno"]
    first = [t for t in res["trials"] if t["rung"] == 0]
    failed = [t for t in first if t["lr"] == 1e-2]
    assert len(failed) == 2 and all(t["best_val_nrmse"] == math.inf and not t["chosen"] for t in failed)
    assert res["chosen"]["recipe"] == "project" and res["chosen"]["lr"] == 1e-3
    bad_seed = [r for r in res["runs"] if r["seed"] == 2]
    assert len(bad_seed) == 1 and math.isnan(bad_seed[0]["nrmse"]) and bad_seed[0]["learned"] is False
    assert sorted(r["nrmse"] for r in res["runs"] if r["seed"] != 2) == [0.4, 0.4]
    B2, b2, _ = _fake_bench(monkeypatch, tmp_path, lambda *a: None, lambda split, guard: 0.5)
    with pytest.raises(UserError, match="every learning rate and recipe of fno failed"):
        B2.run_methods(b2)


def test_the_guard_is_chosen_on_validation_only(monkeypatch, tmp_path):
    """The guard helps on validation and hurts on test here: it is still on (test is never read to
    choose), and test is scored once per model, with the chosen setting."""
    def test_of(split, guard):
        if split == "val":
            return 0.3 if guard else 0.5
        return 0.9 if guard else 0.1

    B, b, scored = _fake_bench(monkeypatch, tmp_path, lambda m, r, lr, seed, budget: {1e-4: 0.7, 1e-3: 0.5, 1e-2: 0.6}[lr],
                               test_of)
    res = B.run_methods(b)["fno"]
    assert res["chosen"]["guard"] is True and all(r["guard"] and r["nrmse"] == 0.9 for r in res["runs"])
    assert sorted(g for split, g in scored if split == "test") == [True] * 3       # once per model
    assert sorted(g for split, g in scored if split == "val") == [False] * 3 + [True] * 3
    assert B.choose_guard([{False: 0.2, True: 0.2}]) is False                     # a tie: no guard


def test_a_given_choice_skips_the_search(monkeypatch, tmp_path):
    """given.<method> (an earlier run's choice on validation) trains the seeds at it, with no trial;
    its guard, when given, is used, else chosen on validation; other methods are still searched."""
    B, b, scored = _fake_bench(monkeypatch, tmp_path,
                               lambda m, r, lr, seed, budget: {1e-4: 0.7, 1e-3: 0.5, 1e-2: 0.6}.get(lr, 0.55),
                               lambda split, guard: 0.3 if guard else 0.5, methods=("ours", "fno"))
    b.checked["given"] = {"fno": {"recipe": "pdebench", "lr": 3e-3, "guard": False}}
    res = B.run_methods(b)
    assert res["fno"]["trials"] == [] and res["fno"]["chosen"]["given"]
    assert all(r["recipe"] == "pdebench" and r["lr"] == 3e-3 and r["guard"] is False for r in res["fno"]["runs"])
    assert res["ours"]["trials"] and not res["ours"]["chosen"]["given"] and res["ours"]["chosen"]["guard"] is True


@pytest.mark.parametrize("override, needle", [
    ("+given.fno={recipe: bogus, lr: 1e-3}", "given.fno.recipe"),
    ("+given.fno={recipe: pdebench}", "given.fno"),
    ("+given.fno={recipe: pdebench, lr: 1e-3, guard: maybe}", "given.fno.guard"),
    ("+given.gno={recipe: pdebench, lr: 1e-3}", "given.gno"),
])
def test_bad_given_choices_are_user_errors(override, needle):
    from ups_lightning.bench import check_config
    from ups_lightning.errors import UserError

    with pytest.raises(UserError, match=needle):
        check_config(_bench_cfg(override))


def test_search_is_successive_halving_with_interior_picks_and_equal_trials():
    from ups_lightning.bench.search import SearchSettings, ladder_rate, search

    calls = []
    # fno's optimum (1e-1) lies two steps above its ladder [1e-4, 1e-3, 1e-2]; ours' (1e-3) inside
    optimum = {"fno": -1.0, "ours": -3.0}

    def train(method, recipe, lr, fraction):
        calls.append((method, recipe, lr, fraction))
        return abs(math.log10(lr) - optimum[method]) + (0.5 if recipe == "pdebench" else 0.0) + (1 - fraction), {}

    s = SearchSettings(rates=3, step=10.0, widen=2, rungs=(0.25, 0.5, 1.0), keep=2)
    out = search({"ours": (1e-3, ["project"]), "fno": (1e-3, ["project", "pdebench"])}, s, train, say=lambda *a: None)
    first = {(m, r): [c[2] for c in calls if c[:2] == (m, r) and c[3] == 0.25] for m, r in
             (("ours", "project"), ("fno", "project"), ("fno", "pdebench"))}
    # fno widened twice upwards; ours was padded to the same count, on the side of its better edge
    assert sorted(first[("fno", "project")]) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert all(len(v) == 5 for v in first.values())
    assert out["fno"]["interior"] == {"project": True, "pdebench": True} and out["ours"]["interior"] == {"project": True}
    assert out["fno"]["first_rung_trials"] == {"project": 5, "pdebench": 5}
    # halving: 2 of a method's first-rung trials at 0.5, then 2 at the budget; the best there is chosen
    for m in ("ours", "fno"):
        assert sum(1 for c in calls if c[0] == m and c[3] == 0.5) == 2
        assert sum(1 for c in calls if c[0] == m and c[3] == 1.0) == 2
    assert (out["fno"]["chosen"].recipe, out["fno"]["chosen"].lr, out["fno"]["chosen"].fraction) == ("project", 0.1, 1.0)
    assert out["ours"]["chosen"].lr == 1e-3
    assert ladder_rate(1e-3, math.sqrt(10), 1) == 0.00316
    # an edge pick that the widening cannot fix is reported, not hidden
    calls.clear()
    out = search({"fno": (1e-3, ["project"])}, SearchSettings(rates=3, step=10.0, widen=0, rungs=(1.0,), keep=1),
                 train, say=lambda *a: None)
    assert out["fno"]["interior"] == {"project": False} and len(calls) == 3


@pytest.mark.slow
def test_bench_with_ours_on_smoke_data(smoke_data, tmp_path):
    from ups_lightning.bench import run_bench

    cfg = _bench_cfg("data=smoke", f"data.root={smoke_data / 'data'}", "model=dim8", "budget_min=0.2",
                     "methods=[ours]", "seeds=[0,1]", *SMALL_SEARCH, "threads=1", f"out_dir={tmp_path}",
                     f"leaderboard={tmp_path / 'lb.csv'}", f"html={tmp_path / 'lb.html'}")
    out = run_bench(cfg, say=lambda *a: None)
    trials = [t for t in out["results"]["ours"]["trials"] if t["rung"] == 0]
    # the learning-rate trials of one budget share the first trial's autoencoder, bit for bit (the
    # later trials hold it by reference: stage_dir resolves where it lives)
    from ups_lightning.artifacts import stage_dir

    ae = [stage_dir(t["run_dir"], "autoencoder") / "done.json" for t in trials]
    import json
    assert len({json.loads(p.read_text())["ckpt_sha256"] for p in ae}) == 1
    # one clock: each stage's preparation (the operator's latent cache) is recorded and inside its budget
    op = json.loads((stage_dir(trials[0]["run_dir"], "operator") / "done.json").read_text())
    assert op["prep_s"] > 0 and op["prep_s"] + op["wall_clock_s"] <= 60 * 0.1 * 0.625 + 10
    runs = out["results"]["ours"]["runs"]
    assert len(runs) == 2 and all(math.isfinite(r["nrmse"]) for r in runs)
    assert (tmp_path / "lb.csv").exists() and (tmp_path / "val_leaderboard.csv").exists()
    with open(tmp_path / "lb.csv") as fh:
        assert {r["split"] for r in csv.DictReader(fh)} == {"test"}


def test_ttc_headroom_measures_each_reward_against_plain_and_oracle(smoke_run, tmp_path):
    from omegaconf import OmegaConf

    from ups_lightning.bench.ttc_headroom import rank_correlation, run_headroom
    from ups_lightning.errors import UserError

    cfg, _ = smoke_run
    hcfg = OmegaConf.create(dict(run_dir=cfg.run_dir, members=[], split="test", n_candidates=3, perturb=0.0,
                                 corrector="student", corrector_scale=1.0, mean=False, snapshots=0,
                                 rewards=["physics", "consistency:16", "verifier"],
                                 weights={"mass": 1.0}, verifier_trajectories=8, verifier_steps=20, seed=0,
                                 num_threads=None))
    r = run_headroom(hcfg)
    # the oracle's first step is never worse than the operator step, and it uses the other candidates
    assert r["oracle"]["nrmse_1"] <= r["plain"]["nrmse_1"] and r["oracle"]["operator_step_kept"] < 1.0
    assert r["plain"]["operator_step_kept"] == 1.0 and r["oracle"]["one_step_change"] <= 0.0
    for name, row in r["rewards"].items():
        assert -1.0 <= row["spearman"] <= 1.0 and row["one_step_change"] >= r["oracle"]["one_step_change"] - 1e-9
        assert row["nrmse"] >= 0.0 and row["ms_per_traj"] > 0.0
    # a reward that runs a solver has that solver on its own beside it
    assert r["rewards"]["consistency:16"]["solver_alone"]["cells"] == 16
    assert "solver_alone" not in r["rewards"]["physics"]
    # the rank correlation itself: a reward ordered as the errors is 1, the reverse -1
    err = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]])
    assert rank_correlation(-err, err) == pytest.approx(1.0) and rank_correlation(err, err) == pytest.approx(-1.0)
    with pytest.raises(UserError, match="n_candidates"):
        run_headroom(OmegaConf.merge(hcfg, {"n_candidates": 1}))
    with pytest.raises(UserError, match="ttc.n_candidates=3"):   # extra candidates that can only repeat
        run_headroom(OmegaConf.merge(hcfg, {"corrector": None}))
    with pytest.raises(UserError, match="consistency:CELLS"):
        run_headroom(OmegaConf.merge(hcfg, {"rewards": ["consistency"]}))


def _sitting(folder: Path, rows, data_path="/x/1D_Burgers_Sols_Nu0.001.hdf5", n_test=200, steps=31, curves=()):
    """A committed results directory of one benchmark sitting (what bench/curves.py reads)."""
    from ups_lightning.tables import write_csv

    folder.mkdir(parents=True)
    write_csv(folder / "summary.csv", [{"method": "persistence", "data_path": data_path, "n_test": n_test,
                                         "steps": steps}], ("method",))
    base = {"label": "x", "recipe": "project", "lr": 0.003, "guard": True, "learned": True, "train_s": 60.0,
            "nrmse_pdebench": 0.1}
    write_csv(folder / "runs.csv", [{**base, **r} for r in rows], ("method",))
    if curves:
        write_csv(folder / "curves.csv", [{**base, **r} for r in curves], ("method",))
    return folder


def test_learning_curves_merge_across_sittings_and_say_where_they_cross(tmp_path):
    """A long curve completes across sittings: points of committed results directories are merged,
    a model scored twice counts once, other data is refused, and the verdicts need 2 SE."""
    from ups_lightning.bench.curves import merge_curves, verdicts, write_curves
    from ups_lightning.errors import UserError

    ten = [{"method": m, "seed": s, "budget_min": 10.0, "nrmse": v + 0.001 * s}
           for m, v in (("ours", 0.16), ("fno", 0.30)) for s in (0, 1, 2)]
    a = _sitting(tmp_path / "a", ten)
    short = [{"method": m, "seed": 0, "budget_min": 2.5, "nrmse": v} for m, v in (("ours", 0.40), ("fno", 0.35))]
    b = _sitting(tmp_path / "b", short, curves=short + [ten[0]])     # repeats a model of sitting a
    rows, notes = merge_curves([], None, [a, b])
    assert len(rows) == 8 and sum(r["budget_min"] == 10.0 and r["method"] == "ours" for r in rows) == 3
    assert any("not counted twice" in n for n in notes)
    assert {r["source"] for r in rows} == {str(a), str(b)}
    said = verdicts(rows)
    assert any(line.startswith("2.5 min") and "one seed: no winner named" in line for line in said)
    assert any(line.startswith("10 min") and "**ours lower** beyond two standard errors" in line for line in said)
    assert any("changes between 2.5 and 10 min" in line for line in said)
    close = [{**r, "nrmse": 0.2 + 0.05 * r["seed"]} for r in rows if r["budget_min"] == 10.0]
    assert any("within two standard errors" in line for line in verdicts(close))
    paths = write_curves(tmp_path / "out", rows, [])
    assert "changes between 2.5 and 10 min" in paths["curves_md"].read_text()
    assert (tmp_path / "out" / "curves.csv").read_text().count("\n") == 9
    other = _sitting(tmp_path / "c", short, n_test=100)
    with pytest.raises(UserError, match="n_test=100"):
        merge_curves([], None, [a, other])
    with pytest.raises(UserError, match="runs.csv"):
        merge_curves([], None, [tmp_path / "nowhere"])


def test_curves_only_merges_and_trains_nothing(tmp_path, monkeypatch):
    import ups_lightning.bench as B

    a = _sitting(tmp_path / "a", [{"method": "ours", "seed": 0, "budget_min": 10.0, "nrmse": 0.2},
                                  {"method": "fno", "seed": 0, "budget_min": 10.0, "nrmse": 0.3}])
    monkeypatch.setattr(B, "run_methods", lambda *a: pytest.fail("curves_only trained a model"))
    cfg = _bench_cfg(f"curves_from=[{a}]", "curves_only=true", f"out_dir={tmp_path / 'out'}")
    out = B.run_bench(cfg, say=lambda *x: None)
    assert len(out["curves"]) == 2 and (tmp_path / "out" / "curves.md").is_file()
    assert "0.029" in (tmp_path / "out" / "curves.md").read_text()    # Burgers' published FNO figure
