"""`python -m ups_lightning.evaluate` on the smoke run: rows, reports, no teacher forcing."""
from __future__ import annotations

from ups_lightning import CONF_DIR

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import eval_cfg

from ups_lightning.errors import UserError
from ups_lightning.evaluation import evaluate
from ups_lightning.inference.rollout import Guard, Surrogate, rollout
from ups_lightning.pdes import get_pde


def _surrogate_inputs(cfg, module):
    """(run data, unit coordinates, conditioning vector of the smoke file) as the model sees them."""
    from ups_lightning.data.datamodule import open_run_data, unit_coords

    data = open_run_data(cfg.data)
    (pde,) = data.contract.pdes
    assert pde == "burgers1d" and tuple(module.contract.pdes) == (pde,)
    cond = module.contract.conditioning(pde, data.params[pde], data.meta.dt)
    return data, unit_coords(data), cond


def test_evaluation_row_has_the_contracted_columns(smoke_run, tmp_path):
    cfg, _ = smoke_run
    row = evaluate(eval_cfg(Path(cfg.run_dir), tmp_path, "ttc=default", "ttc.n_candidates=2", "corrector_rows=true",
                            "corrector_rows=true"))
    required = ("run_id run_dir data_path pde pde_params git_commit config_hash label model params ttc "
                "nrmse nrmse_1 "
                "nrmse_10 nrmse_pdebench persistence_nrmse solver_nrmse solver_ms_per_traj "
                "rollout_ms_per_traj crmse brmse max_err frmse_low frmse_mid frmse_high mass_drift "
                "energy_increase tv_increase correlation_horizon crps spread_skill coverage_50 coverage_90 ece "
                "ttc_gain_nrmse ttc_cost_ratio peak_rss_mb "
                "candidates_mean_nrmse solver_hybrid_nrmse solver_32_nrmse ttc_best_baseline "
                "ttc_gain_beyond_baselines solver_hybrid_weight").split()
    with open(tmp_path / "lb.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    missing = [k for k in required if k not in rows[0]]
    assert not missing, missing
    # the first row of its group is champion unless a stage it uses did not learn (the smoke operator
    # need not beat persistence): such a row is never champion
    records = smoke_run[1]
    used = ("autoencoder", "operator", "diffusion", "distill")   # ttc=default draws the student's corrections
    assert row["not_learned"] == " ".join(n for n in used if records[n].get("learned") is False)
    assert row["method"] == "ttc" and row["label"] == ("candidate" if row["not_learned"] else "champion")
    # the row names the scored file's equation and the parameters it was scored with
    assert row["pde"] == rows[0]["pde"] == "burgers1d"
    assert json.loads(row["pde_params"]) == json.loads(rows[0]["pde_params"]) == {"nu": 0.001}
    # TTC draws 2 candidates per step: its evaluations per step are counted, not assumed
    assert row["ttc_evals_per_step"] == pytest.approx(2.0)
    # beside it, its rivals without search; the hybrid's blend weight was chosen on validation
    assert row["solver_hybrid_weight"] in (0.25, 0.5, 0.75, 1.0)
    assert row["solver_hybrid_weight_chosen_on"].startswith("val")
    rivals = {k: row[f"{k}_nrmse"] for k in ("candidates_mean", "solver_hybrid", "solver_32")}
    assert row["ttc_best_baseline"] == min(rivals, key=rivals.get)
    assert row["ttc_gain_beyond_baselines"] == pytest.approx(min(rivals.values()) - row["nrmse"])
    # the PDEBench figure counts the given frames as zero error, so it is smaller than ours
    assert row["nrmse_pdebench"] < row["nrmse"]
    html = (tmp_path / "lb.html").read_text()
    assert "<img" in html


def test_rollout_never_reads_frames_after_the_given_ones(smoke_run, tmp_path):
    """Two files equal in the given frames and different afterwards give identical predictions."""
    cfg, _ = smoke_run
    src = Path(cfg.data.path)
    poisoned = tmp_path / "poisoned.hdf5"
    shutil.copy(src, poisoned)
    for suffix in (".manifest.json",):
        manifest = src.with_name(src.name + suffix)
        if manifest.exists():
            shutil.copy(manifest, poisoned.with_name(poisoned.name + suffix))
    given = cfg.data.initial_step
    with h5py.File(poisoned, "r+") as f:
        t = f["tensor"]
        t[:, given:] = np.random.default_rng(0).normal(size=t[:, given:].shape).astype(np.float32)
    a = evaluate(eval_cfg(Path(cfg.run_dir), tmp_path / "a"))
    b = evaluate(eval_cfg(Path(cfg.run_dir), tmp_path / "b", f"data.path={poisoned}"))
    pa = np.load(Path(a["artifacts"]) / "samples.npz")["pred"]
    pb = np.load(Path(b["artifacts"]) / "samples.npz")["pred"]
    np.testing.assert_array_equal(pa, pb)
    assert a["nrmse"] != b["nrmse"]  # the truth did change


def test_rollout_is_autoregressive(smoke_run):
    """k steps at once equal k single steps each restarted from the decoded previous prediction's
    latent state (the model runs on its own outputs)."""
    cfg, records = smoke_run
    from ups_lightning.artifacts import load_stage

    module = load_stage(cfg.run_dir, "operator", records["operator"])
    data, x, cond = _surrogate_inputs(cfg, module)
    sur = Surrogate(module, x, cond)
    u0 = torch.from_numpy(data.read("test")[:4, cfg.data.initial_step - 1])
    three = rollout(sur, u0, 3)
    z = sur.encode(u0)
    for k in range(3):
        z = sur.step(z)
        torch.testing.assert_close(three[:, k], sur.decode(z))


def test_guarded_rollout_conserves_mass_and_restarts_from_each_reencoded_frame(smoke_run):
    cfg, records = smoke_run
    from ups_lightning.artifacts import load_stage

    module = load_stage(cfg.run_dir, "operator", records["operator"])
    data, x, cond = _surrogate_inputs(cfg, module)
    u0 = torch.from_numpy(data.read("test")[:4, cfg.data.initial_step - 1])
    raw = rollout(Surrogate(module, x, cond), u0, 3)
    spec = get_pde("burgers1d")
    assert spec.invariants == ("mass",)          # Burgers' guard projects onto the given mean
    with pytest.raises(ValueError, match="needs the equation's spec"):
        Surrogate(module, x, cond, guard=Guard(invariants=True))
    mass = Surrogate(module, x, cond, guard=Guard(invariants=True), pde=spec)
    guarded = rollout(mass, u0, 3)
    # every frame keeps the given frame's mean; the raw rollout does not (a trained-for-seconds model)
    torch.testing.assert_close(guarded.mean(dim=2), u0.mean(dim=1, keepdim=True).expand(-1, 3, -1),
                               atol=1e-5, rtol=0)
    assert (raw.mean(dim=2) - u0.mean(dim=1, keepdim=True)).abs().max() > 1e-4
    # each step starts from the encoding of the previous (guarded) frame, not from the raw latent
    for k in range(1, 3):
        torch.testing.assert_close(guarded[:, k : k + 1], rollout(mass, guarded[:, k - 1], 1)[:, :1])
    reenc = Surrogate(module, x, cond, guard=Guard(reencode=True))
    z = reenc.step(reenc.encode(u0))
    torch.testing.assert_close(rollout(reenc, u0, 2)[:, 1], reenc.decode(reenc.step(reenc.encode(reenc.decode(z)))))


def test_evaluate_names_a_wrong_run_dir(tmp_path):
    with pytest.raises(UserError, match="has no finished operator stage"):
        evaluate(eval_cfg(tmp_path, tmp_path))
    with pytest.raises(UserError, match="no such directory"):
        evaluate(eval_cfg(tmp_path / "missing", tmp_path))
    assert not (tmp_path / "missing").exists()   # evaluation never creates the run directory


def test_compare_prints_metric_and_config_differences(smoke_run, tmp_path, capsys):
    from ups_lightning.compare import compare

    cfg, _ = smoke_run
    a = evaluate(eval_cfg(Path(cfg.run_dir), tmp_path))
    b = evaluate(eval_cfg(Path(cfg.run_dir), tmp_path, "ttc=default", "ttc.n_candidates=2", "corrector_rows=true"))
    capsys.readouterr()
    compare(a["run_id"], b["run_id"], str(tmp_path / "lb.csv"))
    out = capsys.readouterr().out
    assert "nrmse" in out and "B - A" in out and "configs are identical" in out
    with pytest.raises(UserError, match="neither a run id"):
        compare("no-such-run", b["run_id"], str(tmp_path / "lb.csv"))


def test_ttc_with_the_operator_as_its_only_candidate_is_the_plain_rollout(smoke_run):
    from ups_lightning.inference.candidates import Proposer
    from ups_lightning.inference.rewards import make_reward
    from ups_lightning.inference.rollout import Physics, ttc_rollout
    from ups_lightning.inference.ttc import TTCConfig
    from ups_lightning.artifacts import load_stage

    cfg, records = smoke_run
    module = load_stage(cfg.run_dir, "distill", records["distill"])
    data, x, cond = _surrogate_inputs(cfg, module)
    physics = Physics("burgers1d", data.params["burgers1d"], data.meta.dx, data.meta.dt, data.meta.domain_length)
    assert physics.params == {"nu": pytest.approx(0.001)} and physics.spec is get_pde("burgers1d")
    sur = Surrogate(module, x, cond, guard=Guard(reencode=True, invariants=True), pde=physics.spec)
    u0 = torch.from_numpy(data.read("test")[:4, cfg.data.initial_step - 1])
    reward = make_reward("consistency", physics, cells=8)
    only_operator, info = ttc_rollout(Proposer([sur]), u0, 3, TTCConfig(n_candidates=1, beam_width=1), reward)
    torch.testing.assert_close(only_operator, rollout(sur, u0, 3))
    assert info["evals_per_step"] == 1.0 and info["operator_step_kept"] == 1.0
    # corrector draws as the extra candidates: the search takes some of them
    draws = Proposer([sur], corrector="student", generator=torch.Generator().manual_seed(0))
    ticks = []   # the progress bar's hook: once per step
    with_corrections, info = ttc_rollout(draws, u0, 3, TTCConfig(n_candidates=4, beam_width=1), reward,
                                         on_step=lambda: ticks.append(1))
    assert info["operator_step_kept"] < 1.0 and info["evals_per_step"] == 4.0 and len(ticks) == 3
    # extra candidates that can only repeat the operator step are refused, naming the setting
    with pytest.raises(UserError, match="ttc.n_candidates=2"):
        ttc_rollout(Proposer([sur]), u0, 3, TTCConfig(n_candidates=2, beam_width=1), reward)
    assert not torch.allclose(with_corrections, only_operator)


def test_corrector_rows_only_for_a_corrector_that_learned():
    from ups_lightning.evaluation import _scored_corrector

    learned = {"distill": {"learned": True}, "diffusion": {"learned": False}}
    assert _scored_corrector("auto", "student", learned) == "student"
    assert _scored_corrector("auto", "teacher", learned) is None        # its stage did not beat doing nothing
    assert _scored_corrector(True, "teacher", learned) == "teacher"      # asked for: scored anyway
    assert _scored_corrector(False, "student", learned) is None
    assert _scored_corrector("auto", "student", {"distill": {"learned": None}}) == "student"  # unknown: scored
    assert _scored_corrector("auto", None, learned) is None


def test_a_member_named_twice_or_the_run_itself_is_refused(smoke_run, tmp_path):
    cfg, _ = smoke_run
    run = Path(cfg.run_dir)
    for members in (f"[{run}]", f"[{tmp_path / 'b'},{tmp_path / 'b'}]"):
        with pytest.raises(UserError, match="more than once"):
            evaluate(eval_cfg(run, tmp_path, "ttc=ensemble", f"ttc.candidates.members={members}"))
    assert not (tmp_path / "lb.csv").exists()


def test_snapshot_members_need_a_run_that_saved_them(smoke_run, tmp_path):
    cfg, _ = smoke_run   # trained without stages.operator.snapshot_every: no snapshots to search over
    with pytest.raises(UserError, match="snapshot_every"):
        evaluate(eval_cfg(Path(cfg.run_dir), tmp_path, "ttc=ensemble", "ttc.n_candidates=2", "ttc.candidates.snapshots=1"))
    assert not (tmp_path / "lb.csv").exists()


def test_a_search_over_draws_of_a_corrector_that_did_not_learn_is_skipped_under_auto():
    from omegaconf import OmegaConf

    from ups_lightning.evaluation import _skips_corrector_search

    def cfg(corrector, rows="auto", enabled=True):
        return OmegaConf.create({"corrector_rows": rows, "ttc": {"enabled": enabled, "candidates": {"corrector": corrector}}})

    not_learned, learned = {"distill": {"learned": False}}, {"distill": {"learned": True}}
    extra = {}
    assert _skips_corrector_search(cfg("student"), not_learned, extra) and "distill stage did not learn" in extra["ttc_skipped"]
    assert not _skips_corrector_search(cfg("student"), learned, {})            # it learned: searched
    assert not _skips_corrector_search(cfg("student", rows=True), not_learned, {})   # asked for: searched anyway
    assert not _skips_corrector_search(cfg(None), not_learned, {})             # seed members need no corrector
    assert not _skips_corrector_search(cfg("student", enabled=False), not_learned, {})


def test_the_python_api_loads_a_run_in_one_line_and_rolls_it_out_as_evaluation_does(smoke_run, tmp_path):
    """load(run_dir).rollout(given frames, steps) gives the predictions evaluation scores: its nRMSE
    on the test split is the leaderboard row's operator figure."""
    import torch

    from ups_lightning.api import load
    from ups_lightning.eval.metrics import all_metrics
    from ups_lightning.evaluation import eval_data, eval_member, load_run

    cfg, _ = smoke_run
    row = evaluate(eval_cfg(Path(cfg.run_dir), tmp_path / "lb", "ttc=off", "upto=operator"))
    model = load(cfg.run_dir, upto="operator")
    assert model.pde == "burgers1d" and model.stages == ("autoencoder", "operator")
    train_cfg, _, _ = load_run(Path(cfg.run_dir), "operator")
    test = eval_data(eval_member(train_cfg, None), None, "test").fields
    k = int(train_cfg.data.initial_step)
    pred = model.rollout(test[:, :k], steps=test.shape[1] - k)
    assert pred.shape == test[:, k:].shape and torch.isfinite(pred).all()
    m = all_metrics(pred, test[:, k:], dx=1.0 / test.shape[2], domain_length=1.0, u0=test[:, k - 1])
    assert m["nrmse"] == pytest.approx(row["nrmse"], rel=1e-4)
    with pytest.raises(ValueError, match="on the run's grid"):
        model.rollout(test[:, 0, :8], steps=2)
