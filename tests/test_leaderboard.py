"""Leaderboard: locked atomic appends, gates and promotion, the HTML report."""
from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest

from ups_lightning.eval.leaderboard import (
    GateConfig, append_row, assign_labels, check_gates, current_champion, label_new_row, read_rows, write_html,
)

CHAMP = {"nrmse": 0.10, "mass_drift": 0.010, "crmse": 0.002, "brmse": 0.05, "ece": 0.05,
         "rollout_ms_per_traj": 10.0}


def _cand(**kw):
    row = {"nrmse": 0.09, "mass_drift": 0.012, "crmse": 0.002, "brmse": 0.06, "ece": 0.06,
           "rollout_ms_per_traj": 15.0}
    row.update(kw)
    return row


# ---------------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------------
def test_gates_pass_and_no_champion():
    assert check_gates(_cand(), CHAMP, GateConfig()) == (True, [])
    assert check_gates(_cand(nrmse=0.5), None, GateConfig()) == (True, [])
    # values read back from the CSV are strings
    assert check_gates({k: str(v) for k, v in _cand().items()}, {k: str(v) for k, v in CHAMP.items()})[0]


@pytest.mark.parametrize("change, gate", [
    ({"nrmse": 0.11}, "nrmse"),
    ({"nrmse": ""}, "nrmse"),
    ({"mass_drift": 0.016}, "conservation"),
    ({"crmse": 0.0031}, "conservation"),
    ({"mass_drift": None}, "conservation"),
    ({"brmse": 0.076}, "boundary"),
    ({"ece": 0.076}, "calibration"),
    ({"rollout_ms_per_traj": 20.5}, "wall-clock"),
])
def test_each_gate_fails(change, gate):
    passed, reasons = check_gates(_cand(**change), CHAMP, GateConfig())
    assert not passed
    assert len(reasons) == 1 and reasons[0].startswith(gate), reasons


def test_a_model_that_did_not_learn_is_never_champion():
    """Even with no champion yet, and however good its figures: its not_learned names the stages."""
    for champ in (None, CHAMP):
        passed, reasons = check_gates(_cand(nrmse=0.01, not_learned="autoencoder operator"), champ)
        assert not passed and reasons == ["did not learn: stage(s) autoencoder operator never beat their "
                                          "trivial reference"]
    assert check_gates(_cand(not_learned=""), None) == (True, [])
    labels = assign_labels([_cand(not_learned="operator"), _cand(nrmse=0.5), _cand(nrmse=0.01, not_learned="operator")])
    assert labels == ["candidate", "champion", "candidate"]


def test_delta_and_optional_calibration():
    assert not check_gates(_cand(nrmse=0.095), CHAMP, GateConfig(delta=0.01))[0]
    assert check_gates(_cand(nrmse=0.089), CHAMP, GateConfig(delta=0.01))[0]
    # calibration applies only when both rows report it
    assert check_gates(_cand(ece=None), CHAMP)[0]
    no_ece = {k: v for k, v in CHAMP.items() if k != "ece"}
    assert check_gates(_cand(ece=9.0), no_ece)[0]
    # looser ratios let a slower model through
    assert check_gates(_cand(rollout_ms_per_traj=30.0), CHAMP, GateConfig(max_wallclock_ratio=3.0))[0]


def test_promotion_labels(tmp_path):
    csv_path = tmp_path / "board.csv"
    g = GateConfig()
    rows = [
        dict(run_id="a", data="small", protocol="p10", **_cand(nrmse=0.2)),  # first: champion
        dict(run_id="b", data="small", protocol="p10", **_cand(nrmse=0.25)),  # worse: candidate
        dict(run_id="c", data="full", protocol="p10", **_cand(nrmse=0.5)),  # other group: champion
        dict(run_id="d", data="small", protocol="p10", **_cand(nrmse=0.15)),  # better: champion
        dict(run_id="e", data="small", protocol="p10", **_cand(nrmse=0.1, brmse=1.0)),  # boundary fails
    ]
    keys = ("data", "protocol")
    written = [append_row(csv_path, r, gates=g, group_keys=keys) for r in rows]
    labels = [w["label"] for w in written]
    assert labels == ["champion", "candidate", "champion", "champion", "candidate"]
    assert "boundary" in written[-1]["gate_reasons"]
    board = read_rows(csv_path)
    assert [r["label"] for r in board] == labels
    assert assign_labels(board, g, group_keys=keys) == labels
    assert current_champion(board, ("small", "p10"), keys)["run_id"] == "d"
    # a row that brings its own label keeps it
    assert append_row(csv_path, dict(run_id="f", label="peer", nrmse=0.01), gates=g)["label"] == "peer"


def test_default_groups_and_label_new_row(tmp_path):
    """The default group is what evaluate.py writes: data_path, split, steps."""
    csv_path = tmp_path / "board.csv"
    base = dict(data_path="/d/small.h5", split="test", steps=31)
    assert append_row(csv_path, {**base, **_cand(nrmse=0.2)}, gates=GateConfig())["label"] == "champion"
    label, reasons = label_new_row(csv_path, {**base, **_cand(nrmse=0.3)}, GateConfig())
    assert label == "candidate" and reasons[0].startswith("nrmse")
    assert label_new_row(csv_path, {**base, **_cand(nrmse=0.1)}, GateConfig()) == ("champion", [])
    # another split or horizon is another group, with no champion yet
    assert label_new_row(csv_path, {**base, "steps": 10, **_cand(nrmse=0.9)})[0] == "champion"
    assert label_new_row(csv_path, {**base, "split": "val", **_cand(nrmse=0.9)})[0] == "champion"


# ---------------------------------------------------------------------------------------------
# concurrent appends
# ---------------------------------------------------------------------------------------------
def _writer(args):
    path, worker, n = args
    for i in range(n):
        # every worker brings its own new column, so appends also rewrite the header
        append_row(path, {"run_id": f"w{worker}-{i}", "nrmse": 0.1 * i, f"extra_{worker}": worker})
    return worker


def test_concurrent_appends_lose_no_row(tmp_path):
    path = str(tmp_path / "board.csv")
    workers, n = 4, 15
    with mp.get_context("fork").Pool(workers) as pool:
        assert sorted(pool.map(_writer, [(path, w, n) for w in range(workers)])) == list(range(workers))
    rows = read_rows(path)
    assert len(rows) == workers * n
    assert {r["run_id"] for r in rows} == {f"w{w}-{i}" for w in range(workers) for i in range(n)}
    for w in range(workers):
        assert sum(r[f"extra_{w}"] == str(w) for r in rows) == n
    assert not list(tmp_path.glob("*.tmp-*"))


def test_append_preserves_values_and_union_header(tmp_path):
    path = tmp_path / "b.csv"
    append_row(path, {"run_id": "1", "nrmse": np.float64(0.123456789012), "cfg": {"a": 1}, "none": None})
    append_row(path, {"run_id": "2", "params": 1234})
    rows = read_rows(path)
    assert float(rows[0]["nrmse"]) == 0.123456789012
    assert json.loads(rows[0]["cfg"]) == {"a": 1} and rows[0]["none"] == ""
    assert rows[0]["params"] == "" and rows[1]["params"] == "1234" and rows[1]["nrmse"] == ""
    assert read_rows(tmp_path / "missing.csv") == []


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
def _artifacts(d, T=6, X=16, channels=None):
    d.mkdir()
    t = np.linspace(0.5, 2.0, T)
    x = (np.arange(X) + 0.5) / X
    true = np.sin(2 * np.pi * x)[None, None] * np.ones((2, T, 1))
    if channels is not None:     # evaluation writes (n, T, X, C)
        true = np.repeat(true[..., None], channels, axis=-1)
    np.savez(d / "samples.npz", true=true, pred=true + 0.01, x=x, t=t)
    (d / "curves.json").write_text(json.dumps({"model": list(np.linspace(0.01, 0.1, T)),
                                               "persistence": list(np.linspace(0.2, 0.9, T))}))
    return d


def test_html_with_and_without_artifacts(tmp_path):
    csv_path = tmp_path / "board.csv"
    art = _artifacts(tmp_path / "run1")
    append_row(csv_path, {"run_id": "r1", "label": "champion", "model": "ups", "dim": 16, "params": 1e4,
                          "nrmse": 0.1, "artifacts": str(art)})
    append_row(csv_path, {"run_id": "r2", "label": "candidate", "model": "ups", "dim": 64, "params": 1e5,
                          "nrmse": 0.05, "artifacts": "run1"})  # relative to the CSV's directory
    append_row(csv_path, {"run_id": "r3", "model": "ups", "dim": 8, "params": 5e3, "nrmse": 0.3,
                          "artifacts": str(tmp_path / "gone")})  # missing artifacts: no crash
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "curves.json").write_text("{not json")
    append_row(csv_path, {"run_id": "r4", "nrmse": "nan", "artifacts": str(bad)})  # unreadable: a note
    out = write_html(csv_path, tmp_path / "report" / "board.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("<img") >= 5  # 2 rows x (fields + curves) + the capacity curve
    assert "data:image/png;base64," in text
    assert "Capacity" in text and "artifacts not found" in text and "artifacts unreadable" in text
    for rid in ("r1", "r2", "r3", "r4"):
        assert f">{rid}<" in text


@pytest.mark.parametrize("channels", [1, 2])
def test_html_plots_samples_with_a_channel_axis(tmp_path, channels):
    csv_path = tmp_path / "board.csv"
    art = _artifacts(tmp_path / "run1", channels=channels)
    append_row(csv_path, {"run_id": "r1", "label": "champion", "model": "ups", "dim": 16, "params": 1e4,
                          "nrmse": 0.1, "pde": "burgers1d", "pde_params": json.dumps({"nu": 0.001}),
                          "artifacts": str(art)})
    text = write_html(csv_path, tmp_path / "board.html").read_text()
    assert text.count("<img") == 2 and "artifacts unreadable" not in text   # space-time fields + curves
    (row,) = read_rows(csv_path)
    assert row["pde"] == "burgers1d" and json.loads(row["pde_params"]) == {"nu": 0.001}


def test_html_without_any_artifacts(tmp_path):
    csv_path = tmp_path / "board.csv"
    append_row(csv_path, {"run_id": "only", "nrmse": 0.2, "model": "<b>escaped</b>"})
    text = write_html(csv_path, tmp_path / "b.html").read_text()
    assert "<img" not in text and ">only<" in text
    assert "<b>escaped</b>" not in text and "&lt;b&gt;escaped&lt;/b&gt;" in text
