"""`python -m ups_lightning.pipeline small|full [data=NAME] [train overrides ...]`: the main job.

Behind `make eval-small` and `make eval-full` (`DATA=<data config>` picks another data
config): make the dataset if it is absent, train the default
model through every stage (finished stages are skipped, a killed run resumes), evaluate it plainly
and with TTC on the test split, append both rows to the leaderboard and print the tables.
Each step is its own Hydra application, run as a child process so its progress streams through.
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import List

from hydra import compose, initialize_config_dir

from ups_lightning import CONF_DIR

CONF = CONF_DIR
PRESETS = {"small": "eval_small", "full": "eval_full"}   # the experiment configs (each names its data)


def _step(title: str, module: str, args: List[str]) -> float:
    print(f"\n=== {title}: python -m {module} {' '.join(args)}", flush=True)
    start = time.time()
    rc = subprocess.call([sys.executable, "-m", module, *args])
    if rc != 0:
        sys.exit(rc)
    took = time.time() - start
    print(f"=== {title}: {took:.0f} s", flush=True)
    return took


def main(argv: List[str]) -> None:
    if not argv or argv[0] not in PRESETS:
        print(f"usage: python -m ups_lightning.pipeline {{{'|'.join(PRESETS)}}} [train overrides ...]",
              file=sys.stderr)
        sys.exit(2)
    experiment, extra = PRESETS[argv[0]], argv[1:]
    train_args = [f"experiment={experiment}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=train_args)
    data_args = [f"data={cfg.data.name}"] + [a for a in extra if a.startswith("data.")]
    start = time.time()
    times = {
        "data": _step("data", "ups_lightning.data.generate", data_args),
        "train": _step("train (all stages)", "ups_lightning.train", train_args),
        "eval plain": _step("evaluate (plain)", "ups_lightning.evaluate", [f"run_dir={cfg.run_dir}", "ttc=off"]),
        "eval ttc": _step("evaluate (TTC)", "ups_lightning.evaluate", [f"run_dir={cfg.run_dir}", "ttc=default"]),
    }
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.time() - start:.0f} s. Run: {cfg.run_dir}; report: outputs/leaderboard.html")


def cli() -> None:
    """The `ups-pipeline` console script."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
