"""Hostile command lines for train and evaluate: each bad setting is one clear paragraph naming the
key, before anything is read or written (issue 9). The in-process cases call the library the CLIs
wrap; a few go through the real command line to check exit code 2 and no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import eval_cfg, smoke_cfg

from ups_lightning.errors import UserError
from ups_lightning.evaluation import evaluate
from ups_lightning.training import run

TRAIN_CASES = [
    ("stages.operator.max_epochs=-1", "stages.operator.max_epochs"),
    ("stages.autoencoder.max_epochs=0", "stages.autoencoder.max_epochs"),
    ("stages.operator.batch_size=0", "stages.operator.batch_size"),
    ("stages.diffusion.batch_size=-4", "stages.diffusion.batch_size"),
    ("stages.operator.lr=0", "stages.operator.lr"),
    ("stages.operator.lr=-1e-3", "stages.operator.lr"),
    ("stages.operator.lr=nan", "stages.operator.lr"),
    ("stages.operator.lr=inf", "stages.operator.lr"),
    ("stages.distill.lr=0", "stages.distill.lr"),
    ("stages.autoencoder.max_minutes=0", "stages.autoencoder.max_minutes"),
    ("stages.operator.max_minutes=-2", "stages.operator.max_minutes"),
    ("stages.operator.rollout_steps=0", "stages.operator.rollout_steps"),
    ("stages.operator.noise_std=-0.1", "stages.operator.noise_std"),
    ("stages.operator.decoded_weight=-1", "stages.operator.decoded_weight"),
    ("stages.autoencoder.val_frames=0", "stages.autoencoder.val_frames"),
    ("stages.autoencoder.n_query=-1", "stages.autoencoder.n_query"),
    ("stages.diffusion.sample_steps=0", "stages.diffusion.sample_steps"),
    ("stages.diffusion.val_batches=0", "stages.diffusion.val_batches"),
    ("stages.distill.n_grid=1", "stages.distill.n_grid"),
    ("stages.distill.student_steps=3", "stages.distill.student_steps"),
    ("stages.distill.target_decay=1.5", "stages.distill.target_decay"),
    ("data.n_val=0", "data.n_val"),
    ("data.n_test=0", "data.n_test"),
    ("data.n_train=0", "data.n_train"),
    ("data.initial_step=0", "data.initial_step"),
    ("data.params.nu=0", "data.params.nu"),
    ("data.params.nu=-0.01", "data.params.nu"),
    ("data.params.nu=abc", "data.params.nu"),
    ("+data.params.beta=1", "data.params"),
    ("data.pde=heat", "data.pde"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.reduced_resolution=0", "data.reduced_resolution"),
    ("data.num_workers=-1", "data.num_workers"),
    ("model.dim=0", "model.dim"),
    ("model.n_tokens=-8", "model.n_tokens"),
    ("model.depth=0", "model.depth"),
    ("model.attn_backend=xformers", "model.attn_backend"),
    ("model.stem_kernel=4", "model.stem_kernel=4: expected an odd kernel size"),
    ("model.stem_layers=0", "model.stem_layers"),
    ("model.stem_channels=0", "model.stem_channels"),
    ("+data.stem_layers=0", "data.stem_layers"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.accumulate=0", "optim.accumulate"),
    ("optim.ema.decay=2", "optim.ema.decay"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.schedule=linear", "optim.schedule"),
    ("optim.name=sgd", "optim.name"),
    ("run_dir=", "run_dir"),
    ("seed=-1", "seed"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.strategy=bogus", "trainer.strategy"),
    ("trainer.precision=abc", "trainer.precision"),
    ("trainer.limit_val_batches=0", "trainer.limit_val_batches"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
    ("trainer.num_nodes=2", "trainer.num_nodes"),
    ("+trainer.max_epochs=3", "trainer.max_epochs is set by the project"),
    ("+trainer.bogus=1", "trainer.bogus"),
    ("+trainer.max_steps=-5", "trainer.max_steps"),
    ("optim.ema.enabled=2", "optim.ema.enabled"),
    ("trainer.num_threads=0", "trainer.num_threads"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
    ("~logger.target._target_", "logger.target has no _target_"),
    ("callbacks.progress_bar=fancy", "callbacks.progress_bar"),
    ("callbacks.checkpoint.save_top_k=0", "callbacks.checkpoint.save_top_k"),
    ("callbacks.early_stopping.patience=0", "callbacks.early_stopping.patience"),
    ("seed=abc", "seed"),
    ("stages.operator.lr=fast", "stages.operator.lr"),
    ("trainer.accelerator=gpu", "trainer.accelerator"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
    ("stage.run=[autoencoder,decoder]", "stage.run"),
]


@pytest.mark.parametrize("override,key", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_setting_is_one_paragraph_and_writes_nothing(smoke_data, tmp_path, override, key):
    if override.startswith("trainer.accelerator=gpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible here")
    extra = ["stage=operator"] if override.startswith("ckpt_path") else []
    cfg = smoke_cfg(smoke_data, f"run_dir={tmp_path / 'run'}", *extra, override)
    with pytest.raises(UserError) as err:
        run(cfg)
    text = str(err.value)
    assert key in text and "\n" not in text.strip()
    assert not (tmp_path / "run").exists()


def test_a_stage_that_never_validates_names_the_limit_not_the_learning_rate(smoke_data, tmp_path):
    """A validation interval past the run's end: the stage never validated, so it has no checkpoint;
    the error names the settings that caused it, not the learning rate."""
    cfg = smoke_cfg(smoke_data, f"run_dir={tmp_path / 'run'}", "stage=autoencoder", "model=dim8",
                    "stages.autoencoder.max_epochs=1", "trainer.val_every_n_steps=100000")
    with pytest.raises(UserError) as err:
        run(cfg)
    text = str(err.value)
    assert "never validated" in text and "trainer.val_every_n_steps" in text
    assert "Lower stages" not in text and "\n" not in text.strip()


def test_too_few_frames_for_initial_step_is_refused_before_training(smoke_data, tmp_path):
    cfg = smoke_cfg(smoke_data, f"run_dir={tmp_path / 'run'}", "data.initial_step=21")
    with pytest.raises(UserError, match=r"initial_step=21 needs at least 22"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_missing_default_data_file_is_generated(tmp_path):
    """The first run is one command: the data config's own file is made when absent."""
    cfg = smoke_cfg(tmp_path, f"run_dir={tmp_path / 'run'}", "stage=autoencoder", "model=dim8",
                    "stages.autoencoder.max_epochs=1")
    assert not Path(cfg.data.path).exists()
    assert "autoencoder" in run(cfg)
    assert Path(cfg.data.path).exists()


def test_a_missing_user_named_file_is_never_made_up(smoke_data, tmp_path):
    missing = tmp_path / "mine.hdf5"
    cfg = smoke_cfg(smoke_data, f"run_dir={tmp_path / 'run'}", f"data.path={missing}")
    with pytest.raises(UserError, match="no such file"):
        run(cfg, overrides=[f"data.path={missing}"])
    assert not missing.exists() and not (tmp_path / "run").exists()


def test_stage_operator_without_upstream_offers_stage_all_with_every_override(smoke_data, tmp_path):
    overrides = ["experiment=smoke", "model=dim8", f"data.root={smoke_data / 'data'}",
                 f"run_dir={tmp_path / 'run'}", "stages.operator.lr=2e-3", "stage=operator"]
    cfg = smoke_cfg(smoke_data, *overrides)
    with pytest.raises(UserError) as err:
        run(cfg, overrides=overrides)
    # every override kept, the run's directory last (where the run lies now), then stage=all
    kept = [o for o in overrides[:-1] if not o.startswith("run_dir=")]
    expected = "python -m ups_lightning.train " + " ".join(kept) + f" run_dir={tmp_path / 'run'} stage=all"
    assert expected in str(err.value)


EVAL_CASES = [
    ("guard.reencode=abc", "guard.reencode"),
    ("guard.invariants=maybe", "guard.invariants"),
    ("ensemble_members=0", "ensemble_members"),
    ("ensemble_members=-3", "ensemble_members"),
    ("batch_size=0", "batch_size"),
    ("correct_every=0", "correct_every"),
    ("n_show=-1", "n_show"),
    ("num_threads=0", "num_threads"),
    ("split=holdout", "split"),
    ("corrector=oracle", "corrector"),
    ("upto=autoencoder", "upto"),
    ("upto=everything", "upto"),
    ("ttc.n_candidates=0", "ttc.n_candidates"),
    ("ttc.beam_width=0", "ttc.beam_width"),
    ("ttc.horizon=-1", "ttc.horizon"),
    ("ttc.budget=0", "ttc.budget"),
    ("ttc.reward.weights.mass=-1", "ttc.reward.weights.mass"),
    ("ttc.reward.weights.bounds=-1", "ttc.reward.weights.bounds"),
    ("ttc.reward.weights.pde=nan", "ttc.reward.weights.pde"),
    ("+ttc.reward.weights.truth=1", "truth"),
    ("ttc.reward.name=truth", "ttc.reward.name"),
    ("ttc.reward.cells=2", "ttc.reward.cells"),
    ("ttc.candidates.perturb=-0.1", "ttc.candidates.perturb"),
    ("ttc.candidates.corrector=oracle", "ttc.candidates.corrector"),
    ("gates.delta=-0.1", "gates.delta"),
    ("gates.max_wallclock_ratio=nan", "gates.max_wallclock_ratio"),
    ("seed=xyz", "seed"),
    ("progress_bar=rich", "progress_bar"),
    ("+data.n_test=5", "data.n_test"),
]


@pytest.mark.parametrize("override,key", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_evaluation_setting_is_one_paragraph_and_writes_nothing(smoke_run, tmp_path, override, key):
    cfg, _ = smoke_run
    with pytest.raises(UserError) as err:
        evaluate(eval_cfg(Path(cfg.run_dir), tmp_path / "lb", override))
    text = str(err.value)
    assert key in text and "\n" not in text.strip()
    assert not (tmp_path / "lb").exists()


def test_evaluate_without_run_dir_is_a_clear_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from ups_lightning import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate")
    with pytest.raises(UserError, match="evaluate needs run_dir=DIR"):
        evaluate(cfg)


# --- through the real command line ---------------------------------------------------------------
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("module,args,needle", [
    ("ups_lightning.evaluate", [], "run_dir"),
    ("ups_lightning.evaluate", ["run_dir=missing-run", "guard.reencode=abc"], "guard.reencode"),
    ("ups_lightning.evaluate", ["run_dir=missing-run"], "no such directory"),
    ("ups_lightning.train", ["experiment=smoke", "stages.operator.max_epochs=-1"], "max_epochs"),
    ("ups_lightning.train", ["experiment=smoke", "trainer.accelerator=gpu"], "accelerator"),
])
def test_cli_exits_2_with_one_paragraph_and_leaves_nothing(tmp_path, module, args, needle):
    res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         cwd=tmp_path, env=ENV, timeout=120)
    if needle == "accelerator" and res.returncode == 0:
        pytest.skip("a GPU is visible here")
    assert res.returncode == 2, res.stderr[-1500:]
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []   # no run directory, no outputs/, no .hydra


def test_a_missing_sweeper_plugin_names_the_extra_that_installs_it(monkeypatch, capsys):
    import importlib.util

    from ups_lightning import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins") else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        train.check_plugins(["-m", "sweep=operator_optuna"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "hydra_plugins.hydra_optuna_sweeper" in err and "[sweeps]" in err and "Traceback" not in err
    train.check_plugins(["stage=operator"])           # nothing asked for a plugin: nothing said


def test_directories_that_cannot_be_written_are_refused_before_any_work(smoke_data, smoke_run, tmp_path):
    """A file in the way or a symlink loop: one paragraph naming the setting, before training starts
    or before an evaluation's rollout (not after it)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    for where, needle in ((blocker / "run", "is a file, not a directory"), (tmp_path / "loop-a" / "run", "symlink")):
        with pytest.raises(UserError, match=needle) as err:
            run(smoke_cfg(smoke_data, f"run_dir={where}"))
        assert str(err.value).startswith("run_dir=") and "\n" not in str(err.value).strip()
    cfg, _ = smoke_run
    ecfg = eval_cfg(Path(cfg.run_dir), tmp_path / "lb")
    ecfg.leaderboard = str(blocker / "lb.csv")
    with pytest.raises(UserError, match=r"^leaderboard=.*is a file, not a directory"):
        evaluate(ecfg)


def test_a_training_command_ends_saying_where_the_run_is_and_what_to_run_next():
    from ups_lightning.train import closing_summary

    recs = {"autoencoder": {"best_val_nrmse": 0.01, "trivial_metric": "val/nrmse_mean_field", "trivial_val_nrmse": 1.0,
                            "learned": True},
            "operator": {"best_val_nrmse": 0.5, "trivial_metric": "val/nrmse_persistence", "trivial_val_nrmse": 0.4,
                         "learned": False}}
    text = closing_summary("outputs/runs/x/dim8", recs)
    assert text.startswith("trained in outputs/runs/x/dim8:") and "DID NOT LEARN" in text
    assert text.splitlines()[-1].startswith("next: python -m ups_lightning.evaluate run_dir=outputs/runs/x/dim8")
    assert "stage=all" in closing_summary("r", {"autoencoder": recs["autoencoder"]})


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_is_one_paragraph_not_a_traceback(capsys, code):
    import errno
    import os

    from ups_lightning.errors import report_user_errors

    @report_user_errors
    def writes():
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/data/run/operator/last.ckpt")

    with pytest.raises(SystemExit) as exit_:
        writes()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "/data/run/operator/last.ckpt" in err and "rerun the same command" in err

    @report_user_errors
    def other_fault():
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")

    with pytest.raises(FileNotFoundError):    # not a disk fault: not dressed up as one
        other_fault()


def test_messages_name_the_console_script_a_user_started(monkeypatch):
    """An installed user who typed `ups-train ...` is told `ups-evaluate ...`, not `python -m ...`;
    from a checkout (`python -m`, make) the module form stays. The scripts are the package's own."""
    from importlib.metadata import entry_points

    from ups_lightning import errors
    from ups_lightning.train import closing_summary

    recs = {"operator": {"best_val_nrmse": 0.5, "trivial_metric": "val/nrmse_persistence", "trivial_val_nrmse": 0.9,
                         "learned": True}}
    monkeypatch.setattr(sys, "argv", ["/venv/bin/python -m", "x"])
    assert errors.command("ups_lightning.evaluate") == "python -m ups_lightning.evaluate"
    ours = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("ups_lightning")}
    if not ours:
        pytest.skip("the package is not installed here (no console-script metadata)")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/ups-train", "stage=all"])
    assert errors.command("ups_lightning.evaluate") == "ups-evaluate"
    assert errors.command("ups_lightning.bench") == "ups-bench"              # bench's script runs __main__
    assert closing_summary("r", recs).splitlines()[-1].startswith("next: ups-evaluate run_dir=r")
    assert errors.command("ups_lightning.not_a_command") == "python -m ups_lightning.not_a_command"


@pytest.mark.parametrize("argv, needle", [
    ([], "needs one experiment"),
    (["medium"], "is not a key=value override"),
    (["experiment=smoke"], "needs one experiment"),
    (["small", "experiment=eval_full"], "needs one experiment"),
    (["experiment=eval_small", "stages.operator.bogus=1"], "pipeline overrides"),
])
def test_the_pipeline_takes_key_value_overrides_and_refuses_the_rest(argv, needle, capsys, tmp_path, monkeypatch):
    from ups_lightning import pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "_step", lambda *a: pytest.fail("a step ran after a bad argument"))
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    # the shorthands and the key=value form mean the same
    assert pipeline.train_overrides(["small", "data=advection1d"]) == ["experiment=eval_small", "data=advection1d"]
    assert pipeline.train_overrides(["experiment=eval_full"]) == ["experiment=eval_full"]


def test_evaluation_and_the_search_draw_progress_bars_where_asked(capsys):
    """progress_bar=tqdm draws a bar over a mode's trajectories; auto off a terminal (pytest's captured
    stderr) and none draw nothing; the TTC rollout reports every step to its bar."""
    import torch

    from ups_lightning.evaluation import _batched
    from ups_lightning.progress import progress_bar

    u0 = torch.zeros(10, 4, 1)
    for mode, drawn in (("tqdm", True), ("auto", False), ("none", False)):
        out = _batched("operator rollout", lambda u: u * 2, u0, 4, bar=mode)
        assert out.shape == u0.shape
        err = capsys.readouterr().err
        assert ("operator rollout" in err and "/10" in err) is drawn, (mode, err)
    with pytest.raises(ValueError, match="progress bar mode"):
        progress_bar("x", 1, "traj", "rich")
