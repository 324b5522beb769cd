"""ups_lightning: a Lightning + Hydra trainer for staged latent neural PDE surrogates."""
from pathlib import Path

__version__ = "0.1.0"

# The Hydra configs ship inside the package (`pkg://ups_lightning.conf`), so an installed wheel
# finds them; the checkout's top-level `conf/` is a link to this directory.
CONF_DIR = Path(__file__).resolve().parent / "conf"
