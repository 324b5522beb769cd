"""The capacity x TTC study (`python -m ups_lightning.study`): one command, choices on validation, every
search beside its members without search, and the verdict's and claims' rules on known answers."""
from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ups_lightning.config import compose_config
from ups_lightning.errors import UserError


def _cfg(tmp_path, smoke_data, **over):
    cfg = compose_config("study", ["protocol=smoke", "epochs.autoencoder=1", "epochs.operator=3", "sizes=[dim8]",
                                   "seeds=[0,1]", "budgets=[2]", f"out_dir={tmp_path / 'study'}",
                                   "rewards=[physics,'consistency:16']",
                                   f"train_overrides=['data.root={smoke_data / 'data'}','trainer.compile=false']"])
    return OmegaConf.merge(cfg, over)


@pytest.mark.slow   # trains two models end to end (about 25 s); the rules and settings tests below are fast
def test_study_writes_every_row_with_its_costs_and_choices_made_on_validation(tmp_path, smoke_data):
    from ups_lightning.study import run_study

    out = run_study(_cfg(tmp_path, smoke_data))
    rows = out["rows"]

    def row(method, members=""):   # members: "" or "<kind>-<budget>"
        return next(r for r in rows if r["method"] == method and
                    (f"{r['members']}-{r['budget']}" if r["members"] else "") == members)

    plain, hybrid = row("plain"), row("solver_hybrid")
    assert plain["groups"] == 2 and math.isfinite(plain["nrmse"]) and plain["nrmse_std"] >= 0
    trained = out["trained"]["dim8"]
    assert all(t["epochs"] == {"autoencoder": 1, "operator": 3} for t in trained)   # equal epochs, no clock
    for kind in ("seeds-2", "snapshots-2"):
        ttc = row("ttc", kind)
        # the same members without search stand beside every search
        assert row("candidates_mean", kind)["params_held"] == ttc["params_held"]
        assert row("members_mean", kind)["train_s"] == pytest.approx(ttc["train_s"])
        by = ttc["val_by_reward"]   # the reward is the lowest validation figure, never a test one
        assert set(by) == {"physics", "consistency:16"} and ttc["reward"] == min(by, key=by.get)
        assert math.isfinite(ttc["val_oracle"]) and ttc["ms_per_traj"] > 0
    seeds, snaps = row("ttc", "seeds-2"), row("ttc", "snapshots-2")
    assert seeds["params_held"] == 2 * plain["params_held"]          # two whole pipelines
    assert snaps["params_held"] < seeds["params_held"]               # one autoencoder, two operators
    assert snaps["train_s"] == pytest.approx(plain["train_s"])       # one training run
    assert seeds["train_s"] == pytest.approx(2 * plain["train_s"], rel=1e-6)   # both seeds' training
    assert snaps["groups"] == 2 and seeds["groups"] == 1              # each seed's run; the one pair
    assert hybrid["weight"] in (0.25, 0.5, 1.0) and set(hybrid["val_by_weight"]) == {"0.25", "0.5", "1.0"}
    assert any(r["method"] == "solver" and r["size"] == "solver 16 cells" for r in rows)
    study = tmp_path / "study"
    with open(study / "study.csv") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} >= {"plain", "ttc", "candidates_mean", "members_mean",
                                                           "solver_hybrid", "solver"}
    md = (study / "study.md").read_text()
    assert "| dim8 | plain |" in md and "**Verdict:**" in md and "| claim | measured | holds |" in md
    assert (study / "study.png").stat().st_size > 1000 and (study / "study.json").exists()
    # provenance.json counts the scorings where they happen: test once per row and member group
    prov = json.loads((study / "provenance.json").read_text())
    assert prov["driver"] == "study" and prov["seeds"] == list(_cfg(tmp_path, smoke_data).seeds)
    assert prov["test_scored"] == sum(r["groups"] for r in rows) and prov["splits_scored"]["val"] > 0
    # the same one-run members in a single evaluation: the run's operator and its latest snapshot
    from conftest import eval_cfg
    from ups_lightning.evaluation import evaluate

    run_dir = trained[0]["run_dir"]
    ev = evaluate(eval_cfg(run_dir, tmp_path, "ttc=ensemble", "ttc.n_candidates=2", "ttc.candidates.snapshots=1",
                           "baselines.enabled=false"))
    assert ev["method"] == "ttc" and ev["ttc_member_params"] > 0
    assert ev["ttc_member_params"] < plain["params_held"]          # one more operator, no autoencoder
    assert ev["ttc_train_s_total"] == pytest.approx(trained[0]["train_s"], abs=0.2)   # one training run


# --- the rules, on rows with known answers ----------------------------------------------------------
def _r(size, method, err, std=0.0, ms=10.0, params=100, members="", budget=1, learned=True, single=None):
    return {"size": size, "method": method, "nrmse": err, "nrmse_std": std, "ms_per_traj": ms, "params_held": params,
            "members": members, "budget": budget, "learned": learned, "groups_learned": 3 if learned else 0,
            "groups": 3, "train_s": 1.0,
            "single_params": params if single is None else single}


def _size_rows(size, params, plain, ttc, cmean, mmean, hybrid, std=0.01, ms=10.0, learned=True):
    kw = dict(members="seeds", budget=2, params=2 * params, single=params, learned=learned)
    return [_r(size, "plain", plain, std, ms, params, learned=learned, single=params),
            _r(size, "ttc", ttc, std, 2.2 * ms, **kw), _r(size, "candidates_mean", cmean, std, 2 * ms, **kw),
            _r(size, "members_mean", mmean, std, 2 * ms, **kw),
            _r(size, "solver_hybrid", hybrid, std, ms, params, single=params)]


SOLVER = _r("solver 32 cells", "solver", 0.5, params=0)


def test_a_search_that_only_matches_its_members_mean_is_not_credited():
    from ups_lightning.study import beyond_baselines, credited

    rows = _size_rows("dim8", 100, plain=0.40, ttc=0.30, cmean=0.305, mmean=0.35, hybrid=0.45) + [SOLVER]
    ttc = rows[1]
    assert not credited(rows, ttc)        # within the error bars of the step mean: no credit
    rows[2]["nrmse"] = 0.36
    assert credited(rows, ttc)            # beats every rival by more than the error bars
    assert beyond_baselines(rows, ttc) == pytest.approx(0.05)   # below every baseline, the hybrid too
    rows[4]["nrmse"] = 0.29               # the solver hybrid is better: still credited over its members,
    assert credited(rows, ttc)            # but its gain beyond every baseline is negative
    assert beyond_baselines(rows, ttc) == pytest.approx(-0.01)
    rows[4]["nrmse"] = 0.45
    rows[-1]["nrmse"] = 0.2               # the solver alone is better: no credit
    assert not credited(rows, ttc)
    rows[-1]["nrmse"] = 0.5
    ttc["learned"] = False                # its members did not learn: never credited
    assert not credited(rows, ttc)


def test_the_verdict_compares_only_rows_that_learned_at_no_more_inference_cost():
    from ups_lightning.study import verdict

    small = _size_rows("dim8", 100, plain=0.40, ttc=0.20, cmean=0.36, mmean=0.36, hybrid=0.45, ms=5.0)
    large = _size_rows("dim64", 1000, plain=0.30, ttc=0.25, cmean=0.28, mmean=0.28, hybrid=0.45, ms=20.0)
    rows = small + large + [SOLVER]
    assert "dim8 seeds-2 search (0.2000 ± 0.0100, 11.0 ms) beats dim64 plain" in verdict(rows)
    for r in large:
        r["learned"] = False              # the large model did not learn: no claim, and the reader is told why
    v = verdict(rows)
    assert "No smaller model" in v and "Not compared (no seed learned): dim64" in v
    for r in large:
        r["learned"] = True
    large[0]["ms_per_traj"] = 9.0         # cheaper than the search: no claim at equal cost
    assert "No smaller model" in verdict(rows)


def test_the_claims_table_says_yes_no_or_not_testable_from_the_figures():
    from ups_lightning.study import claims

    d16 = _size_rows("dim16", 100, plain=0.50, ttc=0.30, cmean=0.45, mmean=0.45, hybrid=0.6, ms=5.0)
    d32 = _size_rows("dim32", 400, plain=0.40, ttc=0.28, cmean=0.38, mmean=0.38, hybrid=0.6, ms=8.0)
    d64 = _size_rows("dim64", 1600, plain=0.30, ttc=0.27, cmean=0.29, mmean=0.29, hybrid=0.6, ms=20.0)
    got = {c["claim"].split(" (")[0]: c["holds"] for c in claims(d16 + d32 + d64 + [SOLVER])}
    assert got["a 32-dim model with TTC beats a 64-dim model without it"] is False   # 0.28 +- .01 vs 0.30 +- .01
    assert got["smaller models gain more from TTC than larger ones"] is True         # 30%, 25%, 7% beyond rivals
    assert got["capacity gains disappear once TTC is on"] is True                    # 0.40 -> 0.30; 0.28 -> 0.27
    assert got["TTC lets a model 4x smaller match a larger one at lower inference cost"] is True   # dim16 at 11 ms
    for r in d64:
        r["learned"] = False
    got = {c["claim"].split(" (")[0]: c["holds"] for c in claims(d16 + d32 + d64 + [SOLVER])}
    assert got["a 32-dim model with TTC beats a 64-dim model without it"] is None    # no learned comparator
    assert got["capacity gains disappear once TTC is on"] is None


# --- snapshots: the one-run members -----------------------------------------------------------------
def test_operator_snapshots_are_saved_from_the_evaluated_weights_and_checked_when_loaded(tmp_path):
    from ups_lightning.artifacts import load_snapshots
    from ups_lightning.stages.callbacks import Snapshots

    net = torch.nn.Linear(3, 2)
    module = SimpleNamespace(operator=net)
    trainer = SimpleNamespace(current_epoch=0, is_global_zero=True, callbacks=[])
    cb = Snapshots(2, "operator", tmp_path / "operator" / "snapshots")
    for epoch in range(4):
        trainer.current_epoch = epoch
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        cb.on_train_epoch_end(trainer, module)
    files = sorted(p.name for p in (tmp_path / "operator" / "snapshots").iterdir())
    assert files == ["epoch002.pt", "epoch004.pt"]          # every 2 finished epochs
    from ups_lightning.artifacts import sha256_file

    folder = tmp_path / "operator" / "snapshots"
    record = {"snapshots": {f: sha256_file(folder / f) for f in files}}
    states = load_snapshots(tmp_path, "operator", record)
    assert sorted(states) == [2, 4] and float(states[2]["weight"][0, 0]) == 1.0 and float(states[4]["weight"][0, 0]) == 3.0
    assert load_snapshots(tmp_path, "operator", {}) == {}   # a stage trained without snapshots
    torch.save({"weight": torch.zeros(2, 3)}, folder / "epoch002.pt")   # changed after training
    with pytest.raises(UserError, match="epoch002.pt is missing or does not match its record"):
        load_snapshots(tmp_path, "operator", record)
    with pytest.raises(ValueError):
        Snapshots(0, "operator", tmp_path)


@pytest.mark.parametrize("key,value,match", [
    ("epochs", {"autoencoder": 0, "operator": 3}, "epochs.autoencoder"),
    ("budgets", [3], r"budgets.*\[2, 2\]"),
    ("seeds", [0, 0], "seeds"),
    ("seeds", [0], "seeds"),
    ("members", ["dropout"], "members"),
    ("rewards", ["verifier"], "rewards"),
    ("rewards", ["physics"], "consistency"),
    ("hybrid_weights", [2.0], "hybrid_weights"),
    ("sizes", [], "sizes"),
    ("sizes", ["dim8", "bogus"], r"sizes.*'bogus'"),     # every size at the start, not when the sweep reaches it
    ("sizes", ["dim8", "dim0"], r"sizes.*'dim0'"),
    ("report_only", "yes", "report_only"),
])
def test_bad_study_settings_are_one_error_naming_the_setting(tmp_path, smoke_data, key, value, match):
    from ups_lightning.study import check_config

    with pytest.raises(UserError, match=match):
        check_config(_cfg(tmp_path, smoke_data, **{key: value}))
    assert not (tmp_path / "study").exists()


def test_snapshot_members_need_enough_operator_epochs(tmp_path, smoke_data):
    from ups_lightning.study import check_config

    cfg = _cfg(tmp_path, smoke_data, seeds=[0, 1, 2], budgets=[3], epochs={"autoencoder": 1, "operator": 4},
               snapshot_every=2)   # snapshots at epochs 2 and 4: the final operator and one before it
    with pytest.raises(UserError, match="budgets"):
        check_config(cfg)
    check_config(OmegaConf.merge(cfg, {"snapshot_every": 1}))


def test_rows_over_the_same_member_groups_are_compared_pairwise():
    from ups_lightning.study import beats, credited

    runs = [[0, 1], [0, 2], [1, 2]]
    # the same members with and without search: the search is lower on every pair by ~0.01, while the
    # spread between pairs (0.05) is far larger than that gain
    ttc = {"nrmse": 0.20, "nrmse_std": 0.05, "per_group": [0.15, 0.20, 0.25], "group_runs": runs}
    mean = {"nrmse": 0.21, "nrmse_std": 0.05, "per_group": [0.16, 0.21, 0.26], "group_runs": runs}
    assert beats(ttc, mean) and not beats(mean, ttc)
    noisy = {**mean, "per_group": [0.14, 0.23, 0.26]}   # lower on one pair, higher on two: no
    assert not beats(ttc, noisy)
    other = {**mean, "group_runs": [[0], [1], [2]]}     # other groups: error bars, which overlap
    assert not beats(ttc, other)
    # one member group (all three seeds of three): no error bar, so never credited
    rows = _size_rows("dim8", 100, plain=0.40, ttc=0.20, cmean=0.36, mmean=0.36, hybrid=0.45) + [SOLVER]
    assert credited(rows, rows[1])
    rows[1]["groups_learned"] = 1
    assert not credited(rows, rows[1])


def test_report_only_rewrites_the_reports_from_the_saved_rows_and_needs_them(tmp_path, smoke_data):
    from ups_lightning.atomic import atomic_write_json
    from ups_lightning.study import run_study

    cfg = _cfg(tmp_path, smoke_data, report_only=True)
    with pytest.raises(UserError, match="study.json"):
        run_study(cfg)
    rows = _size_rows("dim16", 100, plain=0.50, ttc=0.30, cmean=0.45, mmean=0.45, hybrid=0.6) + [SOLVER]
    atomic_write_json(tmp_path / "study" / "study.json", {"rows": rows, "seconds": 1.0, "threads": 2,
                                                          "git_commit": "abc1234", "settings": {}})
    out = run_study(cfg)
    assert out["rows"] == rows and "1 of 1 search rows are credited" in out["verdict"]
    md = (tmp_path / "study" / "study.md").read_text()
    assert "scored at git abc1234" in md and "| dim16 | ttc ✓ |" in md
    assert not (tmp_path / "study" / "runs").exists()   # nothing trained
    prov = json.loads((tmp_path / "study" / "provenance.json").read_text())
    assert prov["driver"] == "study (report_only)" and prov["test_scored"] == 0
