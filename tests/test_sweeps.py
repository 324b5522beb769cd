"""Sweeps (issue 12): every job keeps its own result in its own directory, shared upstream stages are
used by reference and checked at evaluation, the sweep report names the best job on validation,
per-stage optimiser settings and width/heads apart from dim; Optuna, submitit and Ray (slow)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import eval_cfg, smoke_cfg
from omegaconf import OmegaConf

from ups_lightning.artifacts import REFERENCES, checkpoint_file, read_record, stage_config_hash, stage_dir
from ups_lightning.config import stage_optim, validate_train_config
from ups_lightning.errors import UserError
from ups_lightning.evaluation import evaluate, load_run
from ups_lightning.report import write_report
from ups_lightning.training import build_trainer, run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def train_cli(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ups_lightning.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


@pytest.fixture
def base_run(smoke_run, tmp_path):
    """A copy of the session's smoke run where a plain `experiment=smoke model=dim16` run started in
    `tmp_path` finds it (outputs/runs/smoke/smoke/dim16), and the data root it was trained on."""
    cfg, _ = smoke_run
    base = tmp_path / "outputs" / "runs" / "smoke" / "smoke" / "dim16"
    shutil.copytree(cfg.run_dir, base)
    return base, Path(cfg.data.root)


def _operator_weights(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("operator."):]: v for k, v in state.items() if k.startswith("operator.")}


def test_an_lr_sweep_keeps_each_job_and_evaluates_the_model_that_job_trained(base_run, tmp_path):
    base, data_root = base_run
    sweep = tmp_path / "sweep"
    res = train_cli(tmp_path, "-m", "experiment=smoke", "model=dim16", "stage=operator",
                    "stages.operator.lr=1e-3,3e-3,-1", f"data.root={data_root}", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-3000:]   # a failed job does not end the sweep ...
    assert "stages.operator.lr=-1.0 is out of range" in res.stderr
    jobs = [sweep / "0", sweep / "1"]
    hashes = set()
    for job, lr in zip(jobs, (1e-3, 3e-3)):
        record = read_record(job, "operator")
        assert (job / "operator" / "done.json").is_file() and record["config"]["stages"]["operator"]["lr"] == lr
        hashes.add(record["config_hash"])
        # the autoencoder is the base run's, by reference: never copied into the job, never moved
        assert not (job / "autoencoder").exists() and not (job / "latents").exists()
        assert stage_dir(job, "autoencoder").resolve() == (base / "autoencoder").resolve()
        assert json.loads((job / REFERENCES).read_text()) == {"autoencoder": os.path.relpath(base.resolve(), job.resolve())}
        # evaluation loads this job's operator, weight for weight
        _, records, module = load_run(job)
        assert list(records) == ["autoencoder", "operator"]
        trained = _operator_weights(checkpoint_file(job, "operator", record))
        loaded = module.operator.state_dict()
        assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert len(hashes) == 2
    assert not list(base.glob("operator.stale-*"))   # the base run's own operator is untouched
    w0, w1 = (_operator_weights(checkpoint_file(j, "operator", read_record(j, "operator"))) for j in jobs)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    # the multirun wrote its report; the best job is the lower validation nRMSE
    vals = [read_record(j, "operator")["best_val_nrmse"] for j in jobs]
    best = jobs[vals.index(min(vals))].name
    report = (sweep / "report.md").read_text()
    assert f"**Best: job {best}** (stages.operator.lr=" in report
    assert (sweep / "report.csv").is_file() and (sweep / "report_stages.operator.lr.png").is_file()
    assert "| 2 | -1 |" in report and "failed: setting stages.operator.lr=-1.0" in report   # ... and is listed

    # test figures join the report once a job is evaluated; the report's choice stays on validation
    row = evaluate(eval_cfg(sweep / best, tmp_path / "lb", "n_show=0"))
    paths = write_report(sweep, leaderboard=str(tmp_path / "lb" / "lb.csv"))
    csv_rows = (paths["csv"]).read_text().splitlines()
    assert "test_nrmse" in csv_rows[0] and f"{row['nrmse']}" in "\n".join(csv_rows)

    # retraining the shared autoencoder makes every job that used it stale: refused, never scored
    run(smoke_cfg(data_root.parent, f"run_dir={base}", "stage=autoencoder", "stages.autoencoder.max_epochs=1"))
    with pytest.raises(UserError, match=r"stage 'operator' .* is stale"):
        load_run(sweep / "0")


@pytest.mark.slow   # ~40 s
def test_a_sweep_with_every_stage_shares_the_first_jobs_autoencoder(smoke_data, tmp_path):
    sweep = tmp_path / "sweep"
    res = train_cli(tmp_path, "-m", "experiment=smoke", "model=dim8", "stage=autoencoder_operator",
                    "stages.autoencoder.max_epochs=1", "stages.operator.max_epochs=1",
                    "stages.operator.lr=1e-3,2e-3", f"data.root={smoke_data / 'data'}", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (sweep / "0" / "autoencoder" / "done.json").is_file()          # job 0 trained it ...
    assert not (sweep / "1" / "autoencoder").exists()                     # ... job 1 used it
    assert stage_dir(sweep / "1", "autoencoder").resolve() == (sweep / "0" / "autoencoder").resolve()
    assert (sweep / "1" / "operator" / "done.json").is_file()
    # the reproduce command keeps the job's place and what it reused
    overrides = json.loads((sweep / "1" / "overrides.json").read_text())
    assert f"run_dir={sweep / '1'}" in overrides and any(o.startswith("reuse_runs=") for o in overrides)


def test_a_broken_reference_file_is_a_clear_error(smoke_data, tmp_path):
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / REFERENCES).write_text("{not json")
    with pytest.raises(UserError, match=r"references.json: not a readable reference file"):
        stage_dir(run_dir, "autoencoder")
    (run_dir / REFERENCES).write_text(json.dumps({"decoder": "../x"}))
    with pytest.raises(UserError, match=r"expected a JSON object mapping stage names"):
        stage_dir(run_dir, "autoencoder")


def test_the_report_of_a_directory_without_jobs_says_what_it_expected(tmp_path):
    with pytest.raises(UserError, match=r"no job directories"):
        write_report(tmp_path)
    with pytest.raises(UserError, match=r"no such directory"):
        write_report(tmp_path / "missing")


# --- per-stage optimiser settings, width and heads apart from dim ----------------------------------
def test_a_stage_can_have_its_own_optimiser_settings(smoke_data, tmp_path):
    cfg = validate_train_config(smoke_cfg(smoke_data, "stages.operator.optim.weight_decay=0.2",
                                          "stages.operator.optim.ema_decay=0.5", "stages.operator.optim.grad_clip=3.0",
                                          "stages.operator.optim.betas=[0.8,0.9]", "stages.operator.optim.schedule=constant"))
    op, ae = stage_optim(cfg, "operator"), stage_optim(cfg, "autoencoder")
    assert (op["weight_decay"], op["ema"]["decay"], op["grad_clip"], op["betas"], op["schedule"]) == \
        (0.2, 0.5, 3.0, [0.8, 0.9], "constant")
    assert ae == OmegaConf.to_container(cfg.optim)   # the other stages keep the global settings
    trainer = build_trainer(cfg, "operator", tmp_path / "t")
    assert trainer.gradient_clip_val == 3.0
    ema = [c for c in trainer.callbacks if type(c).__name__ == "EMA"]
    assert ema and ema[0].decay == 0.5
    # the setting is part of the stage's identity, and only of that stage's
    plain = validate_train_config(smoke_cfg(smoke_data))
    assert stage_config_hash(cfg, "operator", None) != stage_config_hash(plain, "operator", None)
    assert stage_config_hash(cfg, "autoencoder", None) == stage_config_hash(plain, "autoencoder", None)


@pytest.mark.parametrize("override, key", [("stages.operator.optim.weight_decay=-1", "stages.operator.optim.weight_decay"),
                                           ("stages.diffusion.optim.schedule=linear", "stages.diffusion.optim.schedule"),
                                           ("stages.operator.optim.betas=[0.9]", "stages.operator.optim.betas"),
                                           ("model.heads=0", "model.heads")])
def test_bad_per_stage_and_size_settings_name_the_key(smoke_data, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate_train_config(smoke_cfg(smoke_data, override))


def test_width_and_heads_are_settable_apart_from_dim(smoke_data, tmp_path):
    from ups_lightning.data.datamodule import open_run_data
    from ups_lightning.training import _stage_module

    def operator(*overrides):
        cfg = validate_train_config(smoke_cfg(smoke_data, *overrides))
        return _stage_module(cfg, "operator", open_run_data(cfg.data).contract).operator

    rule, wide = operator(), operator("model.hidden=80", "model.heads=4")
    n = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    assert n(wide) > n(rule)
    attn = [m for m in wide.modules() if hasattr(m, "heads")]
    assert attn and {m.heads for m in attn} == {4}
    with pytest.raises(UserError, match=r"model.heads=3 must divide model.dim=16"):
        validate_train_config(smoke_cfg(smoke_data, "model.heads=3"))


def test_older_runs_keep_their_identity(smoke_run):
    """The keys added for sweeps (model.hidden/heads, stages.*.optim, reuse_runs) at their neutral
    values leave a stage's hash as it was, so finished runs are not retrained or refused."""
    cfg, records = smoke_run
    old = OmegaConf.to_container(cfg, resolve=True)
    for k in ("hidden", "heads"):
        old["model"].pop(k)
    for s in old["stages"].values():
        s.pop("optim")
    old.pop("reuse_runs")
    from ups_lightning.config import fill_later_keys

    filled = validate_train_config(fill_later_keys(OmegaConf.create(old)))
    assert stage_config_hash(filled, "autoencoder", None) == records["autoencoder"]["config_hash"]


# --- Optuna, submitit, Ray ---------------------------------------------------------------------------
@pytest.mark.slow
def test_optuna_search_runs_offline_and_the_report_lists_its_trials(smoke_data, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    res = train_cli(tmp_path, "sweep=operator_optuna", "hydra.sweeper.n_trials=4", "experiment=smoke",
                    "model=dim8", "stages.autoencoder.max_epochs=1", "stages.operator.max_epochs=1",
                    f"data.root={smoke_data / 'data'}", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-3000:]
    report = (sweep / "report.md").read_text()
    assert report.count("\n| ") == 5, report        # a header and 4 trials
    assert "stages.operator.lr" in report and "**Best: job" in report


@pytest.mark.slow
@pytest.mark.parametrize("launcher, module", [("submitit_local", "hydra_plugins.hydra_submitit_launcher"),
                                              ("ray", "ray")])
def test_launchers_run_a_two_job_smoke_sweep(smoke_data, tmp_path, launcher, module):
    pytest.importorskip(module)
    sweep = tmp_path / launcher
    extra = ["hydra.launcher.num_cpus=2"] if launcher == "ray" else ["hydra.launcher.timeout_min=10"]
    res = train_cli(tmp_path, "-m", f"hydra/launcher={launcher}", *extra, "experiment=smoke", "model=dim8",
                    "stage=autoencoder", "stages.autoencoder.max_epochs=1", "stages.autoencoder.lr=1e-3,3e-3",
                    f"data.root={smoke_data / 'data'}", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "autoencoder" / "done.json").is_file()
    assert "**Best: job" in (sweep / "report.md").read_text()


def test_the_shipped_slurm_and_optuna_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir

    from ups_lightning import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
        assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1
        assert "submitit" in cfg.hydra.launcher._target_
        cfg = compose("train", overrides=["sweep=operator_optuna"], return_hydra_config=True)
        assert "optuna" in cfg.hydra.sweeper._target_.lower()
        assert set(cfg.hydra.sweeper.params) >= {"stages.operator.lr", "stages.operator.optim.weight_decay",
                                                 "stages.operator.rollout_steps", "model.depth",
                                                 "stages.operator.optim.warmup_ratio"}
        assert list(cfg.stage.run) == ["autoencoder", "operator"]


# --- proxy fidelity ----------------------------------------------------------------------------------
def test_spearman_ranks_with_ties_and_known_answers():
    from ups_lightning.proxy import ranks, spearman

    assert ranks([0.3, 0.1, 0.2, 0.1]) == [4.0, 1.5, 3.0, 1.5]
    assert spearman([1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair among 6: 1 - 6 * 2 / (6 * 35)
    assert spearman([1, 2, 3, 4, 5, 6], [2, 1, 3, 4, 5, 6]) == pytest.approx(1 - 12 / 210)


@pytest.mark.slow
def test_the_proxy_command_trains_both_protocols_and_reports_the_rank_correlation(smoke_data, tmp_path):
    out = tmp_path / "proxy"
    res = subprocess.run([sys.executable, "-m", "ups_lightning.proxy", "experiments.small=smoke",
                          "experiments.full=smoke", "budget_min.small=0.1", "budget_min.full=0.2",
                          "configs=[['model=dim8'],['model=dim8','stages.operator.lr=1e-3']]",
                          f"train_overrides=['data.root={smoke_data / 'data'}']", f"out_dir={out}"],
                         capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "proxy.md").read_text()
    assert "Spearman rank correlation" in md and "Small-protocol winner: config" in md
    # config 1 used config 0's autoencoder under each protocol (same model): by reference
    assert not (out / "small" / "1" / "autoencoder").exists() and (out / "small" / "0" / "autoencoder").exists()


def test_the_shipped_sweep_presets_compose_and_validate():
    from hydra import compose, initialize_config_dir

    from ups_lightning import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cap = compose("train", overrides=["sweep=capacity"], return_hydra_config=True)
        assert cap.hydra.mode.name == "MULTIRUN" and "dim512" in cap.hydra.sweeper.params.model
        grid = compose("train", overrides=["sweep=operator_grid"], return_hydra_config=True)
        assert list(grid.stage.run) == ["autoencoder", "operator"]
        assert set(grid.hydra.sweeper.params) == {"stages.operator.lr", "stages.operator.optim.weight_decay",
                                                  "model.hidden", "model.heads"}
        # every job of the grid is a valid training config
        for h in str(grid.hydra.sweeper.params["model.hidden"]).split(","):
            for wd in str(grid.hydra.sweeper.params["stages.operator.optim.weight_decay"]).split(","):
                validate_train_config(compose("train", overrides=[f"model.hidden={h}", "model.heads=2",
                                                                  f"stages.operator.optim.weight_decay={wd}"]))


def test_validation_on_steps_keeps_the_best_weights_within_an_epoch(smoke_data, tmp_path):
    """trainer.val_every_n_steps: a wall-clock-limited stage that finishes few epochs still validates
    and checkpoints its best weights as it goes (issue 11), for our stages and the bench's peers alike."""
    cfg = validate_train_config(smoke_cfg(smoke_data, "trainer.val_every_n_steps=2"))
    trainer = build_trainer(cfg, "autoencoder", tmp_path / "t")
    assert trainer.val_check_interval == 2 and trainer.check_val_every_n_epoch is None
    cfg = smoke_cfg(smoke_data, "model=dim8", "stage=autoencoder", "stages.autoencoder.max_epochs=1",
                    "trainer.val_every_n_steps=2", f"run_dir={tmp_path / 'steps'}")
    record = run(cfg)["autoencoder"]
    metrics = next((tmp_path / "steps" / "autoencoder").rglob("metrics.csv")).read_text().splitlines()
    col = metrics[0].split(",").index("val/nrmse")
    vals = [line.split(",")[col] for line in metrics[1:] if line.split(",")[col]]
    assert len(vals) >= 2 and record["best_val_nrmse"] == pytest.approx(min(map(float, vals)), rel=1e-6)


@pytest.mark.parametrize("override, key", [("configs=[]", "configs"), ("budget_min.full=0", "budget_min.full"),
                                           ("train_overrides=null", "train_overrides")])
def test_bad_proxy_settings_name_the_setting(override, key):
    from ups_lightning.config import compose_config
    from ups_lightning.proxy import check_config

    with pytest.raises(UserError, match=rf"proxy setting {key.replace('.', chr(92) + '.')}="):
        check_config(compose_config("proxy", [override]))


def test_a_multirun_naming_one_run_dir_for_every_job_is_refused(monkeypatch, tmp_path):
    """Jobs of different settings in one run_dir would overwrite each other: refused; a swept run_dir
    (one per job) is the user's own layout and is left alone."""
    import sys

    import ups_lightning.training as T
    from ups_lightning.errors import UserError

    monkeypatch.setattr(T, "in_multirun", lambda: True)
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "one")})
    monkeypatch.setattr(sys, "argv", ["train", "-m", f"run_dir={tmp_path / 'one'}", "stages.operator.lr=1e-3,3e-3"])
    with pytest.raises(UserError, match="overwrite each other"):
        T.sweep_job(cfg, [f"run_dir={tmp_path / 'one'}", "stages.operator.lr=1e-3"])
    monkeypatch.setattr(sys, "argv", ["train", "-m", f"run_dir={tmp_path / 'a'},{tmp_path / 'b'}"])
    assert T.sweep_job(cfg, [f"run_dir={tmp_path / 'a'}"]) == (cfg, [f"run_dir={tmp_path / 'a'}"])
