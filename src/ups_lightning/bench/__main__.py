"""`python -m ups_lightning.bench [budget_min=10] [data=NAME] [model=dim32] [n_test=N] ...`

See ``ups_lightning.bench`` (the package docstring) for what runs and ``conf/bench.yaml`` for the
settings. Bad settings are reported as one ``error: ...`` paragraph with exit code 2.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ups_lightning.bench import run_bench
from ups_lightning.errors import report_user_errors


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="bench", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_bench(cfg)


if __name__ == "__main__":
    main()
