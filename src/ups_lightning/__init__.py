"""ups_lightning: a Lightning + Hydra trainer for staged latent neural PDE surrogates."""

__version__ = "0.1.0"
