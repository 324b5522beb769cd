"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_burgers_file(tmp_path_factory) -> Path:
    """A small generated 1D Burgers file with its manifest: 24 trajectories (16 train / 4 val /
    4 test), 64 cells x 21 frames, t in [0, 2], nu = 0.001, domain (0, 1). About a second."""
    from ups_lightning.data.generate import write_dataset

    path = tmp_path_factory.mktemp("tiny_burgers") / "1D_Burgers_Sols_Nu0.001.hdf5"
    write_dataset(path, nu=0.001, nx=64, nt=21, t_max=2.0, seed=0, n_train=16, n_val=4,
                  n_test=4, workers=1, progress=False, quiet=True)
    return path
