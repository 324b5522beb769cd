"""The throughput benchmark runs in its smoke mode and reports what it promises; the CPU set-up
every entry point shares (threads, allocator)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from ups_lightning import runtime


def _cfg(tmp_path, *overrides):
    from ups_lightning.config import compose_config

    return compose_config("throughput", ["smoke=true", f"out={tmp_path / 't.json'}", "threads=1", *overrides])


def test_smoke_run_reports_every_stage_and_the_rollout(tmp_path):
    from ups_lightning.bench.throughput import run_throughput

    lines = []
    result = run_throughput(_cfg(tmp_path), say=lines.append)
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["peak_gflops"]["float32"] > 0 and written["machine"]["threads"] == 1
    stages = {r["stage"] for r in result["training"]}
    assert stages == {"autoencoder", "operator", "diffusion", "distill"}
    for r in result["training"]:
        assert r["gflop_per_step"] > 0 and r["step_ms"] > 0 and r["samples_per_s"] > 0
        assert 0 < r["share_of_fp32_peak"] == pytest.approx(r["gflops"] / result["peak_gflops"]["float32"])
    (ro,) = result["rollout"]
    assert set(ro["parts_ms_per_traj"]) == {"operator_step", "decode", "guard", "encode", "reward"}
    assert ro["rollout_ms_per_traj"] > 0 and ro["ttc_ensemble_ms_per_traj"] > 0
    assert all(v > 0 for v in ro["parts_mflop_per_traj"].values()) and 0 < ro["share_of_fp32_peak"]
    assert any("% fp32 peak" in line for line in lines) and any("ttc=ensemble" in line for line in lines)


def test_smoke_run_in_2d_times_each_stem_variant(tmp_path):
    """A 2D equation is timed on a 2D grid; each variant of the model is a row of its own, and a
    cheaper stem costs fewer FLOPs; the consistency reward and the search (1D) are left out."""
    from ups_lightning.bench.throughput import run_throughput

    lines = []
    result = run_throughput(_cfg(tmp_path, "pde=swe2d", "train_stages=[autoencoder]",
                                 "variants=[[],['model.stem_kernel=3']]"), say=lines.append)
    assert result["grid"] == [16, 16]
    base, k3 = result["training"]
    assert base["grid"] == [16, 16] and base["variant"] == [] and k3["variant"] == ["model.stem_kernel=3"]
    assert 0 < k3["gflop_per_step"] < base["gflop_per_step"]
    assert len(result["rollout"]) == 2
    for ro in result["rollout"]:
        assert ro["parts_ms_per_traj"]["reward"] is None and ro["ttc_ensemble_ms_per_traj"] is None
        assert ro["rollout_ms_per_traj"] > 0 and ro["parts_ms_per_traj"]["decode"] > 0
    assert any("swe2d on 16 x 16 cells" in line for line in lines)


def test_operator_flops_grow_with_the_batch(tmp_path):
    from ups_lightning.bench.throughput import train_throughput

    one = train_throughput("dim8", "operator", "burgers1d", batch_scale=0.25, warmup=1, steps=1)
    two = train_throughput("dim8", "operator", "burgers1d", batch_scale=0.5, warmup=1, steps=1)
    assert two["batch"] == 2 * one["batch"]
    assert two["gflop_per_step"] == pytest.approx(2 * one["gflop_per_step"], rel=0.01)


@pytest.mark.parametrize("override,match", [("train_stages=[decoder]", "not stages"), ("steps=0", "steps=0"),
                                            ("pde=heat2d", "not an equation"),
                                            ("sizes=[dim7]", "not a model config"),
                                            ("batch_scales=[0]", "batch_scales"),
                                            ("grid=[64,64]", "grid=\\[64, 64\\]"),
                                            ("variants=[]", "variants")])
def test_bad_settings_are_one_error(tmp_path, override, match):
    from ups_lightning.bench.throughput import run_throughput
    from ups_lightning.errors import UserError

    cfg = _cfg(tmp_path, override)
    if override.startswith(("steps", "sizes")):   # smoke mode sets these itself: check the full mode
        cfg.smoke = False
    with pytest.raises(UserError, match=match):
        run_throughput(cfg, say=lambda *_: None)
    assert not (tmp_path / "t.json").exists()


def test_threads_follow_the_setting_and_are_logged(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="ups_lightning.runtime"):
            assert runtime.configure_cpu(1, "num_threads") == 1
        assert torch.get_num_threads() == 1
        assert any("torch threads: 1 (num_threads)" in r.getMessage() for r in caplog.records)
        assert any("allocator" in r.getMessage() for r in caplog.records)
        n = runtime.set_num_threads(None)
        assert 1 <= n <= runtime.TORCH_DEFAULT_THREADS and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


def test_allocator_tuning_is_idempotent():
    first = runtime.tune_allocator()
    assert isinstance(first, bool) and runtime.tune_allocator() is first
