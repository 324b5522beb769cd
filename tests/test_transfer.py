"""Fine-tuning (``init_from=RUN``, issue 25): each stage starts from the finished run's weights of the
same stage where names and shapes match, the record says what it copied, the stage hash depends on
the weights it started from, and a run that cannot be a start is refused by name."""
from __future__ import annotations

import shutil

import pytest
import torch

from ups_lightning.errors import UserError


def _weights(run_dir, stage, part):
    from ups_lightning.artifacts import load_stage, read_record

    module = load_stage(run_dir, stage, read_record(run_dir, stage))
    return {k: v for k, v in module.state_dict().items() if k.startswith(part + ".")}


def test_a_fine_tuned_stage_starts_from_the_runs_weights_and_says_so(smoke_run, smoke_data, tmp_path):
    from conftest import eval_cfg, smoke_cfg
    from ups_lightning.evaluation import evaluate
    from ups_lightning.training import run as train

    base_cfg, base_records = smoke_run
    base = tmp_path / "base"           # a copy: it is removed below, the session's run is left alone
    shutil.copytree(base_cfg.run_dir, base)
    # a learning rate too small to move the weights: what the stage ends with is what it started from
    cfg = smoke_cfg(smoke_data, f"run_dir={tmp_path / 'tuned'}", f"init_from={base}", "seed=7",
                    "stage=autoencoder_operator", "stages.autoencoder.lr=1e-12", "stages.operator.lr=1e-12",
                    "stages.autoencoder.max_epochs=1", "stages.operator.max_epochs=1")
    records = train(cfg)
    for stage, part in (("autoencoder", "autoencoder"), ("operator", "operator")):
        init = records[stage]["init_from"]
        assert init["run"] == str(base) and init["copied"] > 0 and init["fresh"] == []
        assert init["ckpt_sha256"] == base_records[stage]["ckpt_sha256"]
        mine, theirs = _weights(tmp_path / "tuned", stage, part), _weights(base, stage, part)
        assert mine.keys() == theirs.keys()
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in mine)
    # the scratch run of the same config is another stage: init_from is in the stage hash
    scratch = train(smoke_cfg(smoke_data, f"run_dir={tmp_path / 'scratch'}", "seed=7", "stage=autoencoder",
                              "stages.autoencoder.lr=1e-12", "stages.autoencoder.max_epochs=1"))
    assert scratch["autoencoder"]["config_hash"] != records["autoencoder"]["config_hash"]
    assert scratch["autoencoder"]["init_from"] is None
    # the fine-tuned run evaluates from its own record, the run it started from gone
    shutil.rmtree(base)
    row = evaluate(eval_cfg(tmp_path / "tuned", tmp_path, "ttc=off"))
    assert row["nrmse"] == row["nrmse"]     # finite: scored


def test_a_run_that_cannot_be_a_start_is_refused_by_name(smoke_run, smoke_data, tmp_path):
    from conftest import smoke_cfg
    from ups_lightning.training import run as train

    base_cfg, _ = smoke_run
    with pytest.raises(UserError, match=r"init_from=.*nowhere: no such run directory"):
        train(smoke_cfg(smoke_data, f"run_dir={tmp_path / 'a'}", f"init_from={tmp_path / 'nowhere'}",
                        "stage=autoencoder"))
    # another width: the few tensors whose shapes do not depend on it start there, the rest fresh and listed
    other = train(smoke_cfg(smoke_data, f"run_dir={tmp_path / 'b'}", f"init_from={base_cfg.run_dir}",
                            "model=dim8", "stage=autoencoder"))["autoencoder"]["init_from"]
    assert other["fresh"] and any(k.startswith("autoencoder.encoder") for k in other["fresh"])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="has no finished 'autoencoder' stage"):
        train(smoke_cfg(smoke_data, f"run_dir={tmp_path / 'c'}", f"init_from={empty}", "stage=autoencoder"))


# --- the transfer study's driver (transfer.py): its verdict and its settings --------------------------
def test_the_verdict_needs_a_gap_beyond_two_standard_errors():
    from ups_lightning.transfer import summarise

    def runs(arm, values, f=0.1):
        return [{"arm": arm, "fraction": f, "nrmse": v, "n_train": 51} for v in values]

    clear = summarise(runs("scratch", [0.30, 0.31, 0.32]) + runs("pretrained", [0.20, 0.21, 0.22]), [0.1])[0]
    assert clear["verdict"] == "pretrained better" and clear["gap"] == pytest.approx(0.10)
    noisy = summarise(runs("scratch", [0.20, 0.40]) + runs("pretrained", [0.25, 0.30]), [0.1])[0]
    assert noisy["verdict"] == "no clear difference"
    worse = summarise(runs("scratch", [0.10, 0.11]) + runs("pretrained", [0.30, 0.31]), [0.1])[0]
    assert worse["verdict"] == "scratch better"
    one = summarise(runs("scratch", [0.3]) + runs("pretrained", [0.1]), [0.1])[0]
    assert one["verdict"] == "not decided (one seed per arm)"


@pytest.mark.parametrize("override, match", [
    ("target=advection1d_small", "an equation the pretraining mixture .* does not hold"),
    ("pretrain=advection1d_small", "a mixed data config"),
    ("fractions=[0.0]", r"fractions .* in \(0, 1\]"),
    ("seeds=[1,1]", "distinct integer training seeds"),
])
def test_transfer_settings_that_cannot_answer_the_question_are_refused(override, match):
    from ups_lightning.config import compose_config
    from ups_lightning.transfer import check_config

    with pytest.raises(UserError, match=match):
        check_config(compose_config("transfer", [override]))


def test_missing_data_is_made_at_its_configs_own_split_sizes(tmp_path, monkeypatch):
    """A run on fewer training rows (data.n_train=51, the transfer study's 10 %) that finds its file
    missing makes the file every other run reads (the config's 512 / 64 / 128 rows), so its test rows
    are the same ones; larger requests are honoured."""
    from ups_lightning import training
    from ups_lightning.config import compose_config

    made = []
    monkeypatch.setattr("ups_lightning.data.generation.run", lambda settings: made.append(settings["data"]))
    for n_train, want in ((51, 512), (600, 600)):
        cfg = compose_config("train", ["data=burgers1d_small", f"data.root={tmp_path}", f"data.n_train={n_train}",
                                       "data.n_test=16"])
        training.ensure_data(cfg, [f"data.n_train={n_train}"])
        data = made.pop()
        assert (data.n_train, data.n_val, data.n_test) == (want, 64, 128)
        assert data.path == str(tmp_path / "burgers1d_small" / "1D_Burgers_Sols_Nu0.001.hdf5")


def test_the_driver_pretrains_once_and_trains_both_arms_at_every_fraction(tmp_path, monkeypatch):
    """The driver's bookkeeping on the real configs (training and scoring stood in for): one
    pretraining on the mixture (its members' training rows counted), then scratch and fine-tuned
    runs per fraction and seed on the first rows of the target, the fine-tuned ones from the
    pretrained run; its files written."""
    import json

    from ups_lightning import transfer
    from ups_lightning.config import compose_config

    trained = []

    def fake_train(tcfg):
        trained.append(tcfg)
        return {s: {"learned": True, "wall_clock_s": 1.0, "best_val_nrmse": 0.1, "ckpt_sha256": f"{tcfg.run_dir}/{s}",
                    "init_from": {"fresh": []} if tcfg.init_from else None} for s in transfer.STAGES}

    monkeypatch.setattr("ups_lightning.training.run", fake_train)
    monkeypatch.setattr(transfer, "_score", lambda cfg, run_dir: {
        "nrmse": 0.2 if "scratch" in run_dir else 0.1, "nrmse_pdebench": 0.0, "persistence_nrmse": 0.3})
    result = transfer.run_transfer(compose_config("transfer", [f"out_dir={tmp_path}", "fractions=[0.1,1.0]",
                                                               "seeds=[0,1]"]))
    assert result["pretrain"]["n_train"] == 1024 and trained[0].data.name == "pretrain_small"
    assert len(trained) == 1 + 2 * 2 * 2
    runs = result["runs"]
    assert sorted({r["n_train"] for r in runs}) == [51, 512]
    for r, tcfg in zip(runs, trained[1:]):
        assert tcfg.data.name == "burgers1d_small" and tcfg.data.n_train == r["n_train"]
        assert (tcfg.init_from == str(tmp_path / "runs" / "pretrain-pretrain_small-seed0")) == (r["arm"] == "pretrained")
    assert [row["verdict"] for row in result["summary"]] == ["pretrained better"] * 2
    assert json.loads((tmp_path / "transfer.json").read_text())["summary"][0]["n_train"] == 51
    assert all((tmp_path / f"transfer.{ext}").is_file() for ext in ("md", "csv", "png"))
    # run again (a sitting that completes an interrupted one): every run's test figures are read back
    monkeypatch.setattr(transfer, "_score", lambda cfg, run_dir: pytest.fail("test scored twice"))
    again = transfer.run_transfer(compose_config("transfer", [f"out_dir={tmp_path}", "fractions=[0.1,1.0]",
                                                              "seeds=[0,1]"]))
    assert all(r["reused_score"] for r in again["runs"]) and again["summary"] == result["summary"]
