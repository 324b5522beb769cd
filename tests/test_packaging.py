"""The package as a user gets it: a (non-editable) wheel that carries the Hydra configs and the console
scripts, and runs from a directory that is not a checkout.

The wheel is built offline (`--no-deps --no-build-isolation --no-index`) from a copy of the sources in a
temporary directory, so that setuptools' `build/` and `*.egg-info` never land in the repository, and
installed with `pip install --target` next to this interpreter's own site-packages (torch, lightning, ...).
"""
from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "src" / "ups_lightning" / "conf"
SCRIPTS = ("ups-train", "ups-evaluate", "ups-generate", "ups-inspect", "ups-compare", "ups-bench",
           "ups-ttc-headroom", "ups-pipeline", "ups-report", "ups-proxy", "ups-study", "ups-throughput",
           "ups-transfer")


def _pip(*args: str, cwd: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q",
                          "--disable-pip-version-check"], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 0, f"pip {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheelhouse")
    _pip("wheel", str(src), "--no-build-isolation", "-w", str(out), cwd=src)
    (whl,) = out.glob("ups_lightning-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--target", str(target), str(wheel), cwd=target)
    return target


def _env(target: Path) -> dict:
    """The installed copy first on the path (ahead of an editable install of the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(target), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _entry_points(whl: Path) -> dict:
    with zipfile.ZipFile(whl) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(name).decode()
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # keep the names as written
    parser.read_string(text)
    return dict(parser["console_scripts"])


def test_wheel_ships_every_config_and_the_console_scripts(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        sources = {n: zf.read(n).decode() for n in names if n.endswith(".py")}
    shipped = {n for n in names if n.startswith("ups_lightning/conf/") and n.endswith(".yaml")}
    expected = {"ups_lightning/conf/" + p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}
    assert {"ups_lightning/conf/train.yaml", "ups_lightning/conf/experiment/smoke.yaml"} <= expected
    assert shipped == expected, f"missing {sorted(expected - shipped)}, extra {sorted(shipped - expected)}"
    assert any(n.startswith("ups_lightning/conf/data/") for n in shipped)
    assert "ups_lightning/conf/__init__.py" in names
    assert "hydra_plugins/ups_ray_launcher/ray_launcher.py" in names   # hydra/launcher=ray, found by Hydra

    scripts = _entry_points(wheel)
    assert set(SCRIPTS) <= set(scripts), scripts
    for script, target in scripts.items():  # each points at a function its module defines
        module, _, attr = target.strip().partition(":")
        path = module.replace(".", "/") + ".py"
        assert path in sources, f"{script}: no module {module} in the wheel"
        tree = ast.parse(sources[path])
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        assert attr in defined, f"{script}: {module} defines no {attr}"


def test_installed_package_composes_its_config_outside_a_checkout(installed: Path, tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "ups_lightning.train", "--cfg", "job", "experiment=smoke"],
                         cwd=tmp_path, env=_env(installed), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "name: smoke" in res.stdout  # data=smoke, from the experiment, read from the installed conf/
    assert "pde: burgers1d" in res.stdout and "nu: 0.001" in res.stdout   # the equation and its params
    assert list(tmp_path.iterdir()) == []  # --cfg job runs nothing and writes nothing


def test_console_script_installs_hydra_tab_completion(installed: Path, tmp_path: Path):
    bin_dir = installed / "bin"
    assert {p.name for p in bin_dir.iterdir()} >= set(SCRIPTS)
    script = str(bin_dir / "ups-train")
    env = _env(installed)
    # the two start torch in parallel: half the wall-clock time
    install = subprocess.Popen([script, "-sc", "install=bash"], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    query = subprocess.Popen([script, "-sc", "query=bash"], cwd=tmp_path, text=True,
                             env={**env, "COMP_LINE": "ups-train data=", "COMP_POINT": "15"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = install.communicate(timeout=300)
    q_out, q_err = query.communicate(timeout=300)
    assert install.returncode == 0, err
    assert "hydra_bash_completion()" in out
    assert out.strip().splitlines()[-1].endswith("-F hydra_bash_completion ups-train")  # bound to the script
    assert query.returncode == 0, q_err
    assert set(q_out.split()) >= {"data=smoke", "data=burgers1d_small", "data=burgers1d", "data=advection1d",
                                  "data=advection1d_small", "data=reacdiff1d", "data=reacdiff1d_small",
                                  "data=mixed_small"}
