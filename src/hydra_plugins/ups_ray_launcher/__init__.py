"""`hydra/launcher=ray`: each job of a multirun as a Ray task (ray_launcher.py)."""
