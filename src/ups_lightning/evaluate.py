"""`python -m ups_lightning.evaluate run_dir=DIR [data.path=FILE] [split=test] [ttc=off|default|lookahead]`

The command line of ``ups_lightning.evaluation.evaluate``: Hydra composes the config, the library
scores the run.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ups_lightning.errors import report_user_errors


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="evaluate", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from ups_lightning.evaluation import evaluate   # imported when a command runs (fast completion)

    evaluate(cfg)


if __name__ == "__main__":
    main()
