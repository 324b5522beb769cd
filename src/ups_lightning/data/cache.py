"""The latent cache: every frame of every split encoded once by the frozen, trained encoder.

Keyed by a fingerprint of the encoder's weights, the data file and the reduction/split settings, so a
stale cache is never read (the earlier public implementation keyed on neither weights nor data), and
written atomically, so an interrupted write leaves no half cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from ups_lightning.atomic import atomic_torch_save
from ups_lightning.data.pdebench import DatasetView

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(view: DatasetView) -> str:
    """Identity of the data as read: the file (path, size, mtime), the reduction and the splits."""
    st = Path(view.path).stat()
    h = hashlib.sha256()
    h.update(str(Path(view.path).resolve()).encode())
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"rr={view.meta.n_x}:{view.meta.n_t}:{view.meta.dx!r}:{view.meta.dt!r}".encode())
    for split in SPLITS:
        h.update(split.encode())
        h.update(np.asarray(view.splits[split], dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class LatentCache:
    """Encoded splits plus everything needed to go back to physical space."""

    z: Dict[str, torch.Tensor]       # split -> (n, T, N, D), normalised latents
    u: Dict[str, torch.Tensor]       # split -> (n, T, X, C), normalised fields
    latent_mean: torch.Tensor        # (D,)
    latent_std: torch.Tensor         # (D,)
    fingerprint: str

    @property
    def n_t(self) -> int:
        return int(self.z["train"].shape[1])


def cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"latents-{fingerprint[:16]}.pt"


@torch.no_grad()
def build_or_load_latent_cache(
    autoencoder: torch.nn.Module,
    view: DatasetView,
    x: torch.Tensor,
    cache_dir: Path,
    batch_frames: int = 512,
) -> LatentCache:
    """Load the cache for this (encoder, data) pair, or encode every frame of every split once."""
    fingerprint = hashlib.sha256(
        (module_fingerprint(autoencoder) + data_fingerprint(view)).encode()
    ).hexdigest()
    path = cache_path(cache_dir, fingerprint)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("fingerprint") == fingerprint:
            log.info("latent cache hit: %s", path)
            return LatentCache(
                z=blob["z"], u=blob["u"], latent_mean=blob["latent_mean"],
                latent_std=blob["latent_std"], fingerprint=fingerprint,
            )
    log.info("encoding every frame of every split into %s", path)
    was_training = autoencoder.training
    autoencoder.eval()
    z: Dict[str, torch.Tensor] = {}
    u: Dict[str, torch.Tensor] = {}
    for split in SPLITS:
        fields = torch.from_numpy(view.normalizer.normalize(view.read(split))).float()
        n, t = fields.shape[:2]
        frames = fields.reshape(n * t, *fields.shape[2:])
        chunks = [autoencoder.encode(frames[i : i + batch_frames], x) for i in range(0, len(frames), batch_frames)]
        z[split] = torch.cat(chunks).reshape(n, t, *chunks[0].shape[1:])
        u[split] = fields
    autoencoder.train(was_training)
    latent_mean = z["train"].mean(dim=(0, 1, 2))
    latent_std = z["train"].std(dim=(0, 1, 2)).clamp_min(1e-6)
    for split in SPLITS:
        z[split] = (z[split] - latent_mean) / latent_std
    blob = {
        "z": z, "u": u, "latent_mean": latent_mean, "latent_std": latent_std,
        "fingerprint": fingerprint,
    }
    atomic_torch_save(blob, path)
    (path.with_suffix(".json")).write_text(json.dumps({
        "fingerprint": fingerprint, "data": str(view.path),
        "shapes": {s: list(z[s].shape) for s in SPLITS},
    }, indent=2))
    return LatentCache(z=z, u=u, latent_mean=latent_mean, latent_std=latent_std, fingerprint=fingerprint)

