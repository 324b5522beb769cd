"""One source of defaults: the YAML under conf/. Every option of every config group composes and
passes the schema (which holds types only), and every top-level config composes."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ups_lightning import CONF_DIR
from ups_lightning.config import validate_eval_config, validate_train_config
from ups_lightning.stages import STAGE_ORDER
from ups_lightning.errors import UserError

TRAIN_GROUPS = ("data", "model", "stage", "stages", "optim", "trainer", "logger", "callbacks", "experiment")


def _options(group: str) -> list:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(name: str, overrides: list):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in TRAIN_GROUPS for o in _options(g)])
def test_every_training_option_composes_and_validates(group, option):
    cfg = validate_train_config(_compose("train", [f"{group}={option}"]))
    assert not OmegaConf.missing_keys(cfg) or cfg.data.pde == "mixed"
    assert cfg.run_dir and set(cfg.stage.run) <= set(STAGE_ORDER)


@pytest.mark.parametrize("option", _options("ttc"))
def test_every_evaluation_option_composes_and_validates(option):
    cfg = validate_eval_config(_compose("evaluate", ["run_dir=some/run", f"ttc={option}"]))
    assert not OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("name", ["generate", "bench", "ttc_headroom", "proxy", "throughput", "study", "transfer"])
def test_other_top_level_configs_compose(name):
    overrides = ["run_dir=some/run"] if name == "ttc_headroom" else []
    assert _compose(name, overrides) is not None


def test_schema_has_no_defaults_of_its_own():
    """A key that no YAML sets is an error naming it, not a silent schema default."""
    cfg = _compose("train", [])
    OmegaConf.set_struct(cfg, False)
    del cfg.stages.operator["lr"]
    with pytest.raises(UserError, match="stages.operator.lr"):
        validate_train_config(cfg)


def test_stage_defaults_come_from_the_yaml():
    cfg = validate_train_config(_compose("train", []))
    stages = OmegaConf.load(CONF_DIR / "stages" / "default.yaml")
    for name in STAGE_ORDER:
        assert OmegaConf.to_container(cfg.stages[name]) == OmegaConf.to_container(stages[name])


def test_callbacks_and_loggers_are_built_from_config(tmp_path):
    """No if-chain: every callback with a _target_ is instantiated, null switches one off, and the
    logger is the option's `target`."""
    from ups_lightning.training import build_trainer

    names = lambda t: [type(c).__name__ for c in t.callbacks]   # noqa: E731
    cfg = validate_train_config(_compose("train", ["logger=tensorboard"]))
    trainer = build_trainer(cfg, "operator", tmp_path)
    assert {"EarlyStopping", "LearningRateMonitor", "ModelCheckpoint"} <= set(names(trainer))
    assert [type(lg).__name__ for lg in trainer.loggers] == ["TensorBoardLogger"]
    off = validate_train_config(_compose("train", ["callbacks.early_stopping=null", "callbacks.progress_bar=none"]))
    assert "EarlyStopping" not in names(build_trainer(off, "operator", tmp_path))
    with pytest.raises(UserError, match="callbacks.lr_monitor has no _target_"):
        validate_train_config(_compose("train", ["~callbacks.lr_monitor._target_"]))


# the model settings every dimN alias had as its own file before there was one model config: the
# resolved model config (what the stage config hashes read) must stay exactly this
_DIM32 = {"name": "dim32", "dim": 32, "n_tokens": 32, "depth": 4, "levels": 1, "ae_depth": 2, "decoder_depth": 1,
          "n_fourier": 64, "diffusion_depth": 3, "attn_backend": "sdpa", "hidden": None, "heads": None,
          "stem_layers": 2, "stem_kernel": 5, "stem_channels": None}


@pytest.mark.parametrize("size", [8, 16, 24, 32, 48, 64, 128, 256, 512])
def test_every_size_alias_is_the_one_model_config_at_its_dim(size):
    alias = OmegaConf.to_container(_compose("train", [f"model=dim{size}"]).model, resolve=True)
    knob = OmegaConf.to_container(_compose("train", ["model=default", f"model.dim={size}"]).model, resolve=True)
    assert alias == knob == {**_DIM32, "name": f"dim{size}", "dim": size}


def test_a_size_without_an_alias_is_named_by_its_dim():
    from ups_lightning.config import model_overrides

    assert model_overrides("dim64") == ["model=dim64"]
    assert model_overrides("dim40") == ["model=default", "model.dim=40"]
    cfg = validate_train_config(_compose("train", model_overrides("dim40")))
    assert cfg.model.name == "dim40" and cfg.model.dim == 40 and cfg.run_dir.endswith("/dim40")


def test_each_stage_is_its_own_wandb_run_in_a_directory_that_stays(tmp_path):
    """W&B: one run per stage (<run>/<stage>, grouped by the run), kept under <run_dir>/wandb (the
    attempt directory moves when the stage finishes), and ended with its stage."""
    import types

    pytest.importorskip("wandb")
    from ups_lightning.training import build_trainer, finish_loggers

    cfg = validate_train_config(_compose("train", ["logger=wandb", f"run_dir={tmp_path / 'run'}"]))
    trainer = build_trainer(cfg, "operator", tmp_path / "run" / ".attempts" / "operator-x")
    (lg,) = trainer.loggers
    init = lg._wandb_init
    assert type(lg).__name__ == "WandbLogger" and init["name"].endswith("/operator") and init["job_type"] == "operator"
    assert init["group"] == cfg.run_name and Path(init["dir"]) == tmp_path / "run" / "wandb"
    finished = []
    fake = types.SimpleNamespace(loggers=[types.SimpleNamespace(_experiment=types.SimpleNamespace(
        finish=lambda: finished.append(1))), types.SimpleNamespace(_experiment=None)])
    finish_loggers(fake)
    assert finished == [1]


def test_lightning_trainer_arguments_pass_through_and_count_in_the_stage_hash():
    from ups_lightning.artifacts import stage_config_hash

    plain = validate_train_config(_compose("train", []))
    extra = validate_train_config(_compose("train", ["+trainer.max_steps=3", "+trainer.profiler=simple"]))
    assert OmegaConf.to_container(extra.trainer.extra) == {"max_steps": 3, "profiler": "simple"}
    assert "max_steps" not in extra.trainer and OmegaConf.to_container(plain.trainer.extra) == {}
    # a stage trained with other Lightning arguments is another stage; none keeps the old hashes
    assert stage_config_hash(plain, "autoencoder", None) != stage_config_hash(extra, "autoencoder", None)
    old = OmegaConf.create(OmegaConf.to_container(plain))     # a record made before trainer.extra existed
    del old.trainer["extra"]
    assert stage_config_hash(old, "autoencoder", None) == stage_config_hash(plain, "autoencoder", None)


def test_a_passed_through_trainer_argument_reaches_the_trainer(tmp_path):
    from ups_lightning.training import build_trainer

    cfg = validate_train_config(_compose("train", ["+trainer.max_steps=7", f"run_dir={tmp_path}"]))
    assert build_trainer(cfg, "operator", tmp_path / "t").max_steps == 7


def _driver_schemas():
    from ups_lightning.bench.throughput import ThroughputSettings
    from ups_lightning.bench.ttc_headroom import HeadroomSettings
    from ups_lightning.proxy import ProxySettings
    from ups_lightning.study import StudySettings

    return [("proxy", ProxySettings, []), ("study", StudySettings, []),
            ("ttc_headroom", HeadroomSettings, ["run_dir=some/run"]), ("throughput", ThroughputSettings, [])]


def test_the_drivers_declare_their_settings_in_one_schema_each():
    """proxy, study, ttc_headroom and throughput check their settings with the schema machinery training uses
    (ups_lightning.schema): the shipped YAML validates, a typo, a wrong type or a number out of
    range is "<driver> setting key=value: ..."."""
    from ups_lightning.schema import validate

    for name, cls, base in _driver_schemas():
        assert not OmegaConf.missing_keys(validate(_compose(name, base), cls, name, f"conf/{name}.yaml"))
        typed = {"ttc_headroom": ("seed=abc", "seed"), "throughput": ("steps=abc", "steps")}.get(name, ("out_dir=[1]", "out_dir"))
        for bad, key in (("+bogus=1", "bogus"), typed):
            with pytest.raises(UserError, match=rf"{name} setting {key}="):
                validate(_compose(name, base + [bad]), cls, name, f"conf/{name}.yaml")
    cls = dict((n, c) for n, c, _ in _driver_schemas())["ttc_headroom"]
    with pytest.raises(UserError, match=r"ttc_headroom setting n_candidates=1 is out of range"):
        validate(_compose("ttc_headroom", ["run_dir=r", "n_candidates=1"]), cls, "ttc_headroom", "x")
    with pytest.raises(UserError, match=r"ttc_headroom setting split='all': expected 'train', 'val' or 'test'"):
        validate(_compose("ttc_headroom", ["run_dir=r", "split=all"]), cls, "ttc_headroom", "x")
