"""`python -m ups_lightning.train [model=dim64] [stage=operator|all|...] [experiment=smoke] ...`

The command line of ``ups_lightning.training.run``: Hydra composes the config, the library runs it.
The library (torch, Lightning) is imported only once a command runs, so Hydra's shell completion
and ``--help`` answer without it.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ups_lightning.errors import UserError, report_user_errors, command


#: options that need a Hydra plugin of the `sweeps` extra: (what the command line says, plugin module)
PLUGINS = ((("sweep=operator_optuna", "hydra/sweeper=optuna"), "hydra_plugins.hydra_optuna_sweeper"),
           (("hydra/launcher=submitit", "hydra/launcher=slurm"), "hydra_plugins.hydra_submitit_launcher"))


def check_plugins(argv: list) -> None:
    """Hydra's own error for a missing plugin ("Could not find 'hydra/sweeper/optuna'") names no fix:
    say which extra installs it, before Hydra composes anything."""
    import importlib.util

    for options, module in PLUGINS:
        if any(a.startswith(options) for a in argv) and importlib.util.find_spec(module) is None:
            print(f"error: {next(a for a in argv if a.startswith(options))} needs the Hydra plugin {module}, "
                  "which is not installed: pip install 'ups_lightning[sweeps]' (in a checkout: "
                  "pip install -e '.[sweeps]').", file=sys.stderr, flush=True)
            sys.exit(2)


def main() -> float:
    check_plugins(sys.argv[1:])
    return _main()


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="train", version_base="1.3")
@report_user_errors
def _main(cfg: DictConfig) -> float:
    from ups_lightning.training import command_overrides, in_multirun, record_failed_job, run, sweep_job

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
    if not in_multirun():   # where the results are, and what to run next
        print(closing_summary(cfg.run_dir, records), flush=True)
    # the last stage's validation figure: what a sweeper (hydra/sweeper=optuna) minimises
    return float(list(records.values())[-1]["best_val_nrmse"])


def closing_summary(run_dir: str, records: dict) -> str:
    """The lines a training command ends with: each stage's validation figure and whether it beat
    its trivial reference, where the run is, and the command that scores it."""
    lines = [f"trained in {run_dir}:"]
    for name, r in records.items():
        learned = {True: "learned", False: "DID NOT LEARN (see the warning above)", None: ""}[r.get("learned")]
        lines.append(f"  {name:<12} val/nrmse {r['best_val_nrmse']:.4g} ({r.get('trivial_metric')} "
                     f"{r.get('trivial_val_nrmse') or float('nan'):.4g}) {learned}".rstrip())
    from ups_lightning.stages import with_role

    if with_role("stepper")[0] in records:
        lines.append(f"next: {command('ups_lightning.evaluate')} run_dir={run_dir}   # test-split scores, leaderboard, report")
    else:
        lines.append(f"next: {command('ups_lightning.train')} stage=all run_dir={run_dir}   # the remaining stages")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
