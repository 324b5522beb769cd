"""`python -m ups_lightning.train [model=dim64] [stage=operator|all|...] [experiment=smoke] ...`

The command line of ``ups_lightning.training.run``: Hydra composes the config, the library runs it.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.training import command_overrides, in_multirun, record_failed_job, run, sweep_job


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float:
    cfg, overrides = sweep_job(cfg, command_overrides())
    try:
        records = run(cfg, overrides)
    except UserError as exc:
        if not in_multirun():
            raise
        # one failed job (a diverged trial, say) must not end the sweep: it is reported, the report
        # lists it as failed (failed.json), and a sweeper sees NaN (Optuna marks the trial failed)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        record_failed_job(cfg.run_dir, overrides, str(exc))
        return float("nan")
    # the last stage's validation figure: what a sweeper (hydra/sweeper=optuna) minimises
    return float(list(records.values())[-1]["best_val_nrmse"])


if __name__ == "__main__":
    main()
