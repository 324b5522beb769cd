"""One PDE interface: equations are specs under `pdes/`, and nothing outside it names one.

The strongest check of the interface is a fourth equation added the documented way, from a test: a
2-channel linear wave system (exact solution by characteristics) is registered, generated, trained
through the smoke pipeline and evaluated, with no change anywhere else.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ups_lightning import pdes
from ups_lightning.data.contract import DataContract
from ups_lightning.errors import UserError
from ups_lightning.pdes import PDE, Parameter, get_pde

SRC = Path(__file__).resolve().parents[1] / "src" / "ups_lightning"

# an equation's name, parameter or constant: only pdes/ may say it
_EQUATION_WORDS = re.compile(r"(?i:burgers|advection|reac(?:tion)?[-_ ]?diff|cole[-_ ]?hopf)|\bnu\b|\bNu\b|"
                             r"\bbeta\b|\brho\b|\bRho\b|CANONICAL_CELLS|log10\(nu")


def test_nothing_outside_pdes_names_an_equation():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if "pdes" in path.relative_to(SRC).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _EQUATION_WORDS.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "equation-specific names outside pdes/:\n" + "\n".join(offenders)


def test_registry_knows_three_equations_and_refuses_others():
    assert {"burgers1d", "advection1d", "reacdiff1d"} <= set(pdes.registered())
    with pytest.raises(UserError, match="not a known equation"):
        get_pde("navier_stokes")


def test_conditioning_layout_single_and_mixed():
    single = DataContract(("burgers1d",), (256,), 1)
    assert single.cond_dim == 2     # [dt / 0.05, log10(nu / 0.001)]
    c = single.conditioning("burgers1d", {"nu": 0.01}, 0.05)
    assert torch.allclose(c, torch.tensor([1.0, 1.0]))
    mixed = DataContract(("burgers1d", "advection1d", "reacdiff1d"), (256,), 1)
    assert mixed.cond_dim == 1 + 3 + 1 + 1 + 2
    c = mixed.conditioning("reacdiff1d", {"nu": 0.5, "rho": 1.0}, 0.025)
    assert c.tolist() == pytest.approx([0.5, 0, 0, 1, 0, 0, 0.0, 0.0])
    with pytest.raises(UserError, match="trained on burgers1d"):
        single.conditioning("advection1d", {"beta": 0.1}, 0.05)


def test_file_of_another_equation_is_refused(tmp_path):
    from ups_lightning.data.pdebench import PDEBenchFile

    path = tmp_path / "f.hdf5"
    with h5py.File(path, "w") as h5:
        h5["tensor"] = np.zeros((2, 3, 8), np.float32)
        h5["x-coordinate"] = (np.arange(8) + 0.5) / 8
        h5["t-coordinate"] = np.arange(3) * 0.1
        h5.attrs["beta"] = 0.1
    with pytest.raises(UserError, match="beta of advection1d"):
        PDEBenchFile(path, pde="burgers1d")
    with PDEBenchFile(path) as f:      # no equation named: the file says
        assert f.pde == "advection1d" and f.meta.params == {"beta": pytest.approx(0.1)}
    named = tmp_path / "ReacDiff_Nu0.5_Rho1.0.hdf5"
    path.rename(named)
    with h5py.File(named, "r+") as h5:
        del h5.attrs["beta"]
    with pytest.raises(UserError, match="reacdiff1d file name"):
        PDEBenchFile(named, pde="advection1d")
    with PDEBenchFile(named, pde="reacdiff1d") as f:   # released files carry parameters in the name
        assert f.meta.params == {"nu": 0.5, "rho": 1.0}


# --- a fourth equation, added from outside ---------------------------------------------------------
class Wave1D(PDE):
    """u_t + c v_x = 0, v_t + c u_x = 0: the Riemann invariants u +- v move at +-c (exact)."""

    name = "wave1d"
    title = "1D linear wave system (test equation)"
    equation = "u_t + c v_x = 0, v_t + c u_x = 0, periodic"
    fields = ("u", "v")
    params = (Parameter("c", ("c",), "c", 1.0, ref=1.0, feature="linear", doc="the wave speed"),)
    filename = "Wave1D_c{c}.hdf5"
    penalties = ("mass", "energy", "pde")
    invariants = ("mass",)
    solver_settings = {"scheme": "exact: Riemann invariants shifted in Fourier space"}
    recipe_id = "test-sines/1"

    def initial_conditions(self, seeds, nx):
        x = (np.arange(nx) + 0.5) / nx
        out = []
        for seed in np.asarray(seeds).reshape(-1):
            rng = np.random.default_rng(int(seed))
            k, a, p = rng.integers(1, 3, 2), rng.uniform(0.3, 1.0, 2), rng.uniform(0, 2 * np.pi, 2)
            # constant offsets: a field that vanishes at some frame would make its nRMSE undefined
            out.append(np.stack([1.0 + a[0] * np.sin(2 * np.pi * k[0] * x + p[0]),
                                 0.5 + a[1] * np.cos(2 * np.pi * k[1] * x + p[1])], -1))
        return np.asarray(out)

    def solve(self, u0, params, t_save, domain_length=1.0):
        u0 = np.asarray(u0, dtype=np.float64)
        nx, c = u0.shape[1], float(params["c"])
        k = 2 * np.pi * np.fft.fftfreq(nx, d=domain_length / nx)
        wp, wm = np.fft.fft(u0[..., 0] + u0[..., 1]), np.fft.fft(u0[..., 0] - u0[..., 1])
        frames = []
        for t in np.asarray(t_save, dtype=np.float64):
            p = np.fft.ifft(wp * np.exp(-1j * k * c * t)).real
            m = np.fft.ifft(wm * np.exp(1j * k * c * t)).real
            frames.append(np.stack([(p + m) / 2, (p - m) / 2], -1))
        return np.stack(frames, 1)

    def spatial_operator(self, u, params, dx):
        d = (torch.roll(u, -1, -1) - torch.roll(u, 1, -1)) / (2 * dx)
        return -float(params["c"]) * torch.stack([d[:, 1], d[:, 0]], 1)


@pytest.fixture
def wave_registered(monkeypatch):
    specs = pdes.registered()
    monkeypatch.setattr(pdes, "_REGISTRY", {**specs, "wave1d": Wave1D()})
    return pdes.get_pde("wave1d")


def test_wave_spec_is_exact_and_its_rewards_rank_the_truth(wave_registered):
    spec = wave_registered
    u0 = spec.initial_conditions([1, 2], 64)
    sol = spec.solve(u0, {"c": 1.0}, [0.0, 0.25, 1.0])
    assert np.allclose(sol[:, 0], u0) and np.allclose(sol[:, 2], u0, atol=1e-10)   # one period
    prev, true = torch.from_numpy(sol[:, 0]).float(), torch.from_numpy(sol[:, 1]).float()
    wrong = true + 0.1 * torch.randn(true.shape, generator=torch.Generator().manual_seed(0))
    s_true = spec.score(prev, true, {"c": 1.0}, dx=1 / 64, dt=0.25)
    s_wrong = spec.score(prev, wrong, {"c": 1.0}, dx=1 / 64, dt=0.25)
    assert (s_true > s_wrong).all()


def test_a_fourth_two_channel_equation_runs_end_to_end(wave_registered, tmp_path):
    """Generate (single-file mode), train every smoke stage, evaluate: 2 channels throughout."""
    from conftest import eval_cfg, smoke_cfg
    from ups_lightning.data.generation import run as generate
    from ups_lightning.evaluation import evaluate
    from ups_lightning.training import run as train

    path = tmp_path / "data" / "Wave1D_c1.0.hdf5"
    generate({"data": {"pde": "wave1d", "params": {"c": 1.0}}, "out": str(path), "n_samples": 40,
              "nx": 32, "nt": 9, "t_max": 0.4, "n_val": 8, "n_test": 8, "workers": 1, "progress": False})
    with h5py.File(path, "r") as h5:
        assert h5["tensor"].shape == (40, 9, 32, 2)
        assert h5.attrs["pde"] == "wave1d" and h5.attrs["c"] == 1.0
    cfg = smoke_cfg(tmp_path, "model=dim8", "data.pde=wave1d", f"data.path={path}", "~data.params",
                    "+data.params.c=1.0", "data.n_train=24", "data.n_val=8", "data.n_test=8",
                    "data.initial_step=3", "data.nx=32", "data.nt=9")
    records = train(cfg)
    assert set(records) == {"autoencoder", "operator", "diffusion", "distill"}
    row = evaluate(eval_cfg(tmp_path / "run", tmp_path, "ttc=default", "ttc.n_candidates=2", "corrector_rows=true"))
    assert row["pde"] == "wave1d" and math.isfinite(row["nrmse"])
    assert row["persistence_nrmse"] > 0 and row["solver_nrmse"] < 1e-5   # the exact solver


def test_mixed_data_is_checked(tmp_path):
    """A mixed config lists members on one grid; otherwise a one-paragraph error names the setting."""
    from omegaconf import OmegaConf

    from ups_lightning.config import validate_train_config
    from ups_lightning.data.datamodule import open_run_data
    from hydra import compose, initialize_config_dir

    from ups_lightning import CONF_DIR
    from ups_lightning.data.generation import write_dataset

    def mixed(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=["data=mixed_small", f"run_dir={tmp_path / 'run'}", *overrides])

    cfg = mixed()
    OmegaConf.set_struct(cfg, False)
    cfg.data.members = None
    with pytest.raises(UserError, match="lists no members"):
        validate_train_config(cfg)
    paths = {}
    for pde, params, nx in (("burgers1d", {"nu": 0.01}, 32), ("advection1d", {"beta": 0.1}, 16)):
        paths[pde] = tmp_path / f"{pde}.hdf5"
        write_dataset(paths[pde], pde=pde, params=params, nx=nx, nt=6, t_max=0.5, seed=0, n_train=4,
                      n_val=2, n_test=2, workers=1, progress=False, quiet=True)
    cfg = validate_train_config(mixed("data.initial_step=2",
                                          *[f"data.members.{p}.{k}={v}" for p in paths for k, v in
                                            (("path", paths[p]), ("n_train", 4), ("n_val", 2), ("n_test", 2))]))
    members = {p: cfg.data.members[p] for p in paths}
    cfg.data.members = members
    with pytest.raises(UserError, match="one model\\s+needs one grid"):
        open_run_data(cfg.data)
