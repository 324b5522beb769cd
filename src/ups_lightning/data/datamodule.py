"""DataModules: frames for the autoencoder, and one LatentDataModule for every latent stage."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ups_lightning.data.cache import LatentCache
from ups_lightning.data.pdebench import DatasetView, open_dataset

# Conditioning scales: cond = [dt / DT_REF, log10(nu) - LOG_NU_REF] keeps both entries O(1).
DT_REF = 0.05
LOG_NU_REF = -3.0


def open_view(data_cfg: Any) -> DatasetView:
    return open_dataset(
        data_cfg.path,
        n_train=data_cfg.n_train,
        n_val=data_cfg.n_val,
        n_test=data_cfg.n_test,
        reduced_resolution=data_cfg.reduced_resolution,
        reduced_resolution_t=data_cfg.reduced_resolution_t,
        pde=data_cfg.pde,
    )


def unit_coords(view: DatasetView) -> torch.Tensor:
    """Cell centres mapped to [0, 1): what every model sees, whatever the file's domain."""
    x = (np.asarray(view.meta.x, dtype=np.float64) - view.meta.x_left) / view.meta.domain_length
    return torch.from_numpy(x).float()


def file_nu(view: DatasetView, configured: float) -> float:
    """The file's `Nu` attribute; the configured `data.nu` only for a file that carries none."""
    return float(view.meta.nu) if view.meta.nu is not None else float(configured)


def conditioning(view: DatasetView, nu: float) -> torch.Tensor:
    """(2,) conditioning vector from the file's own frame step and the viscosity."""
    return torch.tensor([view.meta.dt / DT_REF, math.log10(nu) - LOG_NU_REF], dtype=torch.float32)


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
            _TensorItems({"u": frames}), batch_size=self.batch_size, shuffle=shuffle,
            num_workers=self.data_cfg.num_workers, drop_last=shuffle and len(frames) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_frames, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_frames_t, shuffle=False)


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
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        starts = evenly_spaced(self.cache.n_t - 1, self.val_pairs)
        ds = _Windows(self.cache.z["val"], self.cache.u["val"], starts, 1)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
