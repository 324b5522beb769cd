"""Different field counts in one model (issue 25): the masked channel layout of ``DataContract``.

A one-field equation (Burgers) and the two-field wave system of test_pde_interface share one model
of two channels: Burgers' second channel is absent, filled with the channel's mean on the way in,
left out of every loss and metric, and dropped on the way out.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from test_pde_interface import Wave1D, wave_registered  # noqa: F401  (the fixture)
from ups_lightning.data.contract import DataContract
from ups_lightning.eval.metrics import sample_nrmse


def test_contract_names_each_equations_fields(wave_registered):
    c = DataContract(("burgers1d", "wave1d"), (32,), 2, (1, 2))
    assert c.masked and c.channels("burgers1d") == 1 and c.channels("wave1d") == 2
    cond = torch.stack([c.conditioning("burgers1d", {"nu": 0.01}, 0.05), c.conditioning("wave1d", {"c": 1.0}, 0.05)])
    assert c.channel_mask(cond).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert DataContract.from_dict(c.to_dict()) == c
    same = DataContract(("burgers1d", "wave1d"), (32,), 2)        # every equation fills every channel
    assert not same.masked and "fields" not in same.to_dict() and same.fields == (2, 2)
    assert DataContract(("burgers1d",), (32,), 1).to_dict() == {"pdes": ["burgers1d"], "spatial_shape": [32],
                                                               "n_channels": 1}
    for bad in ((1, 1), (1, 3), (2,)):
        with pytest.raises(ValueError, match="fields="):
            DataContract(("burgers1d", "wave1d"), (32,), 2, bad)


def test_masked_figures_count_the_present_channels_alone():
    from ups_lightning.stages.base import masked_mse

    g = torch.Generator().manual_seed(0)
    true, pred = torch.randn(3, 16, 2, generator=g) + 2, torch.randn(3, 16, 2, generator=g) + 2
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    m = mask[:, None, :]
    want = [sample_nrmse(pred[i:i + 1, :, : int(mask[i].sum())], true[i:i + 1, :, : int(mask[i].sum())]).item()
            for i in range(3)]
    assert sample_nrmse(pred * m, true * m).tolist() == pytest.approx(want, rel=1e-6)
    other = true.clone()
    other[mask[:, None, :].expand_as(true) == 0] = 1e3           # whatever the absent channels hold
    assert masked_mse(pred, true, mask).item() == pytest.approx(masked_mse(pred, other, mask).item())
    assert masked_mse(pred, true, mask).item() == pytest.approx(((pred - true) ** 2)[m.expand_as(pred) > 0].mean().item())
    assert masked_mse(pred, true, None).item() == pytest.approx(torch.nn.functional.mse_loss(pred, true).item())


def _mixed_cfg(tmp_path):
    from hydra import compose, initialize_config_dir

    from ups_lightning import CONF_DIR
    from ups_lightning.data.generation import run as generate

    files = {}
    for pde, params in (("burgers1d", {"nu": 0.01}), ("wave1d", {"c": 1.0})):
        files[pde] = tmp_path / "data" / f"{pde}.hdf5"
        generate({"data": {"pde": pde, "params": params}, "out": str(files[pde]), "n_samples": 40, "nx": 32,
                  "nt": 9, "t_max": 0.4, "n_val": 8, "n_test": 8, "workers": 1, "progress": False})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", "model=dim8", "data=mixed_small",
                                          "data.initial_step=3", f"run_dir={tmp_path / 'run'}"])
    OmegaConf.set_struct(cfg, False)
    base = cfg.data.members.burgers1d
    members = {}
    for pde, params in (("burgers1d", {"nu": 0.01}), ("wave1d", {"c": 1.0})):
        m = OmegaConf.merge(base, {"name": pde, "pde": pde, "path": str(files[pde]), "nx": 32, "nt": 9,
                                   "t_max": 0.4, "n_train": 24, "n_val": 8, "n_test": 8, "initial_step": 3})
        m.params = params
        members[pde] = m
    cfg.data.members = members
    return cfg, files


def test_one_model_trains_and_scores_equations_with_different_field_counts(wave_registered, tmp_path):
    from conftest import eval_cfg
    from ups_lightning.data.datamodule import open_run_data
    from ups_lightning.data.pdebench import open_dataset
    from ups_lightning.evaluation import evaluate
    from ups_lightning.training import run as train

    cfg, files = _mixed_cfg(tmp_path)
    data = open_run_data(cfg.data)
    assert data.contract.fields == (1, 2) and data.contract.n_channels == 2
    wave = open_dataset(str(files["wave1d"]), n_train=24, n_val=8, n_test=8, pde="wave1d")
    # channel 1 is the wave's alone: its statistics; Burgers' rows hold that mean there
    assert data.normalizer.mean[1] == pytest.approx(wave.normalizer.mean[1])
    assert data.normalizer.std[1] == pytest.approx(wave.normalizer.std[1])
    rows = data.read("train")
    assert rows.shape[-1] == 2 and np.allclose(rows[:24, ..., 1], data.normalizer.mean[1])

    records = train(cfg)
    assert set(records) == {"autoencoder", "operator", "diffusion", "distill"}
    assert all(math.isfinite(records[s]["best_val_nrmse"]) for s in records)
    rows = evaluate(eval_cfg(tmp_path / "run", tmp_path, "ttc=off"))
    assert set(rows) == {"burgers1d", "wave1d"}
    for pde, row in rows.items():
        assert row["pde"] == pde and math.isfinite(row["nrmse"]) and row["persistence_nrmse"] > 0

    # the rollout of the one-field equation takes and gives one field
    from ups_lightning.evaluation import load_run
    from ups_lightning.inference.rollout import Surrogate

    _, _, module = load_run(tmp_path / "run", "operator")
    burgers = open_dataset(str(files["burgers1d"]), n_train=24, n_val=8, n_test=8, pde="burgers1d")
    cond = module.contract.conditioning("burgers1d", {"nu": 0.01}, burgers.meta.dt)
    sur = Surrogate(module, module.x.clone(), cond, fields=module.contract.channels("burgers1d"))
    u0 = torch.from_numpy(burgers.read("test")[:2, 2]).float()
    assert sur.decode(sur.step(sur.encode(u0))).shape == u0.shape == (2, 32, 1)
