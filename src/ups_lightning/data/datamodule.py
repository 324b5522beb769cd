"""DataModules: frames for the autoencoder, and one LatentDataModule for every latent stage."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from ups_lightning.data.cache import LatentCache
from ups_lightning.data.pdebench import DatasetView, check_nu, open_dataset
from ups_lightning.errors import UserError

# Conditioning scales: cond = [dt / DT_REF, log10(nu) - LOG_NU_REF] keeps both entries O(1).
DT_REF = 0.05
LOG_NU_REF = -3.0


def _positive_int(name: str, value: Any, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"setting data.{name}={value!r} must be an integer >= 1: {why}.")
    return int(value)


def check_frames(view: DatasetView, initial_step: Any) -> int:
    """Refuse a file too short for ``initial_step`` given frames plus at least one to predict
    (training would otherwise run every stage on windows that do not exist). ``view``: anything
    with ``.path`` and a ``.meta`` FieldMeta (a DatasetView, evaluate's EvalData). Returns the step."""
    k = _positive_int("initial_step", initial_step, "it is the number of given frames")
    m = view.meta
    if m.n_t < k + 1:
        file_frames = (m.n_t - 1) * m.reduced_resolution_t + 1
        raise UserError(f"{view.path}: {m.n_t} frame(s) after reduced_resolution_t="
                        f"{m.reduced_resolution_t} ({file_frames} in the file), but "
                        f"data.initial_step={k} needs at least {k + 1}: the first {k} frames are "
                        f"given and at least one must be left to predict. Lower data.initial_step "
                        f"or data.reduced_resolution_t, or use a file with more frames.")
    return k


def open_view(data_cfg: Any) -> DatasetView:
    """The data file of a training or evaluation run: every split non-empty (training validates on
    `val`, evaluation scores `test`) and, when the config has `initial_step`, enough frames."""
    why = {"n_train": "training needs at least one trajectory",
           "n_val": "training validates every stage on the val split",
           "n_test": "evaluation scores the test split"}
    counts = {k: _positive_int(k, getattr(data_cfg, k), w) for k, w in why.items()}
    view = open_dataset(
        data_cfg.path,
        **counts,
        reduced_resolution=data_cfg.reduced_resolution,
        reduced_resolution_t=data_cfg.reduced_resolution_t,
        pde=data_cfg.pde,
    )
    initial_step = getattr(data_cfg, "initial_step", None)
    if initial_step is not None:
        check_frames(view, initial_step)
    return view


def unit_coords(view: DatasetView) -> torch.Tensor:
    """Cell centres mapped to [0, 1): what every model sees, whatever the file's domain."""
    x = (np.asarray(view.meta.x, dtype=np.float64) - view.meta.x_left) / view.meta.domain_length
    return torch.from_numpy(x).float()


def file_nu(view: DatasetView, configured: Any) -> float:
    """The file's `Nu` attribute (checked by the reader); the configured `data.nu` only for a file
    that carries none. A configured value is checked even when unused: a typo must not hide."""
    if configured is not None:
        configured = check_nu(configured, "setting data.nu")
    if view.meta.nu is not None:
        return float(view.meta.nu)
    if configured is None:
        raise UserError(f"{view.path} has no 'Nu' attribute and data.nu is not set: set data.nu "
                        f"to the viscosity the file was made with (e.g. data.nu=0.001).")
    return configured


def conditioning(view: DatasetView, nu: float) -> torch.Tensor:
    """(2,) conditioning vector from the file's own frame step and the viscosity."""
    nu = check_nu(nu, f"viscosity for {view.path}")
    dt = view.meta.dt
    if not (math.isfinite(dt) and dt > 0):
        raise UserError(f"{view.path}: frame step dt={dt} (from {view.meta.n_t} frame(s)); need at "
                        f"least 2 evenly spaced frames to condition on the time step.")
    return torch.tensor([dt / DT_REF, math.log10(nu) - LOG_NU_REF], dtype=torch.float32)


def evenly_spaced(n_total: int, n_pick: int) -> np.ndarray:
    n_pick = max(1, min(n_total, n_pick))
    return np.unique(np.linspace(0, n_total - 1, n_pick).round().astype(int))


class FrameDataModule(L.LightningDataModule):
    """Single frames (X, C), normalised, for the autoencoder. Validation uses `val_frames` evenly
    spaced frames of each validation trajectory."""

    def __init__(self, data_cfg: Any, batch_size: int, val_frames: int = 8) -> None:
        super().__init__()
        self.data_cfg = data_cfg
        self.batch_size = batch_size
        self.val_frames = val_frames
        self.view: Optional[DatasetView] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.view is not None:
            return
        self.view = open_view(self.data_cfg)
        norm = self.view.normalizer
        train = torch.from_numpy(norm.normalize(self.view.read("train"))).float()
        val = torch.from_numpy(norm.normalize(self.view.read("val"))).float()
        val = val[:, evenly_spaced(val.shape[1], self.val_frames)]
        self.train_frames = train.reshape(-1, *train.shape[2:])
        self.val_frames_t = val.reshape(-1, *val.shape[2:])
        self.x = unit_coords(self.view)

    def _loader(self, frames: torch.Tensor, shuffle: bool) -> DataLoader:
        return DataLoader(
            _TensorItems({"u": frames}), batch_size=self.batch_size, sampler=_sampler(len(frames), shuffle),
            generator=_own_generator(), num_workers=self.data_cfg.num_workers, drop_last=shuffle and len(frames) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_frames, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_frames_t, shuffle=False)


class EpochShuffle(Sampler):
    """A random order that is a function of (seed, epoch) alone (Lightning calls `set_epoch`), not of
    the global RNG's history: a stage resumed from a checkpoint shuffles its next epochs exactly as
    the uninterrupted stage does. The seed is torch's, as set by the stage's seed_everything."""

    def __init__(self, n: int, seed: Optional[int] = None) -> None:
        self.n, self.seed, self.epoch = n, torch.initial_seed() if seed is None else seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _sampler(n: int, shuffle: bool) -> Sampler:
    return EpochShuffle(n) if shuffle else SequentialSampler(range(n))


def _own_generator() -> torch.Generator:
    """The loader's worker base seed comes from here, not from the global RNG, whose draws then
    belong to the training steps alone (what RNGState restores on resume)."""
    return torch.Generator().manual_seed(torch.initial_seed() % (2 ** 63))


class _TensorItems(Dataset):
    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class _Windows(Dataset):
    """Windows of `steps + 1` consecutive frames (latent and physical) starting at the given times."""

    def __init__(self, z: torch.Tensor, u: torch.Tensor, starts: np.ndarray, steps: int) -> None:
        self.z, self.u, self.steps = z, u, steps
        self.index = [(i, int(t)) for i in range(z.shape[0]) for t in starts]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        i, t = self.index[k]
        sl = slice(t, t + self.steps + 1)
        return {"z": self.z[i, sl], "u": self.u[i, sl]}


class LatentDataModule(L.LightningDataModule):
    """Serves every latent stage from the latent cache: training windows (z_t .. z_t+steps) for
    one-step or multi-step losses, validation pairs (z_t, z_t+1) with the physical frames beside them
    so that each stage can report a decoded, physical-space figure."""

    def __init__(self, cache: LatentCache, batch_size: int, steps: int = 1, val_pairs: int = 8,
                 num_workers: int = 0) -> None:
        super().__init__()
        if steps < 1 or steps >= cache.n_t:
            raise ValueError(f"window of {steps} steps does not fit {cache.n_t} frames")
        self.cache, self.batch_size, self.steps = cache, batch_size, steps
        self.val_pairs, self.num_workers = val_pairs, num_workers

    def train_dataloader(self, shuffle: bool = True) -> DataLoader:
        starts = np.arange(self.cache.n_t - self.steps)
        ds = _Windows(self.cache.z["train"], self.cache.u["train"], starts, self.steps)
        return DataLoader(ds, batch_size=self.batch_size, sampler=_sampler(len(ds), shuffle),
                          generator=_own_generator(), num_workers=self.num_workers, drop_last=shuffle and len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        starts = evenly_spaced(self.cache.n_t - 1, self.val_pairs)
        ds = _Windows(self.cache.z["val"], self.cache.u["val"], starts, 1)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
