"""`python -m ups_lightning.data.generate data=NAME [workers=2] [force=true]`, or one file:
`python -m ups_lightning.data.generate data=NAME out=FILE n_samples=N nx=X nt=T t_max=S seed=K [<param>=<value> ...]`

The command line of ``ups_lightning.data.generation.run`` (settings: ``conf/generate.yaml``). Ctrl-C
and a scheduler's SIGTERM unwind: the temporary file is removed and the target left untouched.
"""
from __future__ import annotations

import signal
import sys

from ups_lightning.data.generation import on_signal, run
from ups_lightning.errors import report_user_errors


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path="pkg://ups_lightning.conf", config_name="generate")
    @report_user_errors
    def _main(cfg: DictConfig) -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            run(cfg)
        except KeyboardInterrupt:
            print("interrupted: the target was not touched and the temporary file was removed.",
                  file=sys.stderr, flush=True)
            sys.exit(130)

    _main()


if __name__ == "__main__":
    main()
    sys.exit(0)
