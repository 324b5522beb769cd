"""The latent cache: every frame of every split encoded once by the frozen, trained encoder.

Keyed by a fingerprint of the encoder's weights, the data file and the reduction/split settings, so a
stale cache is never read (the earlier public implementation keyed on neither weights nor data), and
written atomically, so an interrupted write leaves no half cache. The file's sha256 sits in its
sidecar `.json` and is verified (with every tensor finite) before a cache is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ups_lightning.atomic import sha256_file
from ups_lightning.atomic import atomic_torch_save, atomic_write_json
from ups_lightning.errors import UserError

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


def data_fingerprint(data: Any) -> str:
    """Identity of the data as read: each file (path, size, mtime), the reduction and the splits
    (``data``: a DatasetView, or a RunData of one or several files)."""
    h = hashlib.sha256()
    for view in getattr(data, "views", [data]):
        st = Path(view.path).stat()
        h.update(str(Path(view.path).resolve()).encode())
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f"rr={view.meta.n_x}:{view.meta.n_t}:{view.meta.dx!r}:{view.meta.dt!r}".encode())
        if len(view.meta.spatial_shape) > 1:     # 2D: the other axis too (1D fingerprints unchanged)
            h.update(f"y={view.meta.n_y}:{view.meta.dy!r}".encode())
        for split in SPLITS:
            h.update(split.encode())
            h.update(np.asarray(view.splits[split], dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class LatentCache:
    """Encoded splits plus everything needed to go back to physical space."""

    z: Dict[str, torch.Tensor]       # split -> (n, T, N, D), normalised latents
    u: Dict[str, torch.Tensor]       # split -> (n, T, *space, C), normalised fields
    latent_mean: torch.Tensor        # (D,)
    latent_std: torch.Tensor         # (D,)
    fingerprint: str

    @property
    def n_t(self) -> int:
        return int(self.z["train"].shape[1])


def cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"latents-{fingerprint[:16]}.pt"


def _check_shapes(blob: Dict[str, Any], sizes: Dict[str, int]) -> None:
    """Every split holds its rows (``sizes``), latents and fields the same frames, the statistics
    one value per latent channel: a cache edited and re-signed is refused here, not mid-training."""
    dim = blob["latent_mean"].shape
    for split in SPLITS:
        z, u = blob["z"][split], blob["u"][split]
        if z.ndim < 3 or z.shape[0] != sizes.get(split, z.shape[0]) or u.shape[:2] != z.shape[:2] \
                or blob["latent_std"].shape != dim or tuple(dim) != tuple(z.shape[-1:]):
            raise ValueError(f"its {split} split holds latents {tuple(z.shape)} and fields {tuple(u.shape)} "
                             f"(statistics {tuple(dim)}), not {sizes.get(split)} rows of matching frames")


def _load_verified(path: Path, fingerprint: str, sizes: Optional[Dict[str, int]] = None) -> Optional[LatentCache]:
    """The cache at `path` if its bytes match the sha256 of its sidecar, every tensor is finite and
    the shapes fit the data (``sizes``: rows per split); else None (with the reason in the log), and
    the caller encodes it anew."""
    if not path.exists():
        return None
    try:
        sidecar = json.loads(path.with_suffix(".json").read_text())
        digest = sha256_file(path)
        if sidecar.get("sha256") != digest or sidecar.get("fingerprint") != fingerprint:
            raise ValueError("its bytes do not match the sha256 recorded beside it")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tensors = [*blob["z"].values(), *blob["u"].values(), blob["latent_mean"], blob["latent_std"]]
        if blob.get("fingerprint") != fingerprint or not all(torch.isfinite(t).all() for t in tensors):
            raise ValueError("it holds NaN/Inf or another fingerprint")
        _check_shapes(blob, sizes or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        log.warning("latent cache %s is not usable (%s): encoding it anew", path, exc)
        return None
    log.info("latent cache hit (verified): %s", path)
    return LatentCache(z=blob["z"], u=blob["u"], latent_mean=blob["latent_mean"],
                       latent_std=blob["latent_std"], fingerprint=fingerprint)


@torch.no_grad()
def build_or_load_latent_cache(
    autoencoder: torch.nn.Module,
    view: Any,
    x: torch.Tensor,
    cache_dir: Path,
    batch_frames: int = 256,
) -> LatentCache:
    """Load the cache for this (encoder, data) pair, or encode every frame of every split once."""
    fingerprint = hashlib.sha256(
        (module_fingerprint(autoencoder) + data_fingerprint(view)).encode()
    ).hexdigest()
    path = cache_path(cache_dir, fingerprint)
    cached = _load_verified(path, fingerprint, view.sizes())
    if cached is not None:
        return cached
    log.info("encoding every frame of every split into %s", path)
    was_training = autoencoder.training
    autoencoder.eval()
    z: Dict[str, torch.Tensor] = {}
    u: Dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    for split in SPLITS:
        fields = torch.from_numpy(view.normalizer.normalize(view.read(split))).float()
        n, t = fields.shape[:2]
        frames = fields.reshape(n * t, *fields.shape[2:])
        with torch.no_grad():   # the frozen encoder: no graph to keep
            chunks = [autoencoder.encode(frames[i : i + batch_frames], x)
                      for i in range(0, len(frames), batch_frames)]
        z[split] = torch.cat(chunks).reshape(n, t, *chunks[0].shape[1:])
        u[split] = fields
        log.info("latent cache: encoded %s (%d frames) after %.1f s", split, n * t, time.perf_counter() - start)
        if not torch.isfinite(z[split]).all():
            raise UserError(f"the trained encoder maps frames of the {split} split of {view.path} to NaN/Inf "
                            "latents, so no latent stage can train on them. Retrain the autoencoder stage "
                            "(e.g. with a lower stages.autoencoder.lr).")
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
    atomic_write_json(path.with_suffix(".json"), {
        "fingerprint": fingerprint, "data": str(view.path), "sha256": sha256_file(path),
        "shapes": {s: list(z[s].shape) for s in SPLITS},
    })
    log.info("latent cache: %s written in %.1f s", path, time.perf_counter() - start)
    return LatentCache(z=z, u=u, latent_mean=latent_mean, latent_std=latent_std, fingerprint=fingerprint)

