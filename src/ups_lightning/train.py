"""`python -m ups_lightning.train [model=dim64] [stage=operator|all|...] [experiment=smoke] ...`

The command line of ``ups_lightning.training.run``: Hydra composes the config, the library runs it.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ups_lightning.errors import report_user_errors
from ups_lightning.training import command_overrides, run


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg, command_overrides())


if __name__ == "__main__":
    main()
