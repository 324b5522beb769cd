"""`python -m ups_lightning.pipeline experiment=eval_small|eval_full [data=NAME] [train overrides ...]`:
the main job, in the key=value style of every other command (``small`` / ``full`` alone still mean
``experiment=eval_small`` / ``experiment=eval_full``).

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

from ups_lightning.errors import UserError, command, report_user_errors

PRESETS = {"small": "eval_small", "full": "eval_full"}   # the experiment configs (each names its data)


def _step(title: str, module: str, args: List[str]) -> float:
    print(f"\n=== {title}: {command(module)} {' '.join(args)}", flush=True)
    start = time.time()
    rc = subprocess.call([sys.executable, "-m", module, *args])
    if rc != 0:
        sys.exit(rc)
    took = time.time() - start
    print(f"=== {title}: {took:.0f} s", flush=True)
    return took


def train_overrides(argv: List[str]) -> List[str]:
    """The training overrides ``argv`` means: key=value throughout, one ``experiment=`` among the
    presets (``small`` / ``full`` are shorthands for them)."""
    args = [f"experiment={PRESETS[a]}" if a in PRESETS else a for a in argv]
    bad = [a for a in args if "=" not in a]
    experiments = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "experiment"]
    usage = (f"usage: {command('ups_lightning.pipeline')} experiment={'|'.join(PRESETS.values())} "
             "[data=NAME] [train overrides key=value ...]")
    if bad:
        raise UserError(f"pipeline argument {bad[0]!r} is not a key=value override. {usage}")
    if len(experiments) != 1 or experiments[0] not in PRESETS.values():
        raise UserError(f"pipeline needs one experiment among {', '.join(PRESETS.values())} (got "
                        f"{', '.join(experiments) or 'none'}): it is the protocol the main job runs. {usage}")
    return args


@report_user_errors
def main(argv: List[str]) -> None:
    train_args = train_overrides(argv)
    from ups_lightning.config import compose_config

    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:   # a bad override is the user's, named before any step runs
        cfg = compose_config("train", train_args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"pipeline overrides {' '.join(train_args)}: {str(exc).strip().splitlines()[0]}. Each is "
                        "a training override (key=value of conf/train.yaml or a conf/ group option).") from None
    extra = [a for a in train_args if not a.startswith("experiment=")]
    data_args = [f"data={cfg.data.name}"] + [a for a in extra if a.startswith("data.")]
    ttc_args = [f"run_dir={cfg.run_dir}", "ttc=default"]
    if cfg.data.pde != "mixed":
        from ups_lightning.inference.rewards import usable_rewards
        from ups_lightning.pdes import get_pde

        spec = get_pde(cfg.data.pde)
        reward = OmegaConf.select(compose_config("evaluate", ["run_dir=.", "ttc=default"]), "ttc.reward.name")
        if reward not in usable_rewards(spec):   # ttc=default's reward needs a 1D equation
            ttc_args.append(f"ttc.reward.name={usable_rewards(spec)[0]}")
            print(f"TTC on {spec.name}: ttc=default's {reward} reward cannot score it, so the search uses "
                  f"ttc.reward.name={usable_rewards(spec)[0]}", flush=True)
    start = time.time()
    times = {
        "data": _step("data", "ups_lightning.data.generate", data_args),
        "train": _step("train (all stages)", "ups_lightning.train", train_args),
        "eval plain": _step("evaluate (plain)", "ups_lightning.evaluate", [f"run_dir={cfg.run_dir}", "ttc=off"]),
        "eval ttc": _step("evaluate (TTC)", "ups_lightning.evaluate", ttc_args),
    }
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.time() - start:.0f} s. Run: {cfg.run_dir}; report: outputs/leaderboard.html")


def cli() -> None:
    """The `ups-pipeline` console script."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
