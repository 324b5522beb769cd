"""`python -m ups_lightning.compare RUN_A RUN_B [--leaderboard CSV]`

RUN_A and RUN_B are run directories (their latest leaderboard rows are compared) or leaderboard run
ids. Prints the metrics side by side with their differences, then every config key that differs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from ups_lightning.errors import UserError, report_user_errors, command
from ups_lightning.eval.leaderboard import read_rows

METRICS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "nrmse_pdebench", "rmse", "max_err", "crmse", "brmse",
           "frmse_low", "frmse_mid", "frmse_high", "mass_drift", "energy_increase", "tv_increase",
           "correlation_horizon", "crps", "spread_skill", "ece", "persistence_nrmse", "solver_nrmse",
           "rollout_ms_per_traj", "params")


def _resolved(path: str) -> Optional[str]:
    try:
        return str(Path(path).resolve())
    except (OSError, ValueError, RuntimeError):     # a NUL byte, a symlink loop: matches nothing
        return None


def _find_row(rows: List[Dict[str, str]], ref: str) -> Optional[Dict[str, str]]:
    by_id = [r for r in rows if r.get("run_id") == ref]
    if by_id:
        return by_id[-1]
    target = _resolved(ref)
    by_dir = [r for r in rows if target and r.get("run_dir") and _resolved(r["run_dir"]) == target]
    return by_dir[-1] if by_dir else None


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _config(row: Optional[Dict[str, str]], ref: str) -> Dict[str, Any]:
    run_dir = Path((row or {}).get("run_dir") or ref)
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    try:
        cfg = OmegaConf.load(path)
        return _flat(OmegaConf.to_container(cfg, resolve=False))
    except UnicodeDecodeError as exc:
        problem = f"byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8 text"
    except (OSError, ValueError, TypeError, yaml.YAMLError, OmegaConfBaseException) as exc:
        # OmegaConf reports a scalar document as an OSError; YAML's messages span several lines
        problem = f"it is not a readable YAML mapping ({' '.join(str(exc).split())})"
    raise UserError(f"{path}: {problem}; expected the config.yaml a training run writes (UTF-8 "
                    f"YAML). Restore it or compare another run.")


def _float(v: Optional[str]) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def compare(a: str, b: str, leaderboard: str) -> None:
    rows = read_rows(leaderboard)       # a damaged board is a UserError naming file and line
    ra, rb = _find_row(rows, a), _find_row(rows, b)
    for ref, row in ((a, ra), (b, rb)):
        if row is None and not (Path(ref) / "config.yaml").exists():
            raise UserError(f"{ref}: neither a run id in {leaderboard} nor a run directory with a config.yaml.")
    console = Console()
    if ra and rb:
        table = Table(title=f"A = {ra.get('run_id') or a} ({ra.get('model')}, {ra.get('method')})   "
                            f"B = {rb.get('run_id') or b} ({rb.get('model')}, {rb.get('method')})")
        for col in ("metric", "A", "B", "B - A"):
            table.add_column(col, justify="right")
        for m in METRICS:
            va, vb = _float(ra.get(m)), _float(rb.get(m))
            if math.isnan(va) and math.isnan(vb):
                continue
            table.add_row(m, f"{va:.4g}", f"{vb:.4g}", f"{vb - va:+.4g}")
        console.print(table)
    else:
        console.print("(no evaluation row for one of the runs: comparing configs only)")
    ca, cb = _config(ra, a), _config(rb, b)
    keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    table = Table(title="config differences")
    for col in ("key", "A", "B"):
        table.add_column(col)
    for k in keys:
        table.add_row(k, str(ca.get(k, "—")), str(cb.get(k, "—")))
    console.print(table if keys else "configs are identical")


@report_user_errors
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=command("ups_lightning.compare"), description=__doc__.split("\n\n")[1])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--leaderboard", default="outputs/leaderboard.csv")
    args = parser.parse_args(argv)
    compare(args.run_a, args.run_b, args.leaderboard)


if __name__ == "__main__":
    main(sys.argv[1:])
