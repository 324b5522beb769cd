"""DataModules: frames for the autoencoder, and one LatentDataModule for every latent stage."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from ups_lightning.data.cache import LatentCache
from ups_lightning.data.contract import DataContract
from ups_lightning.data.pdebench import DatasetView, Normalizer, open_dataset, split_options
from ups_lightning.errors import UserError
from ups_lightning.pdes import get_pde

log = logging.getLogger(__name__)


def _positive_int(name: str, value: Any, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"setting data.{name}={value!r} must be an integer >= 1: {why}.")
    return int(value)


def check_frames(view: Any, initial_step: Any) -> int:
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


def resolve_params(meta: Any, configured: Any, where: str) -> Dict[str, float]:
    """The equation's parameters for a file: what the file states (attributes or PDEBench's file
    name); the configured ``data.params`` only for ones it does not state (said in the log). A
    configured value is checked even when unused: a typo must not hide."""
    spec = get_pde(meta.pde)
    configured = dict(configured or {})
    unknown = sorted(set(configured) - set(spec.param_names))
    if unknown:
        raise UserError(f"setting {where}.params has {', '.join(unknown)}, which "
                        f"{'is' if len(unknown) == 1 else 'are'} not a parameter of {spec.name} "
                        f"({spec.equation}); its parameters are {', '.join(spec.param_names)}.")
    for k, v in configured.items():
        if v is not None:    # null: not set (the file must state it)
            spec.parameter(k).check(v, f"setting {where}.params.{k}")
    params = {}
    for p in spec.params:
        if p.name in meta.params:
            params[p.name] = float(meta.params[p.name])
        elif configured.get(p.name) is not None:
            params[p.name] = float(configured[p.name])
            log.warning("%s states no %s (no %s attribute, not in its name): using %s.params.%s=%g",
                        meta.path, p.name, "/".join(p.attrs), where, p.name, params[p.name])
        else:
            raise UserError(f"{meta.path} states no {p.name} ({p.doc}): no {'/'.join(p.attrs)} "
                            f"attribute and no {p.filename_key}<value> in its name. Set {where}."
                            f"params.{p.name} to the value the file was made with.")
    return params


def unit_coords(view: Any) -> torch.Tensor:
    """Cell centres mapped to [0, 1): what every model sees, whatever the file's domain; (X,) in 1D,
    (X, Y, 2) in 2D (``meta.xi``)."""
    return torch.from_numpy(np.ascontiguousarray(view.meta.xi, dtype=np.float32))


def _open_member(data_cfg: Any, where: str) -> DatasetView:
    why = {"n_train": "training needs at least one trajectory",
           "n_val": "training validates every stage on the val split",
           "n_test": "evaluation scores the test split"}
    counts = {k: _positive_int(k, getattr(data_cfg, k), w) for k, w in why.items()}
    return open_dataset(data_cfg.path, **counts, reduced_resolution=data_cfg.reduced_resolution,
                        reduced_resolution_t=data_cfg.reduced_resolution_t, pde=data_cfg.pde,
                        **split_options(data_cfg))


def _pooled(norms: list, counts: list, n_channels: int) -> Normalizer:
    """One per-channel normaliser over several training splits (exact pooled mean and std); channel k
    pools the members that have a field k (a masked layout: DataContract)."""
    mean, std = np.zeros(n_channels), np.ones(n_channels)
    for k in range(n_channels):
        have = [(n, c) for n, c in zip(norms, counts) if k < n.mean.size]
        c = np.asarray([c for _, c in have], dtype=np.float64)
        means = np.asarray([n.mean[k] for n, _ in have])
        var = np.asarray([n.std[k] for n, _ in have]) ** 2
        mean[k] = (c * means).sum() / c.sum()
        sd = np.sqrt((c * (var + (means - mean[k]) ** 2)).sum() / c.sum())
        std[k] = sd if sd > 0 else 1.0
    return Normalizer(mean, std)


class RunData:
    """The data of a training run: one file, or the member files of a mixed data config (one per
    equation, on the same grid and frames). Reads splits as one array, with a conditioning vector
    per trajectory (``DataContract.conditioning``) and one normaliser over all training splits. Members
    with fewer fields than the most have their absent channels filled with the channel's mean (the
    masked layout of ``DataContract``)."""

    def __init__(self, members: Dict[str, DatasetView], params: Dict[str, Dict[str, float]]) -> None:
        self.members, self.params = members, params
        views = list(members.values())
        first = views[0]
        def grid(m: Any) -> str:
            return f"{' x '.join(map(str, m.spatial_shape))} cells x {m.n_t} frames x {m.n_channels} channel(s)"

        for v in views[1:]:
            if (v.meta.spatial_shape, v.meta.n_t) != (first.meta.spatial_shape, first.meta.n_t):
                raise UserError(f"mixed data: {v.path} has {grid(v.meta)} after reduction, {first.path} has "
                                f"{grid(first.meta)}; one model needs one grid: set the members' "
                                f"reduced_resolution(_t) to match.")
        self.meta = first.meta
        self.path = " + ".join(v.path for v in views)
        fields = tuple(int(v.meta.n_channels) for v in views)
        self.contract = DataContract(tuple(members), tuple(first.meta.spatial_shape), max(fields), fields)
        self.normalizer = first.normalizer if len(views) == 1 else _pooled(
            [v.normalizer for v in views], [v.sizes()["train"] for v in views], self.contract.n_channels)
        self.splits = {s: np.arange(sum(v.sizes()[s] for v in views)) for s in views[0].splits}

    @property
    def views(self) -> list:
        return list(self.members.values())

    def read(self, split: str) -> np.ndarray:
        return np.concatenate([self._filled(v.read(split)) for v in self.views])

    def _filled(self, rows: np.ndarray) -> np.ndarray:
        """A member's rows with its absent channels (masked layout) set to the channel's mean."""
        C, have = self.contract.n_channels, rows.shape[-1]
        if have == C:
            return rows
        fill = np.broadcast_to(self.normalizer.mean[have:].astype(rows.dtype), (*rows.shape[:-1], C - have))
        return np.concatenate([rows, fill], axis=-1)

    def cond(self, split: str) -> torch.Tensor:
        """(rows of the split, cond_dim): each trajectory's conditioning vector."""
        rows = [self.contract.conditioning(pde, self.params[pde], v.meta.dt).expand(v.sizes()[split], -1)
                for pde, v in self.members.items()]
        return torch.cat(rows)

    def sizes(self) -> Dict[str, int]:
        return {s: int(v.size) for s, v in self.splits.items()}


def member_configs(data_cfg: Any) -> Dict[str, Any]:
    """A data config's files by equation: its ``members`` (a mixed config) or itself."""
    members = getattr(data_cfg, "members", None)
    if not members:
        return {data_cfg.pde: data_cfg}
    out = {}
    for key, member in members.items():
        if member.pde in out:
            raise UserError(f"data.members: two members ({key} and another) hold {member.pde}; a "
                            f"mixed run takes one file per equation.")
        out[member.pde] = member
    return out


def open_run_data(data_cfg: Any) -> RunData:
    """The files of a training or evaluation run, each split non-empty (training validates on `val`,
    evaluation scores `test`), the parameters resolved, enough frames for `initial_step`."""
    members, params = {}, {}
    for pde, member in member_configs(data_cfg).items():
        where = "data" if member is data_cfg else f"data.members.{member.name}"
        view = _open_member(member, where)
        if view.pde != pde:
            raise UserError(f"{view.path} holds {view.pde} data but {where}.pde={pde}.")
        members[pde], params[pde] = view, resolve_params(view.meta, getattr(member, "params", None), where)
        initial_step = getattr(data_cfg, "initial_step", None)
        if initial_step is not None:
            check_frames(view, initial_step)
    return RunData(members, params)


def evenly_spaced(n_total: int, n_pick: int) -> np.ndarray:
    n_pick = max(1, min(n_total, n_pick))
    return np.unique(np.linspace(0, n_total - 1, n_pick).round().astype(int))


class FrameDataModule(L.LightningDataModule):
    """Single frames (*space, C), normalised, for the autoencoder. Validation uses `val_frames` evenly
    spaced frames of each validation trajectory."""

    def __init__(self, data_cfg: Any, batch_size: int, val_frames: int = 8) -> None:
        super().__init__()
        self.data_cfg = data_cfg
        self.batch_size = batch_size
        self.val_frames = val_frames
        self.view: Optional[RunData] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.view is not None:
            return
        self.view = open_run_data(self.data_cfg)
        norm = self.view.normalizer
        train = torch.from_numpy(norm.normalize(self.view.read("train"))).float()
        val = torch.from_numpy(norm.normalize(self.view.read("val"))).float()
        val = val[:, evenly_spaced(val.shape[1], self.val_frames)]
        self.train_frames = {"u": train.reshape(-1, *train.shape[2:])}
        self.val_frames_t = {"u": val.reshape(-1, *val.shape[2:])}
        if self.view.contract.masked:   # each frame's conditioning names its equation, hence its fields
            self.train_frames["cond"] = self.view.cond("train").repeat_interleave(train.shape[1], 0)
            self.val_frames_t["cond"] = self.view.cond("val").repeat_interleave(val.shape[1], 0)
        self.x = unit_coords(self.view)

    def _loader(self, frames: Dict[str, torch.Tensor], shuffle: bool) -> DataLoader:
        n = len(frames["u"])
        return DataLoader(
            _TensorItems(frames), batch_size=self.batch_size, sampler=_sampler(n, shuffle),
            generator=_own_generator(), num_workers=self.data_cfg.num_workers, collate_fn=_as_batch,
            drop_last=shuffle and n > self.batch_size,
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
    """Rows of in-memory tensors. A batch is indexed from them in one call (``__getitems__``, which
    torch's DataLoader prefers to per-item reads + collation): the same batch, several times cheaper."""

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list) -> Dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}


class _Windows(Dataset):
    """Windows of `steps + 1` consecutive frames (latent and physical) starting at the given times,
    with their trajectory's conditioning vector; a batch is one ``index_select`` of whole frames per
    tensor (``__getitems__``), not a stack of per-window slices."""

    def __init__(self, z: torch.Tensor, u: torch.Tensor, cond: torch.Tensor, starts: np.ndarray,
                 steps: int) -> None:
        self.z, self.u, self.cond, self.steps = z, u, cond, steps
        starts = torch.as_tensor(np.asarray(starts, dtype=np.int64))
        self.traj = torch.arange(z.shape[0]).repeat_interleave(len(starts))   # window k: trajectory ...
        self.start = starts.repeat(z.shape[0])                                # ... and first frame
        self.offsets = torch.arange(steps + 1)

    def __len__(self) -> int:
        return len(self.traj)

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        i, t = int(self.traj[k]), int(self.start[k])
        sl = slice(t, t + self.steps + 1)
        return {"z": self.z[i, sl], "u": self.u[i, sl], "cond": self.cond[i]}

    def __getitems__(self, ks: list) -> Dict[str, torch.Tensor]:
        ks = torch.as_tensor(ks, dtype=torch.long)
        i = self.traj[ks]
        flat = (i * self.z.shape[1] + self.start[ks])[:, None] + self.offsets   # (B, steps + 1) frame rows
        return {"z": _rows(self.z, flat), "u": _rows(self.u, flat), "cond": self.cond.index_select(0, i)}


def _rows(a: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``a (n, T, ...)`` at the frames ``flat (B, S)`` of ``a.flatten(0, 1)`` -> ``(B, S, ...)``
    (index_select copies whole frames: several times faster than 2-index advanced indexing)."""
    return a.flatten(0, 1).index_select(0, flat.reshape(-1)).view(*flat.shape, *a.shape[2:])


def _as_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """collate_fn of the datasets above: ``__getitems__`` already returns the batch."""
    return batch


class LatentDataModule(L.LightningDataModule):
    """Serves every latent stage from the latent cache: training windows (z_t .. z_t+steps) for
    one-step or multi-step losses, validation pairs (z_t, z_t+1) with the physical frames beside them
    so that each stage can report a decoded, physical-space figure."""

    def __init__(self, cache: LatentCache, cond: Dict[str, torch.Tensor], batch_size: int, steps: int = 1,
                 val_pairs: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        if steps < 1 or steps >= cache.n_t:
            raise ValueError(f"window of {steps} steps does not fit {cache.n_t} frames")
        self.cache, self.cond, self.batch_size, self.steps = cache, cond, batch_size, steps
        self.val_pairs, self.num_workers = val_pairs, num_workers

    def train_dataloader(self, shuffle: bool = True) -> DataLoader:
        starts = np.arange(self.cache.n_t - self.steps)
        ds = _Windows(self.cache.z["train"], self.cache.u["train"], self.cond["train"], starts, self.steps)
        return DataLoader(ds, batch_size=self.batch_size, sampler=_sampler(len(ds), shuffle),
                          generator=_own_generator(), num_workers=self.num_workers, collate_fn=_as_batch,
                          drop_last=shuffle and len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        starts = evenly_spaced(self.cache.n_t - 1, self.val_pairs)
        ds = _Windows(self.cache.z["val"], self.cache.u["val"], self.cond["val"], starts, 1)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=_as_batch)
