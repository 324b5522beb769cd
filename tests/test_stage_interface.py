"""Stages are specs (as equations are, tests/test_pde_interface.py): the registry is the only way
training, evaluation, the schema and the artifacts learn about a stage, the schema imports no torch,
and a fifth stage is one module plus one registry line."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import smoke_cfg

from ups_lightning.errors import UserError
from ups_lightning.stages import STAGE_ORDER, UPSTREAM, get_stage, register, unregister, with_role

SRC = Path(__file__).resolve().parents[1] / "src" / "ups_lightning"
GENERIC = ("training.py", "evaluation.py", "config.py", "artifacts.py")


def _strings(tree: ast.AST):
    """(line, text) of every string literal, f-strings' literal parts included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_training_evaluation_schema_and_artifacts_name_no_stage():
    pattern = re.compile(r"\b(%s)\b" % "|".join(map(re.escape, STAGE_ORDER)))
    hits = []
    for name in GENERIC:
        tree = ast.parse((SRC / name).read_text())
        hits += [f"{name}:{line}: {pattern.search(text).group(0)!r} in {text[:60]!r}"
                 for line, text in _strings(tree) if pattern.search(text)]
        # a stage's module is reached through the registry (get_stage), never imported by name
        hits += [f"{name}:{node.lineno}: imports {node.module}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ups_lightning.stages.")
                 and node.module.rsplit(".", 1)[-1] in STAGE_ORDER]
    assert hits == [], "name stages through ups_lightning.stages (STAGE_ORDER, UPSTREAM, with_role):\n" + "\n".join(hits)
    # the scan can fail: a stage name in a literal is found
    assert pattern.search(f"stage {STAGE_ORDER[1]}") and not pattern.search("model.diffusion_depth")


def test_the_schema_and_the_command_lines_import_neither_torch_nor_lightning():
    code = ("import sys, ups_lightning.config, ups_lightning.stages, ups_lightning.train, ups_lightning.evaluate; "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_registry_is_the_chain_and_each_stage_declares_what_it_is():
    assert UPSTREAM[STAGE_ORDER[0]] is None
    for up, name in zip(STAGE_ORDER, STAGE_ORDER[1:]):
        assert UPSTREAM[name] == up
    for name in STAGE_ORDER:
        cls = get_stage(name)
        assert cls.name == name and cls.trains and cls.Settings.__dataclass_fields__["lr"]
    assert len(with_role("encoder")) == 1 and len(with_role("stepper")) == 1
    assert {get_stage(n).corrector for n in with_role("corrector")} == {"teacher", "student"}
    with pytest.raises(ValueError, match="upstream"):
        register("orphan", "no_such_stage", "anywhere")
    with pytest.raises(ValueError, match="already registered"):
        register(STAGE_ORDER[0], None, "anywhere")
    with pytest.raises(KeyError, match="unknown stage"):
        get_stage("no_such_stage")


def test_each_stage_states_its_ranges_once_in_its_settings(smoke_data):
    from ups_lightning.config import validate_train_config

    for override, key in (("stages.operator.rollout_steps=0", "stages.operator.rollout_steps"),
                          ("stages.distill.student_steps=3", "stages.distill.student_steps"),
                          ("stages.autoencoder.optim.warmup_ratio=2", "stages.autoencoder.optim.warmup_ratio"),
                          ("stages.diffusion.optim.schedule=linear", "stages.diffusion.optim.schedule")):
        with pytest.raises(UserError, match=re.escape(key)):
            validate_train_config(smoke_cfg(smoke_data, override))


TOY = '''
"""A toy fifth stage: a small refiner of the frozen operator's latent step."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ups_lightning.stages.base import LatentStage, build_operator, freeze
from ups_lightning.stages.settings import StageSettings, setting


@dataclass
class Settings(StageSettings):
    width: int = setting(1)


class ToyStage(LatentStage):
    name, trains = "toy", ("refiner",)
    Settings = Settings
    own_prefixes = ("refiner.",)

    def __init__(self, model_cfg, optim_cfg, stages_cfg, data):
        super().__init__(model_cfg, optim_cfg, stages_cfg, data)
        self.save_hyperparameters()
        self.operator = freeze(build_operator(model_cfg, self.contract))
        dim, width = model_cfg["dim"], self.settings["width"]
        self.refiner = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))

    def forward(self, z, cond):
        with torch.no_grad():
            step = self.operator(z, cond)
        return step + self.refiner(step)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch["z"][:, 0], batch["cond"]), batch["z"][:, 1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        u = batch["u"]
        self.log_val_nrmse(self.decode_phys(self(batch["z"][:, 0], batch["cond"])), self.physical(u[:, 1]))
        self.log_persistence(u)


STAGE = ToyStage
'''


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """A fifth stage after the operator, registered from this test: one module, one registry line."""
    (tmp_path / "toy_stage.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    register("toy", with_role("stepper")[0], "toy_stage")
    try:
        yield "toy"
    finally:
        unregister("toy")
        sys.modules.pop("toy_stage", None)


def test_a_toy_stage_registered_in_a_test_trains_after_the_operator(smoke_run, smoke_data, tmp_path, toy_stage):
    from ups_lightning.config import validate_train_config
    from ups_lightning.evaluation import load_run
    from ups_lightning.training import run

    cfg0, records0 = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(cfg0.run_dir, run_dir)
    upto = STAGE_ORDER[: STAGE_ORDER.index(UPSTREAM[toy_stage]) + 1]
    cfg = smoke_cfg(smoke_data, f"stage.run=[{','.join(upto + [toy_stage])}]")
    up = cfg.stages[UPSTREAM[toy_stage]]
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.stages[toy_stage] = OmegaConf.create({"max_epochs": 1, "max_minutes": None, "batch_size": up.batch_size,
                                                  "lr": 1e-3, "optim": up.optim, "width": 8})
    bad = cfg.copy()
    bad.stages[toy_stage].width = 0     # its range, stated in its own Settings, is checked
    with pytest.raises(UserError, match=r"stages\.toy\.width"):
        validate_train_config(bad)

    records = run(cfg)
    assert list(records) == upto + [toy_stage]
    for name in upto:     # the finished upstream stages were skipped, not retrained
        assert records[name]["ckpt_sha256"] == records0[name]["ckpt_sha256"]
    rec = records[toy_stage]
    assert rec["upstream_sha256"] == records0[UPSTREAM[toy_stage]]["ckpt_sha256"]
    assert rec["learned"] in (True, False) and 0 < rec["best_val_nrmse"] < 10
    # the trust chain, loading and evaluation's checks treat it as any stage
    _, chain, module = load_run(run_dir, toy_stage)
    assert list(chain) == upto + [toy_stage] and type(module).__name__ == "ToyStage"
    # and the runs trained before it existed still read (their configs have no stages.toy)
    assert list(load_run(Path(cfg0.run_dir))[1]) == STAGE_ORDER[: STAGE_ORDER.index(toy_stage)]
