"""The run pins its data (data/pin.py): a replaced file or an edited split is refused at a stage's
skip and at evaluation; a relative data.path is read where training read it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import smoke_cfg
from omegaconf import OmegaConf

from ups_lightning.data.pin import pin_mismatch, view_pin
from ups_lightning.errors import UserError


def _view(path: Path):
    from ups_lightning.data.pdebench import open_dataset

    return open_dataset(str(path), n_train=16, n_val=4, n_test=4)


def _copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    man = src.with_name(src.name + ".manifest.json")
    if man.exists():
        shutil.copy(man, dst.with_name(dst.name + ".manifest.json"))
    return dst


def _poke(path: Path, row: int) -> None:
    """Change one value of one row in place: the file keeps its name and size."""
    with h5py.File(path, "r+") as h5:
        ds = h5["tensor"]
        ds[row, 3, 5] = ds[row, 3, 5] + 0.25


def test_the_pin_follows_content_not_place(tiny_burgers_file, tmp_path):
    a = view_pin(_view(tiny_burgers_file))
    moved = _copy(tiny_burgers_file, tmp_path / "moved")
    b = view_pin(_view(moved))
    assert a["path"] != b["path"] and pin_mismatch(a, b) is None            # same content elsewhere
    assert set(a["splits"]) == {"train", "val", "test"} and a["splits"]["test"]["rows"] == 4
    _poke(moved, 23)                                                         # the last test row
    assert "split 'test' holds other rows or other values" in pin_mismatch(a, view_pin(_view(moved)))
    assert pin_mismatch(None, b) is None                                     # a record from before pins


def test_evaluation_refuses_an_edited_split_and_reads_the_pinned_file(tiny_burgers_file, tmp_path, monkeypatch):
    from ups_lightning.evaluation import eval_data

    data = _copy(tiny_burgers_file, tmp_path / "data")
    d = OmegaConf.create({"path": str(data), "reduced_resolution": 1, "reduced_resolution_t": 1, "pde": "burgers1d",
                          "n_train": 16, "n_val": 4, "n_test": 4, "split_layout": "tail", "pdebench_test_ratio": 0.1})
    pin = view_pin(_view(data))
    # a relative data.path from another directory: the pinned file is read, not whatever the name means here
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rel = OmegaConf.merge(d, {"path": "data/" + data.name})
    got = eval_data(rel, None, "test", pin)
    assert Path(got.path) == data.resolve() and got.fields.shape[0] == 4
    # the manifest's splits edited so that test covers training rows: refused, naming the file
    man_path = data.with_name(data.name + ".manifest.json")
    man = json.loads(man_path.read_text())
    man["splits"]["test"] = {"start": 0, "stop": 4}       # the first four training rows
    man_path.write_text(json.dumps(man))
    with pytest.raises(UserError, match="is not the data this run was trained on|overlap"):
        eval_data(d, None, "test", pin)


def test_a_finished_stage_is_not_reused_on_a_replaced_file(smoke_data, tmp_path):
    from ups_lightning.training import run

    root = tmp_path / "copy"
    shutil.copytree(smoke_data / "data", root / "data")
    cfg = smoke_cfg(root, f"run_dir={tmp_path / 'run'}", "model=dim8", "stage=autoencoder",
                    "stages.autoencoder.max_epochs=1", "trainer.num_threads=1")
    record = run(cfg)["autoencoder"]
    (pde, pin), = record["data_pin"].items()
    assert Path(pin["path"]).is_absolute() and pin["size"] > 0
    assert run(cfg.copy())["autoencoder"]["ckpt_sha256"] == record["ckpt_sha256"]      # same data: skipped
    _poke(Path(pin["path"]), 0)
    with pytest.raises(UserError, match="is not reused for other data") as err:
        run(cfg.copy())
    assert "run_dir=<new directory>" in str(err.value) and "\n" not in str(err.value).strip()
