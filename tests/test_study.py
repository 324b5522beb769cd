"""The capacity x TTC study (`python -m ups_lightning.study`): one command, choices on validation."""
from __future__ import annotations

import csv
import math

import pytest
from omegaconf import OmegaConf

from ups_lightning.config import compose_config
from ups_lightning.errors import UserError


def _cfg(tmp_path, smoke_data, **over):
    cfg = compose_config("study", ["protocol=smoke", "budget_min=0.08", "sizes=[dim8]", "seeds=[0,1]", "budgets=[2]",
                                   f"out_dir={tmp_path / 'study'}", "rewards=[physics,'consistency:16']",
                                   f"train_overrides=['data.root={smoke_data / 'data'}']"])
    return OmegaConf.merge(cfg, over)


@pytest.mark.slow   # trains two models end to end (about 25 s); the verdict and settings tests below are fast
def test_study_writes_table_and_plot_with_the_reward_chosen_on_validation(tmp_path, smoke_data):
    from ups_lightning.study import run_study

    out = run_study(_cfg(tmp_path, smoke_data))
    rows = out["rows"]
    plain = next(r for r in rows if r["method"] == "plain")
    ttc = next(r for r in rows if r["method"] == "ttc-2")
    assert plain["seeds"] == 2 and math.isfinite(plain["nrmse"]) and plain["nrmse_std"] >= 0
    assert ttc["params"] == 2 * plain["params"] and ttc["ms_per_traj"] > 0
    assert ttc["gain"] == pytest.approx(1 - ttc["nrmse"] / plain["nrmse"])
    assert ttc["cost_ratio"] == pytest.approx(ttc["ms_per_traj"] / plain["ms_per_traj"])
    # the reward is the one with the lowest validation nRMSE, never a test figure
    by = ttc["val_by_reward"]
    assert set(by) == {"physics", "consistency:16"} and ttc["reward"] == min(by, key=by.get)
    if ttc["reward"].startswith("consistency"):   # its solver alone sits beside it
        assert any(r["method"] == "solver" and r["size"] == "solver 16 cells" for r in rows)
    study = tmp_path / "study"
    with open(study / "study.csv") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} >= {"plain", "ttc-2"}
    md = (study / "study.md").read_text()
    assert "| dim8 | plain |" in md and "**Verdict:**" in md
    assert (study / "study.png").stat().st_size > 1000 and (study / "study.json").exists()


def test_the_verdict_compares_only_plain_sizes_that_learned():
    from ups_lightning.study import _verdict

    def plain(size, params, err, std, ms, learned):
        return {"size": size, "method": "plain", "budget": 1, "params": params, "nrmse": err, "nrmse_std": std,
                "ms_per_traj": ms, "seeds": 3, "learned": learned}

    small_ttc = {"size": "dim8", "method": "ttc-2", "budget": 2, "params": 20, "nrmse": 0.2, "nrmse_std": math.nan,
                 "ms_per_traj": 10.0}
    rows = [plain("dim8", 10, 0.4, 0.01, 5.0, 3), plain("dim64", 100, 0.5, 0.01, 20.0, 3), small_ttc]
    assert "dim8 ttc-2 (0.2000, 10.0 ms) beats dim64 plain" in _verdict(rows)
    rows[1]["learned"] = 1          # the large model did not learn: no claim, and the reader is told why
    v = _verdict(rows)
    assert "no smaller model with search beats" in v and "Not compared: dim64 plain" in v
    rows[1].update(learned=3, ms_per_traj=9.0)   # cheaper than the search: no claim at equal cost
    assert "no smaller model" in _verdict(rows)


@pytest.mark.parametrize("key,value,match", [
    ("budget_min", 0, "budget_min"),
    ("budgets", [3], r"budgets.*\[2, 2\]"),
    ("seeds", [0, 0], "seeds"),
    ("rewards", ["verifier"], "rewards"),
    ("sizes", [], "sizes"),
])
def test_bad_study_settings_are_one_error_naming_the_setting(tmp_path, smoke_data, key, value, match):
    from ups_lightning.study import check_config

    with pytest.raises(UserError, match=match):
        check_config(_cfg(tmp_path, smoke_data, **{key: value}))
    assert not (tmp_path / "study").exists()
