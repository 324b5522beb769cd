"""provenance.json, the one file every driver writes beside its tables: what ran, on which commit,
and how many times each split was scored, counted where the scoring happens."""
from __future__ import annotations

import json
import sys

from omegaconf import OmegaConf

from ups_lightning import provenance as P


def test_provenance_names_the_command_commit_settings_and_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["/opt/venv/bin/python3.11", "-m", "ups_lightning.bench", "budget_min=40",
                                           "+given.fno={recipe: pdebench, lr: 0.00316}"], raising=False)
    P.reset_scored()
    P.scored("val", 2)
    P.scored("test")
    P.scored("test", 3)
    path = P.write_provenance(tmp_path / "out", "bench", OmegaConf.create({"a": 1, "b": "${a}"}), seeds=[0, 1],
                              seconds=12)
    rec = json.loads(path.read_text())
    assert path.name == "provenance.json" and rec["driver"] == "bench" and rec["seconds"] == 12
    assert rec["command"] == "python -m ups_lightning.bench budget_min=40 '+given.fno={recipe: pdebench, lr: 0.00316}'"
    assert rec["splits_scored"] == {"val": 2, "test": 4} and rec["test_scored"] == 4
    assert rec["settings"] == {"a": 1, "b": 1} and rec["seeds"] == [0, 1]      # resolved
    assert rec["git_commit"] and rec["package_version"]
    assert not list((tmp_path / "out").glob("*.tmp*"))                          # written atomically
    P.reset_scored()
    assert P.splits_scored() == {}
