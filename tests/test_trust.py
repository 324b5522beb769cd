"""Never score the wrong or a broken model, never run a checkpoint's code (issue 9).

Each test works on its own copy of the session's smoke run (a run directory can be copied), so the
shared run stays as trained."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import eval_cfg, smoke_cfg
from filelock import FileLock

from ups_lightning.artifacts import checkpoint_file, load_stage, read_record, sha256_file
from ups_lightning.errors import UserError
from ups_lightning.evaluation import evaluate
from ups_lightning.training import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    """(config for the copy, the copy's directory) of the shared smoke run."""
    cfg, _ = smoke_run
    dst = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, dst)
    return smoke_cfg(Path(cfg.data.root).parent, f"run_dir={dst}"), dst


def test_a_copied_run_directory_evaluates_its_own_checkpoints(run_copy, tmp_path):
    cfg, dst = run_copy
    moved = tmp_path / "moved"
    dst.rename(moved)   # nothing points back at the original place
    row = evaluate(eval_cfg(moved, tmp_path / "lb"))
    assert row["model"] == "dim16" and row["nrmse"] == row["nrmse"]


def test_retrained_operator_makes_the_downstream_stages_stale(run_copy, tmp_path):
    cfg, dst = run_copy
    new = smoke_cfg(Path(cfg.data.root).parent, f"run_dir={dst}", "stage=operator", "stages.operator.lr=1e-3")
    run(new)
    with pytest.raises(UserError, match=r"stage 'diffusion' .* is stale.*stage=all.*upto=operator"):
        evaluate(eval_cfg(dst, tmp_path / "lb"))
    assert not (tmp_path / "lb" / "lb.csv").exists()
    # the new operator alone can be scored, and its row carries the settings it was trained with
    row = evaluate(eval_cfg(dst, tmp_path / "lb", "upto=operator"))
    assert json.loads(row["stages"])["operator"]["lr"] == pytest.approx(1e-3)
    assert "diffusion" not in json.loads(row["stages"])


def test_a_diverging_stage_fails_and_keeps_the_previous_good_one(run_copy):
    cfg, dst = run_copy
    before = sha256_file(checkpoint_file(dst, "operator", read_record(dst, "operator")))
    record_before = (dst / "operator" / "done.json").read_text()
    bad = smoke_cfg(Path(cfg.data.root).parent, f"run_dir={dst}", "stage=operator", "stages.operator.lr=1e6")
    with pytest.raises(UserError, match=r"stage 'operator' failed: .*(NaN|nan|inf).*left as it was"):
        run(bad)
    assert (dst / "operator" / "done.json").read_text() == record_before
    assert sha256_file(checkpoint_file(dst, "operator", read_record(dst, "operator"))) == before
    assert not (dst / ".attempts").exists() and not list(dst.glob("operator.stale-*"))
    # the run's config still describes the model that is there
    assert "1000000.0" not in (dst / "config.yaml").read_text()


def test_a_tampered_checkpoint_is_never_scored_and_is_retrained_by_stage_all(run_copy, tmp_path):
    cfg, dst = run_copy
    ckpt = checkpoint_file(dst, "operator", read_record(dst, "operator"))
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 32] = bytes(b ^ 0xFF for b in data[mid : mid + 32])
    ckpt.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"stage 'operator' .* does not match its record .*stage=all"):
        evaluate(eval_cfg(dst, tmp_path / "lb"))
    records = run(cfg)   # stage=all: the tampered stage and everything after it are trained again
    assert sha256_file(checkpoint_file(dst, "operator", records["operator"])) == records["operator"]["ckpt_sha256"]
    assert evaluate(eval_cfg(dst, tmp_path / "lb"))["nrmse"] < 5


def test_a_last_checkpoint_from_another_run_is_refused_even_when_its_record_is_re_signed(run_copy, tmp_path):
    """The networks the distill checkpoint carries (autoencoder, operator, teacher) must be this
    run's verified upstream stages', tensor for tensor."""
    cfg, dst = run_copy
    record = read_record(dst, "distill")
    ckpt = checkpoint_file(dst, "distill", record)
    blob = torch.load(ckpt, weights_only=True)
    key = next(k for k in blob["state_dict"] if k.startswith("operator."))
    blob["state_dict"][key] = blob["state_dict"][key] + 0.01          # another run's operator
    torch.save(blob, ckpt)
    record["ckpt_sha256"] = sha256_file(ckpt)                          # the record re-signed
    (dst / "distill" / "done.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"stage 'distill' .* carries networks that are not its verified 'operator'"):
        evaluate(eval_cfg(dst, tmp_path / "lb"))
    assert not (tmp_path / "lb" / "lb.csv").exists()


def test_fix_commands_name_the_run_where_it_lies_now(tmp_path):
    """The saved overrides of a copied or moved run name its old directory: the command does not."""
    from ups_lightning.artifacts import save_overrides, train_command

    moved = tmp_path / "moved run"
    moved.mkdir()
    save_overrides(moved, ["model=dim16", "run_dir=/somewhere/else/original", "stage=operator"])
    cmd = train_command(moved)
    assert "/somewhere/else/original" not in cmd and "model=dim16" in cmd
    assert f"'run_dir={moved}'" in cmd and cmd.endswith("stage=all")


def test_a_checkpoint_that_carries_code_is_refused_without_running_it(run_copy, tmp_path):
    cfg, dst = run_copy
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    record = read_record(dst, "distill")
    ckpt = checkpoint_file(dst, "distill", record)
    blob = torch.load(ckpt, weights_only=True)
    blob["hyper_parameters"]["evil"] = Payload()
    torch.save(blob, ckpt)
    record["ckpt_sha256"] = sha256_file(ckpt)    # an attacker controls the record too
    (dst / "distill" / "done.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="not a checkpoint this version can load as plain weights"):
        evaluate(eval_cfg(dst, tmp_path / "lb"))
    assert not marker.exists()


def test_a_record_naming_a_file_outside_its_stage_is_refused(run_copy, tmp_path):
    cfg, dst = run_copy
    record = read_record(dst, "operator")
    record["best_ckpt"] = "../autoencoder/checkpoints/best.ckpt"
    (dst / "operator" / "done.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="outside its stage directory"):
        evaluate(eval_cfg(dst, tmp_path / "lb", "upto=operator"))


@pytest.mark.parametrize("damage", ["truncate", "not_json", "not_utf8", "missing_keys", "list", "wall_clock_text",
                                    "learned_text"])
def test_a_broken_stage_record_is_a_clear_error_and_stage_all_retrains(run_copy, tmp_path, damage):
    cfg, dst = run_copy
    path = dst / "distill" / "done.json"
    text = path.read_bytes()
    edited = {**json.loads(text), **{"wall_clock_text": {"wall_clock_s": "12 s"},
                                    "learned_text": {"learned": "yes"}}.get(damage, {})}
    path.write_bytes({"truncate": text[: len(text) // 2], "not_json": b"{oops", "not_utf8": b"\xff\xfe{}",
                      "missing_keys": b'{"stage": "distill"}', "list": b"[1, 2]"}.get(damage, json.dumps(edited).encode()))
    with pytest.raises(UserError, match=r"distill/done.json"):
        evaluate(eval_cfg(dst, tmp_path / "lb"))
    if damage == "truncate":
        assert "distill" in run(cfg)


def test_a_tampered_latent_cache_is_encoded_again(run_copy):
    cfg, dst = run_copy
    cache = next((dst / "latents").glob("latents-*.pt"))
    blob = torch.load(cache, weights_only=True)
    blob["z"]["train"][0, 0, 0, :8] = float("nan")
    torch.save(blob, cache)
    again = smoke_cfg(Path(cfg.data.root).parent, f"run_dir={dst}", "stage=operator", "stages.operator.lr=1.5e-3")
    record = run(again)["operator"]
    assert record["best_val_nrmse"] < 5
    fresh = torch.load(cache, weights_only=True)
    assert all(torch.isfinite(z).all() for z in fresh["z"].values())


def test_an_edited_and_re_signed_latent_cache_is_refused_by_its_shapes(run_copy):
    """A cache whose bytes match a re-signed sidecar but whose splits no longer fit the data (rows
    dropped) is encoded anew, not handed to a stage that would fail mid-training."""
    import json

    from ups_lightning.atomic import sha256_file
    from ups_lightning.data.cache import _load_verified

    _, dst = run_copy
    cache = next((dst / "latents").glob("latents-*.pt"))
    sidecar = json.loads(cache.with_suffix(".json").read_text())
    blob = torch.load(cache, weights_only=True)
    sizes = {s: int(blob["z"][s].shape[0]) for s in blob["z"]}
    assert _load_verified(cache, sidecar["fingerprint"], sizes) is not None
    blob["z"]["train"], blob["u"]["train"] = blob["z"]["train"][1:], blob["u"]["train"][1:]
    torch.save(blob, cache)
    cache.with_suffix(".json").write_text(json.dumps({**sidecar, "sha256": sha256_file(cache)}))
    assert _load_verified(cache, sidecar["fingerprint"], sizes) is None


def test_a_refused_run_writes_nothing_and_relabels_nothing(run_copy):
    cfg, dst = run_copy
    before = {p: p.read_bytes() for p in (dst / "config.yaml", dst / "overrides.json") if p.exists()}
    refused = smoke_cfg(Path(cfg.data.root).parent, f"run_dir={dst}", "model=dim8", "stage=operator")
    with pytest.raises(UserError, match=r"needs the finished 'autoencoder' stage.*model=dim8.*stage=all"):
        run(refused)
    assert {p: p.read_bytes() for p in before} == before


def test_a_locked_run_directory_is_refused(run_copy):
    cfg, dst = run_copy
    with FileLock(str(dst / ".lock")):
        with pytest.raises(UserError, match="locked by another training process"):
            run(cfg)


def test_evaluation_refuses_a_file_on_another_grid(run_copy, tmp_path):
    from ups_lightning.data.generation import write_dataset

    cfg, dst = run_copy
    coarse = tmp_path / "coarse.hdf5"
    write_dataset(coarse, pde="burgers1d", params={"nu": 0.001}, nx=32, nt=21, t_max=2.0, seed=5, n_train=4,
                  n_val=0, n_test=0, workers=1, progress=False, quiet=True)
    with pytest.raises(UserError, match=r"32 cells .* trained on \(64,\)"):
        evaluate(eval_cfg(dst, tmp_path / "lb", f"data.path={coarse}", "split=all"))
    assert not (tmp_path / "lb").exists()


def test_evaluation_refuses_a_file_of_another_equation(run_copy, tmp_path):
    """Same grid and frames, another equation: the Burgers model never scores it."""
    from ups_lightning.data.generation import write_dataset

    cfg, dst = run_copy
    other = tmp_path / "other.hdf5"
    write_dataset(other, pde="advection1d", params={"beta": 0.1}, nx=64, nt=21, t_max=2.0, seed=5, n_train=4,
                  n_val=0, n_test=0, workers=1, progress=False, quiet=True)
    with pytest.raises(UserError, match=r"advection1d.*burgers1d|burgers1d.*advection1d"):
        evaluate(eval_cfg(dst, tmp_path / "lb", f"data.path={other}", "split=all"))
    assert not (tmp_path / "lb").exists()


def test_evaluation_scores_every_row_of_a_small_file_without_a_manifest(run_copy, tmp_path):
    from ups_lightning.data.generation import write_dataset

    cfg, dst = run_copy
    small = tmp_path / "small.hdf5"
    write_dataset(small, pde="burgers1d", params={"nu": 0.001}, nx=64, nt=21, t_max=2.0, seed=7, n_train=6,
                  n_val=0, n_test=0, workers=1, progress=False, quiet=True)
    small.with_name(small.name + ".manifest.json").unlink()
    row = evaluate(eval_cfg(dst, tmp_path / "lb", f"data.path={small}"))
    assert row["split"] == "all" and row["n_test"] == 6
    assert row["pde"] == "burgers1d" and json.loads(row["pde_params"]) == {"nu": 0.001}
    with pytest.raises(UserError, match="split=all"):
        evaluate(eval_cfg(dst, tmp_path / "lb", f"data.path={small}", "split=test"))


# --- resume reproduces the uninterrupted stage exactly ---------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from hydra import compose, initialize_config_dir
    import ups_lightning.training as T
    from ups_lightning import CONF_DIR

    class KillAfterEpoch(Callback):   # SIGKILL: no clean-up runs, as when a job is pre-empted
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    build = T.build_trainer
    def killing(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(KillAfterEpoch())
        return trainer
    T.build_trainer = killing
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:])
    T.run(cfg)
""")


def test_a_killed_and_resumed_stage_reproduces_the_uninterrupted_one(smoke_data, tmp_path):
    args = ["experiment=smoke", "model=dim8", f"data.root={smoke_data / 'data'}", "stage=autoencoder",
            "stages.autoencoder.max_epochs=4", "trainer.num_threads=1"]
    straight = run(smoke_cfg(smoke_data, *args[3:], "model=dim8", f"run_dir={tmp_path / 'straight'}"))
    killed = tmp_path / "killed"
    res = subprocess.run([sys.executable, "-c", KILLER, *args, f"run_dir={killed}"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    assert list(killed.glob(".attempts/autoencoder-*/checkpoints/last.ckpt"))
    resumed = run(smoke_cfg(smoke_data, *args[3:], "model=dim8", f"run_dir={killed}"))
    a, b = straight["autoencoder"], resumed["autoencoder"]
    assert b["best_val_nrmse"] == a["best_val_nrmse"]
    wa = load_stage(tmp_path / "straight", "autoencoder", a).state_dict()
    wb = load_stage(killed, "autoencoder", b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_truncated_last_checkpoint_is_set_aside_and_the_stage_starts_over(smoke_data, tmp_path, caplog):
    """A kill or a full disk while last.ckpt was written leaves it unreadable: the rerun sets it aside
    and trains the stage from the start, instead of failing on it for good."""
    from ups_lightning.artifacts import stage_config_hash
    from ups_lightning.config import validate_train_config

    cfg = smoke_cfg(smoke_data, f"run_dir={tmp_path / 'run'}", "model=dim8", "stage=autoencoder",
                    "stages.autoencoder.max_epochs=1", "trainer.num_threads=1")
    h = stage_config_hash(validate_train_config(cfg.copy()), "autoencoder", None)
    last = tmp_path / "run" / ".attempts" / f"autoencoder-{h}" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 truncated")
    record = run(cfg)["autoencoder"]
    assert record["epochs"] == 1 and record["config_hash"] == h
    assert "set aside" in caplog.text and "starts over" in caplog.text


def test_a_relative_run_dir_trains_and_evaluates(smoke_data, tmp_path, monkeypatch):
    """The default run_dir is relative (outputs/runs/...): records stay relative to the stage."""
    monkeypatch.chdir(tmp_path)
    cfg = smoke_cfg(smoke_data, "run_dir=outputs/runs/rel", "model=dim8", "stage=autoencoder",
                    "stages.autoencoder.max_epochs=1")
    record = run(cfg)["autoencoder"]
    assert record["best_ckpt"] == "checkpoints/best.ckpt"
    assert load_stage(Path("outputs/runs/rel"), "autoencoder", record) is not None
