"""Evaluation metrics in physical space (benchmark.md section 3).

Every function here takes decoded, de-normalised fields. **Layout**: ``(batch, time, *spatial,
channels)`` with one or two spatial axes, ``(B, T, X, C)`` or ``(B, T, H, W, C)``: the last axis is
always the channel axis, any channel count. 1D fields may omit it, ``(B, T, X)`` (one channel), as
before; 2D fields must carry it (a 4-dim array is read as 1D with channels). Ensembles put the member
axis first: ``(members, batch, time, *spatial[, channels])``. ``pred`` and ``true`` hold the
*predicted* frames only (for the PDEBench protocol: frames 10..40, so index 0 is the first predicted
frame, k = 1).

With ``e = pred - true`` and, for sample ``b``, frame ``t`` and channel ``c``, ``mean_x`` the mean over
all spatial cells (``x`` in 1D, ``(x, y)`` in 2D):

- ``nrmse``  = mean_{b,t,c} sqrt(mean_x e^2) / sqrt(mean_x true^2)                     (headline)
- ``rmse``   = mean_{b,t,c} sqrt(mean_x e^2)
- ``crmse``  = mean_{t,c} sqrt(mean_b (mean_x e)^2)
- ``brmse``  = mean_{b,t,c} sqrt(mean over the boundary cells of e^2): 1D the two end cells,
  (e[x_0]^2 + e[x_last]^2) / 2; 2D the four edges, sum of e^2 over the rows x_0, x_last and the
  columns y_0, y_last divided by 2 nx + 2 ny (corners counted on both edges, as PDEBench does)
- ``max_err``= max_{b,t,x,c} |e|                     (a true maximum over all samples)
- ``frmse_<band>`` = mean_{t,c} (1/|band|) sum_{k in band} sqrt(mean_b |E_k|^2) * prod(L / n)
  with, in 1D, ``E_k = rfft_x(e)`` (unnormalised, k = 0 .. nx//2), L the domain length; in 2D,
  PDEBench's radial bins: ``|E_k|^2`` = sum of ``|fft2(e)[i, j]|^2`` over 0 <= i < nx//2,
  0 <= j < ny//2 with floor(sqrt(i^2 + j^2)) = k, k = 0 .. min(nx, ny)//2 - 1 (PDEBench reads one
  quadrant of the spectrum only), scaled by Lx Ly / (nx ny). Bands low = [0, 4), mid = [4, 12),
  high = [12, kmax] (an empty band gives NaN).

These are PDEBench's definitions (``pdebench/models/metrics.py``, ``metric_func``) with the batch
reductions taken over the whole test set at once: PDEBench forms cRMSE and fRMSE as an RMS over the
samples of one loader batch and then averages those per-batch figures dividing by ``n_batches - 1``,
and sums per-batch max errors. Here the RMS runs over *all* samples (what PDEBench gives with one
batch holding the whole test set), every mean is exact, and the max error is a maximum. All
reductions are computed from sums (``_rollout_sums``), so :class:`RolloutMetrics` (batched, DDP)
and :func:`pdebench_metrics` (one call) agree to round-off.

**One nRMSE.** :func:`relative_l2` is the only implementation of the relative L2 error
sqrt(mean e^2) / sqrt(mean true^2); every nRMSE here is a reduction of it: :func:`sample_nrmse` (per
sample over all but the batch axis, the training-time validation figure), :func:`frame_nrmse` (per
sample, frame and channel, input dtype kept), :func:`nrmse_per_frame`, :func:`nrmse_per_channel`,
the ``nrmse`` of :func:`pdebench_metrics` / :class:`RolloutMetrics`, and the FNO peer's validation.

**2D.** Every metric accepts 2D fields. Extended: ``brmse`` (four edges), ``frmse_*`` (radial bins,
above), ``tv_increase`` (periodic TV summed over both axes), ``spectral_energy_error`` (isotropic
shell spectrum, see its doc); the others reduce over all spatial cells. None refuses 2D.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence, Tuple, Union

import torch
import torchmetrics
from torch import Tensor

__all__ = [
    "FRMSE_BANDS",
    "relative_l2",
    "sample_nrmse",
    "frame_nrmse",
    "pdebench_metrics",
    "nrmse_per_frame",
    "nrmse_per_channel",
    "nrmse_at",
    "nrmse_pdebench",
    "mass_drift",
    "energy_increase",
    "tv_increase",
    "spectral_energy_error",
    "correlation_horizon",
    "crps_ensemble",
    "spread_skill_ratio",
    "ensemble_levels",
    "nearest_level",
    "interval_coverage",
    "coverage_curve",
    "coverage",
    "ece_coverage",
    "RolloutMetrics",
    "all_metrics",
]

#: Fourier bands of the fRMSE (PDEBench's iLow = 4, iHigh = 12); the high band runs to the last
#: wavenumber (nx // 2 in 1D, min(nx, ny) // 2 - 1 in 2D).
FRMSE_BANDS: dict[str, tuple[int, int | None]] = {"low": (0, 4), "mid": (4, 12), "high": (12, None)}

PDEBENCH_KEYS = ("nrmse", "rmse", "crmse", "brmse", "max_err", "frmse_low", "frmse_mid", "frmse_high")

#: A domain length per spatial axis, or one for all axes.
DomainLength = Union[float, Sequence[float]]


# --------------------------------------------------------------------------------------------
# the one nRMSE
# --------------------------------------------------------------------------------------------
def relative_l2(pred: Tensor, true: Tensor, dims: Sequence[int], eps: float = 0.0) -> Tensor:
    """The nRMSE kernel, ``sqrt(mean_dims (pred - true)^2) / sqrt(mean_dims true^2)``, reduced over
    ``dims`` only (any layout, input dtype and device kept, differentiable). With ``eps > 0`` the
    denominator is clamped to at least ``eps`` (a zero truth then gives a large finite figure
    instead of inf / NaN); ``eps = 0`` leaves it as is."""
    dims = tuple(dims)
    err = (pred - true).pow(2).mean(dim=dims).sqrt()
    nrm = true.pow(2).mean(dim=dims).sqrt()
    return err / (nrm.clamp_min(eps) if eps > 0 else nrm)


def sample_nrmse(pred: Tensor, true: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-sample relative L2 error over all but the batch axis, ``(B,)``: sqrt(mean e^2) /
    sqrt(mean true^2) over every frame, cell and channel of a sample together (the denominator
    clamped to ``eps``). The training-time validation figure; any layout ``(B, ...)``."""
    if pred.shape != true.shape:
        raise ValueError(f"sample_nrmse: pred and true shapes differ: {tuple(pred.shape)} vs {tuple(true.shape)}")
    return relative_l2(pred, true, dims=tuple(range(1, pred.dim())), eps=eps)


def frame_nrmse(pred: Tensor, true: Tensor) -> Tensor:
    """nRMSE per sample, frame and channel, ``(B, T, C)`` (``C = 1`` for ``(B, T, X)`` input), in the
    input dtype: sqrt(mean_x e^2) / sqrt(mean_x true^2) over the spatial cells. The figure every
    PDEBench-style nRMSE averages (:func:`nrmse_per_frame`, :func:`nrmse_per_channel`, ``nrmse``)."""
    p, t = _check_layout(pred, "pred"), _check_layout(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return relative_l2(p, t, dims=_spatial_axes(p))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_layout(u: Tensor, name: str = "field") -> Tensor:
    """(B, T, X) -> (B, T, X, 1); (B, T, X, C) and (B, T, H, W, C) as they are (dtype kept)."""
    if not isinstance(u, Tensor):
        u = torch.as_tensor(u)
    if u.dim() == 3:
        u = u.unsqueeze(-1)
    if u.dim() not in (4, 5):
        raise ValueError(f"{name}: expected (batch, time, x[, channels]) or (batch, time, x, y, channels), "
                         f"got shape {tuple(u.shape)}")
    return u


def _spatial_axes(u: Tensor) -> Tuple[int, ...]:
    """Spatial axes of a (B, T, *S, C) field: (2,) in 1D, (2, 3) in 2D."""
    return tuple(range(2, u.dim() - 1))


def _as_field(u: Tensor, name: str = "field") -> Tensor:
    """(B, T, X), (B, T, X, C) or (B, T, H, W, C) -> (B, T, *S, C) float64, detached."""
    return _check_layout(u, name).detach().to(torch.float64)


def _pair(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    p, t = _as_field(pred, "pred"), _as_field(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t.to(p.device)


def _as_frame(u0: Tensor, like: Tensor) -> Tensor:
    """An initial frame (B, *S, C) (1D also (B, X)), or already (B, 1, *S, C), -> (B, 1, *S, C)
    float64 on like's device, ``like`` a (B, T, *S, C) field."""
    u0 = torch.as_tensor(u0).detach().to(torch.float64).to(like.device)
    if like.dim() == 4 and u0.dim() == 2:  # 1D frame without its channel axis
        u0 = u0.unsqueeze(-1)
    if u0.dim() == like.dim() - 1:
        u0 = u0.unsqueeze(1)
    if u0.dim() != like.dim() or u0.shape[1] != 1 or u0.shape[2:] != like.shape[2:]:
        raise ValueError(f"u0: expected one frame (batch, *spatial, channels) matching the fields "
                         f"{tuple(like.shape)}, got shape {tuple(torch.as_tensor(u0).shape)}")
    return u0


def _with_initial(pred: Tensor, u0: Tensor | None) -> Tensor:
    p = _as_field(pred, "pred")
    if u0 is None:
        return p
    return torch.cat([_as_frame(u0, p), p], dim=1)


def _lengths(domain_length: DomainLength, n_dims: int) -> Tuple[float, ...]:
    if isinstance(domain_length, (int, float)):
        return (float(domain_length),) * n_dims
    L = tuple(float(v) for v in domain_length)
    if len(L) != n_dims:
        raise ValueError(f"domain_length {domain_length!r}: need one length or {n_dims}")
    return L


@lru_cache(maxsize=16)
def _radial_bins(nx: int, ny: int) -> Tuple[Tensor, Tensor, int]:
    """PDEBench's 2D fRMSE bins: for the cells (i, j), 0 <= i < nx//2, 0 <= j < ny//2 (flattened
    row-major), the bin floor(sqrt(i^2 + j^2)); the cells with a bin < K = min(nx, ny)//2 are kept.
    Returns (flat cell indices kept, their bins, K)."""
    K = min(nx // 2, ny // 2)
    cells, bins = [], []
    for i in range(nx // 2):
        for j in range(ny // 2):
            k = math.isqrt(i * i + j * j)
            if k < K:
                cells.append(i * (ny // 2) + j)
                bins.append(k)
    return torch.tensor(cells, dtype=torch.long), torch.tensor(bins, dtype=torch.long), K


def _n_freq_bins(spatial: Sequence[int]) -> int:
    """Wavenumbers of the fRMSE: nx//2 + 1 in 1D, min(nx, ny)//2 in 2D."""
    return spatial[0] // 2 + 1 if len(spatial) == 1 else min(spatial[0] // 2, spatial[1] // 2)


def _error_spectrum(e: Tensor) -> Tensor:
    """Sum over the batch of the error power per fRMSE wavenumber, (T, C, K) (module doc)."""
    if e.dim() == 4:
        spec = torch.fft.rfft(e, dim=2).abs().pow(2)  # (B, T, K, C)
        return spec.sum(0).transpose(1, 2)  # (T, C, K)
    B, T, nx, ny, C = e.shape
    cells, bins, K = _radial_bins(nx, ny)
    q = torch.fft.fftn(e, dim=(2, 3))[:, :, : nx // 2, : ny // 2].abs().pow(2).sum(0)  # (T, nx/2, ny/2, C)
    q = q.reshape(T, -1, C)[:, cells.to(e.device)]
    out = torch.zeros(T, K, C, dtype=q.dtype, device=q.device).index_add_(1, bins.to(e.device), q)
    return out.transpose(1, 2)  # (T, C, K)


def _boundary_rms(e: Tensor) -> Tensor:
    """Per sample, frame and channel RMS of the error over the boundary cells, (B, T, C)."""
    if e.dim() == 4:
        return ((e[:, :, 0] ** 2 + e[:, :, -1] ** 2) / 2.0).sqrt()
    nx, ny = e.shape[2], e.shape[3]
    rows = (e[:, :, 0] ** 2 + e[:, :, -1] ** 2).sum(2)  # x edges, summed over y: (B, T, C)
    cols = (e[:, :, :, 0] ** 2 + e[:, :, :, -1] ** 2).sum(2)  # y edges, summed over x
    return ((rows + cols) / (2 * nx + 2 * ny)).sqrt()


# --------------------------------------------------------------------------------------------
# PDEBench metrics, from exact sums
# --------------------------------------------------------------------------------------------
def _rollout_sums(pred: Tensor, true: Tensor) -> dict[str, Tensor]:
    """Sums over the batch from which every PDEBench metric is finished (see module doc).

    Shapes: ``nrmse/rmse/brmse/csq``: (T, C); ``fsq``: (T, C, K) (K wavenumbers, module doc);
    ``max_err`` and ``count``: scalars."""
    p, t = _pair(pred, true)
    e = p - t
    sd = _spatial_axes(p)
    err_l2 = e.pow(2).mean(dim=sd).sqrt()  # (B, T, C)
    return {
        "nrmse": relative_l2(p, t, sd).sum(0),
        "rmse": err_l2.sum(0),
        "brmse": _boundary_rms(e).sum(0),
        "csq": e.mean(dim=sd).pow(2).sum(0),
        "fsq": _error_spectrum(e),  # (T, C, K)
        "max_err": e.abs().max() if e.numel() else torch.zeros((), dtype=torch.float64),
        "count": torch.tensor(float(e.shape[0]), dtype=torch.float64),
    }


def _finish(sums: dict[str, Tensor], spatial: Union[int, Sequence[int]],
            domain_length: DomainLength) -> dict[str, object]:
    spatial = (int(spatial),) if isinstance(spatial, int) else tuple(int(v) for v in spatial)
    n = sums["count"]
    out: dict[str, object] = {
        "nrmse": float((sums["nrmse"] / n).mean()),
        "rmse": float((sums["rmse"] / n).mean()),
        "crmse": float((sums["csq"] / n).sqrt().mean()),
        "brmse": float((sums["brmse"] / n).mean()),
        "max_err": float(sums["max_err"]),
    }
    L = _lengths(domain_length, len(spatial))
    scale = L[0] / spatial[0] if len(spatial) == 1 else math.prod(L) / math.prod(spatial)
    f = (sums["fsq"] / n).sqrt() * scale  # (T, C, K)
    kmax = f.shape[-1]
    for band, (lo, hi) in FRMSE_BANDS.items():
        hi = kmax if hi is None else min(hi, kmax)
        out[f"frmse_{band}"] = float(f[..., lo:hi].mean(-1).mean()) if hi > lo else math.nan
    out["nrmse_per_frame"] = (sums["nrmse"] / n).mean(-1).to(torch.float64)
    return out


def pdebench_metrics(pred: Tensor, true: Tensor, domain_length: DomainLength = 1.0) -> dict[str, float]:
    """PDEBench's error metrics over all samples, exactly averaged (formulas: module doc).

    Returns floats keyed ``nrmse, rmse, crmse, brmse, max_err, frmse_low, frmse_mid, frmse_high``.
    ``domain_length`` is PDEBench's ``Lx`` (``(Lx, Ly)`` in 2D, or one length for both); it scales
    the fRMSE only."""
    p, _ = _pair(pred, true)
    res = _finish(_rollout_sums(pred, true), p.shape[2:-1], domain_length)
    return {k: res[k] for k in PDEBENCH_KEYS}  # type: ignore[misc]


def nrmse_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    """nRMSE per predicted frame, (T,) float64: mean over samples (and channels) of
    sqrt(mean_x e^2) / sqrt(mean_x true^2)."""
    p, t = _pair(pred, true)
    return frame_nrmse(p, t).mean(dim=(0, 2))


def nrmse_per_channel(pred: Tensor, true: Tensor) -> Tensor:
    """nRMSE per channel, (C,) float64: mean over samples and frames of
    sqrt(mean_x e^2) / sqrt(mean_x true^2). Its mean is the headline ``nrmse``."""
    p, t = _pair(pred, true)
    return frame_nrmse(p, t).mean(dim=(0, 1))


def nrmse_at(pred: Tensor, true: Tensor, ks: Sequence[int] = (1, 10, 31)) -> dict[str, float]:
    """nRMSE at the k-th predicted frame (k = 1 is the first predicted frame), keyed ``nrmse_<k>``;
    NaN where the rollout has fewer than k frames."""
    curve = nrmse_per_frame(pred, true)
    return {f"nrmse_{k}": (float(curve[k - 1]) if 1 <= k <= curve.numel() else math.nan) for k in ks}


def nrmse_pdebench(pred_full: Tensor, true_full: Tensor, initial_step: int) -> float:
    """For comparison with published PDEBench tables only, never the headline.

    PDEBench's ``metrics()`` scores the full trajectory with its first ``initial_step`` frames copied
    from the truth (zero error there), which shrinks the figure by about (T - initial_step) / T.
    ``pred_full``/``true_full`` are full trajectories (B, T_full, *S[, C]); the first
    ``initial_step`` frames of ``pred_full`` are ignored and replaced by the truth."""
    p, t = _pair(pred_full, true_full)
    p = p.clone()
    p[:, :initial_step] = t[:, :initial_step]
    return float(nrmse_per_frame(p, t).mean())


# --------------------------------------------------------------------------------------------
# physics
# --------------------------------------------------------------------------------------------
def mass_drift(pred: Tensor, dx: float = 1.0, u0: Tensor | None = None, reduce: str = "max") -> float:
    """Relative mass drift: per sample, |sum_x u(t) - sum_x u(t0)| dx / (sum_x |u(t0)| dx) over the
    predicted frames t (sums over all cells and channels), reduced over t by its **maximum**
    (``reduce="max"``, default: the worst drift of the rollout) or mean (``reduce="mean"``), then
    averaged over samples. ``t0`` is ``u0`` (the last given frame, (B, *S[, C])) when given, else the
    first frame of ``pred``. ``dx`` (the cell size, area in 2D) cancels in the ratio; it is kept so
    the call reads as the formula."""
    u = _as_field(pred, "pred")
    ref = _as_frame(u0, u)[:, 0] if u0 is not None else u[:, 0]
    m = u.sum(dim=tuple(range(2, u.dim()))) * dx  # (B, T)
    rdims = tuple(range(1, ref.dim()))
    m0 = ref.sum(dim=rdims) * dx  # (B,)
    scale = ref.abs().sum(dim=rdims) * dx
    d = (m - m0[:, None]).abs() / scale[:, None]
    if reduce == "max":
        per = d.max(dim=1).values
    elif reduce == "mean":
        per = d.mean(dim=1)
    else:
        raise ValueError(f"mass_drift: reduce must be 'max' or 'mean', got {reduce!r}")
    return float(per.mean())


def _relative_increase(q: Tensor) -> Tensor:
    """q (B, T) -> per sample sum_t max(q_{t+1} - q_t, 0) / q_0."""
    inc = torch.clamp(q[:, 1:] - q[:, :-1], min=0.0).sum(dim=1)
    return inc / q[:, 0]


def energy_increase(pred: Tensor, u0: Tensor | None = None) -> float:
    """Energy creation: per sample, the sum over consecutive frames of max(E(t+1) - E(t), 0) with
    E = sum_x u^2 / 2 (all cells and channels), relative to the initial energy E(t0); mean over
    samples. A dissipative equation never gains energy, so its exact solution scores 0. ``u0`` (B, *S[, C]) is
    prepended as t0."""
    u = _with_initial(pred, u0)
    return float(_relative_increase(0.5 * u.pow(2).sum(dim=tuple(range(2, u.dim())))).mean())


def _total_variation(u: Tensor) -> Tensor:
    """Periodic total variation summed over every spatial axis and the channels: (B, T, *S, C) -> (B, T)."""
    red = tuple(range(2, u.dim()))
    tv = (torch.roll(u, shifts=-1, dims=2) - u).abs().sum(dim=red)
    for ax in range(3, u.dim() - 1):  # 2D: the differences along y too
        tv = tv + (torch.roll(u, shifts=-1, dims=ax) - u).abs().sum(dim=red)
    return tv


def tv_increase(pred: Tensor, u0: Tensor | None = None) -> float:
    """Total-variation creation: per sample, sum over consecutive frames of the positive part of the
    increase of the periodic TV = sum_i |u_{i+1} - u_i| (2D: summed over both axes,
    sum |u_{i+1,j} - u_{i,j}| + |u_{i,j+1} - u_{i,j}|), relative to TV(t0); mean over samples."""
    return float(_relative_increase(_total_variation(_with_initial(pred, u0))).mean())


def _energy_spectrum(u: Tensor) -> Tensor:
    """Energy per wavenumber summed over channels: 1D ``S(k) = sum_c |rfft_x u|^2`` (B, T, nx//2 + 1);
    2D the isotropic shell spectrum ``S(k) = sum_c sum_{round(|(kx, ky)|) = k} |fft2 u|^2`` over every
    mode of the full 2D FFT (integer wavenumbers), (B, T, K)."""
    if u.dim() == 4:
        return torch.fft.rfft(u, dim=2).abs().pow(2).sum(-1)
    B, T, nx, ny, C = u.shape
    power = torch.fft.fftn(u, dim=(2, 3)).abs().pow(2).sum(-1)  # (B, T, nx, ny)
    kx = torch.fft.fftfreq(nx, d=1.0 / nx, dtype=torch.float64, device=u.device)
    ky = torch.fft.fftfreq(ny, d=1.0 / ny, dtype=torch.float64, device=u.device)
    shell = torch.sqrt(kx[:, None] ** 2 + ky[None, :] ** 2).round().long().reshape(-1)
    K = int(shell.max()) + 1
    out = torch.zeros(B, T, K, dtype=power.dtype, device=power.device)
    return out.index_add_(2, shell, power.reshape(B, T, -1))


def spectral_energy_error(pred: Tensor, true: Tensor) -> float:
    """Relative error of the energy spectrum: per sample and frame, with S(k) the energy per
    wavenumber summed over channels (1D: S(k) = sum_c |rfft_x u|^2; 2D: the isotropic shell
    spectrum, the power of the 2D FFT binned by round(|k|)),
    sum_k |S_pred(k) - S_true(k)| / sum_k S_true(k); mean over samples and frames."""
    p, t = _pair(pred, true)
    sp = _energy_spectrum(p)
    st = _energy_spectrum(t)
    return float(((sp - st).abs().sum(-1) / st.sum(-1)).mean())


def _pearson_over_x(p: Tensor, t: Tensor) -> Tensor:
    """Pearson correlation over (cells, channels) per sample and frame: (B, T, *S, C) -> (B, T).
    Where either field is constant over x, r := 1 if the two fields agree to 1e-12 (relative), else 0."""
    red = tuple(range(2, p.dim()))
    pc = p - p.mean(dim=red, keepdim=True)
    tc = t - t.mean(dim=red, keepdim=True)
    cov = (pc * tc).sum(dim=red)
    sp = pc.pow(2).sum(dim=red).sqrt()
    st = tc.pow(2).sum(dim=red).sqrt()
    denom = sp * st
    r = cov / torch.where(denom > 0, denom, torch.ones_like(denom))
    same = ((p - t).abs().amax(dim=red) <= 1e-12 * (1.0 + t.abs().amax(dim=red))).to(r.dtype)
    return torch.where(denom > 0, r, same)


def correlation_horizon(pred: Tensor, true: Tensor, threshold: float = 0.8) -> float:
    """Stability horizon: per sample, the first predicted frame (1-based count, k = 1 is the first
    predicted frame) at which the Pearson correlation over all cells and channels of pred and true
    drops below ``threshold``; T + 1 if it never does (the rollout stayed correlated to its end).
    Mean over samples, so the figure lies in [1, T + 1]."""
    p, t = _pair(pred, true)
    below = _pearson_over_x(p, t) < threshold  # (B, T)
    T = p.shape[1]
    k = torch.arange(1, T + 1, dtype=torch.float64, device=p.device).expand_as(below)
    first = torch.where(below, k, torch.full_like(k, T + 1)).min(dim=1).values
    return float(first.mean())


# --------------------------------------------------------------------------------------------
# ensembles
# --------------------------------------------------------------------------------------------
def _ens_pair(ens: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    e = torch.as_tensor(ens).detach().to(torch.float64)
    t = torch.as_tensor(true).detach().to(torch.float64).to(e.device)
    if e.dim() != t.dim() + 1 or e.shape[1:] != t.shape:
        raise ValueError(f"ensemble must be (members, *true.shape); got {tuple(e.shape)} vs true {tuple(t.shape)}")
    return e, t


def crps_ensemble(ens: Tensor, true: Tensor, fair: bool = True) -> float:
    """Ensemble CRPS, averaged over every point (sample, frame, x, channel).

    Energy form per point: CRPS = mean_m |x_m - y| - sum_{m,m'} |x_m - x_m'| / (2 M (M - 1)) for the
    **fair** (unbiased for the underlying distribution, Ferro 2014) estimator, default; with
    ``fair=False`` the divisor is 2 M^2 (the CRPS of the empirical ensemble distribution). M = 1
    reduces to the absolute error. The pair sum is computed from the sorted members in O(M log M):
    sum_{m,m'} |x_m - x_m'| = 2 sum_i (2 i - M + 1) x_(i), i = 0..M-1."""
    e, t = _ens_pair(ens, true)
    M = e.shape[0]
    skill = (e - t.unsqueeze(0)).abs().mean(0)
    if M == 1:
        return float(skill.mean())
    xs = e.sort(dim=0).values
    w = (2 * torch.arange(M, dtype=torch.float64, device=e.device) - M + 1).view(-1, *([1] * t.dim()))
    pair = 2.0 * (w * xs).sum(0)
    div = 2.0 * M * (M - 1) if fair else 2.0 * M * M
    return float((skill - pair / div).mean())


def spread_skill_ratio(ens: Tensor, true: Tensor) -> float:
    """Spread / skill with the finite-ensemble correction (Fortin et al. 2014):
    sqrt((M + 1) / M) * sqrt(mean of the unbiased member variance) / RMSE(ensemble mean, truth),
    means over every point. 1 for a calibrated ensemble, < 1 over-confident, > 1 under-confident."""
    e, t = _ens_pair(ens, true)
    M = e.shape[0]
    if M < 2:
        return math.nan
    spread = e.var(dim=0, unbiased=True).mean().sqrt()
    skill = (e.mean(0) - t).pow(2).mean().sqrt()
    return float(math.sqrt((M + 1) / M) * spread / skill)


def ensemble_levels(M: int) -> list[float]:
    """Nominal levels an ensemble of ``M`` members can represent, widest first.

    Interval i (i = 1..M // 2) runs from the i-th smallest to the i-th largest member. Under perfect
    calibration the truth's rank among the members is uniform on {0..M} and lies in interval i iff
    i <= rank <= M - i, so its nominal level is (M + 1 - 2 i) / (M + 1): 7/9, 5/9, 3/9, 1/9 for M = 8.
    Other levels (0.5, 0.9) would need interpolated quantiles whose coverage is biased at finite M."""
    M = int(M)
    if M < 2:
        raise ValueError(f"calibration needs an ensemble of at least 2 members, got M={M}")
    return [(M + 1 - 2 * i) / (M + 1) for i in range(1, M // 2 + 1)]


def nearest_level(M: int, level: float) -> tuple[int, float]:
    """(i, nominal level) of the representable interval of :func:`ensemble_levels` whose nominal level
    is nearest ``level``; an exact tie goes to the wider interval (smaller i)."""
    levels = ensemble_levels(M)
    # distance in units of 1/(M+1), rounded so that float noise cannot break exact ties
    i = min(range(1, len(levels) + 1), key=lambda k: (round(abs((M + 1 - 2 * k) - level * (M + 1)), 9), k))
    return i, levels[i - 1]


def _truth_ranks(ens: Tensor, true: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per point: members strictly below the truth (L), members equal to it (E), and M."""
    e, t = _ens_pair(ens, true)
    M = e.shape[0]
    ensemble_levels(M)   # the M < 2 check
    below = (e < t.unsqueeze(0)).sum(0)
    equal = (e == t.unsqueeze(0)).sum(0)
    return below, equal, M


def _rank_coverage(below: Tensor, equal: Tensor, M: int, i: int) -> float:
    # rank with ties broken at random is uniform on {L..L+E}; the expected hit of {i..M-i} is the
    # overlap / (E + 1), so ties neither inflate nor deflate coverage (E = 0: the plain rank test)
    hi = torch.clamp(below + equal, max=M - i)
    lo = torch.clamp(below, min=i)
    hits = (hi - lo + 1).clamp(min=0).to(torch.float64) / (equal + 1).to(torch.float64)
    return float(hits.mean())


def interval_coverage(ens: Tensor, true: Tensor, i: int) -> float:
    """Empirical coverage of interval ``i`` (i-th smallest to i-th largest member, 1 <= i <= M // 2),
    nominal level ``ensemble_levels(M)[i - 1]``.

    The truth is inside iff its rank (members strictly below it) is in {i..M-i}; members equal to
    the truth count as a uniformly random tie-break (expected value, deterministic), so ties do not
    bias the result. Raises ValueError for M < 2 or i out of range."""
    below, equal, M = _truth_ranks(ens, true)
    if not 1 <= int(i) <= M // 2:
        raise ValueError(f"interval i={i} out of range 1..{M // 2} for M={M} members")
    return _rank_coverage(below, equal, M, int(i))


def coverage_curve(ens: Tensor, true: Tensor) -> list[tuple[float, float]]:
    """(nominal, empirical) coverage of every representable interval, widest first."""
    below, equal, M = _truth_ranks(ens, true)
    return [(lv, _rank_coverage(below, equal, M, i)) for i, lv in enumerate(ensemble_levels(M), start=1)]


def coverage(ens: Tensor, true: Tensor, level: float = 0.9) -> float:
    """Empirical coverage of the representable interval whose nominal level is nearest ``level``
    (:func:`nearest_level`; e.g. 7/9 for level 0.9 and M = 8). Compare it with that nominal level,
    not with ``level``: M members cannot represent arbitrary levels without bias."""
    e = torch.as_tensor(ens)
    return interval_coverage(ens, true, nearest_level(e.shape[0], level)[0])


def ece_coverage(ens: Tensor, true: Tensor) -> float:
    """Coverage calibration error: mean over the representable levels (:func:`ensemble_levels`) of
    |empirical coverage - nominal level|. 0 is perfectly calibrated; it uses only levels M members
    can represent, so a calibrated ensemble is not charged a finite-M bias."""
    curve = coverage_curve(ens, true)
    return float(sum(abs(emp - lv) for lv, emp in curve) / len(curve))


# --------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------
class RolloutMetrics(torchmetrics.Metric):
    """PDEBench metrics accumulated over batches of rollouts, exact over all samples.

    ``update(pred, true)`` with (B, T, *S[, C]) predicted frames (layout: module doc); ``compute()``
    returns the same floats as :func:`pdebench_metrics` on the concatenated data plus
    ``nrmse_per_frame`` (T,) tensor. Only sum states (and one max state for the max error) are kept,
    so the DDP reduction is exact. Give ``n_frames``, ``nx`` (the grid: an int in 1D, ``(nx, ny)`` in
    2D) and ``channels`` to allocate the states up front (the DDP-safe way, no rank can then hold an
    empty state of another shape); otherwise they are sized on the first update. ``domain_length``:
    one length, or one per axis.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, n_frames: int | None = None, nx: int | Sequence[int] | None = None, channels: int = 1,
                 domain_length: DomainLength = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.domain_length = (float(domain_length) if isinstance(domain_length, (int, float))
                              else tuple(float(v) for v in domain_length))
        self.spatial: Tuple[int, ...] | None = None
        if nx is not None:
            self.spatial = (int(nx),) if isinstance(nx, int) else tuple(int(v) for v in nx)
            if len(self.spatial) not in (1, 2):
                raise ValueError(f"RolloutMetrics: nx={nx!r}: one or two spatial axes")
        if n_frames is not None and self.spatial is not None:
            tc, tck = (n_frames, channels), (n_frames, channels, _n_freq_bins(self.spatial))
        else:
            tc, tck = (0,), (0,)
        f64 = torch.float64
        for name in ("nrmse", "rmse", "brmse", "csq"):
            self.add_state(name, default=torch.zeros(tc, dtype=f64), dist_reduce_fx="sum")
        self.add_state("fsq", default=torch.zeros(tck, dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("max_err", default=torch.zeros((), dtype=f64), dist_reduce_fx="max")

    @property
    def nx(self) -> int | Tuple[int, ...] | None:
        """The grid the states are for: an int in 1D, (nx, ny) in 2D, None before the first update."""
        if self.spatial is None:
            return None
        return self.spatial[0] if len(self.spatial) == 1 else self.spatial

    def update(self, pred: Tensor, true: Tensor) -> None:  # type: ignore[override]
        sums = _rollout_sums(pred, true)
        spatial = tuple(_check_layout(pred).shape[2:-1])
        if self.spatial is None:
            self.spatial = spatial
        elif self.spatial != spatial:
            raise ValueError(f"RolloutMetrics: got a grid of {spatial} after {self.spatial}")
        for name in ("nrmse", "rmse", "brmse", "csq", "fsq"):
            cur = getattr(self, name)
            new = sums[name].to(cur.device)
            if cur.numel() == 0:
                setattr(self, name, new.clone())
            elif cur.shape != new.shape:
                raise ValueError(f"RolloutMetrics: batch of shape {tuple(_check_layout(pred).shape)} does not "
                                 f"match the accumulated (frames, channels) {tuple(self.nrmse.shape)}")
            else:
                setattr(self, name, cur + new)
        self.count = self.count + sums["count"].to(self.count.device)
        self.max_err = torch.maximum(self.max_err, sums["max_err"].to(self.max_err.device))

    def compute(self) -> dict[str, object]:  # type: ignore[override]
        if self.spatial is None or float(self.count) == 0:
            raise RuntimeError("RolloutMetrics.compute() called before any update()")
        sums = {n: getattr(self, n) for n in ("nrmse", "rmse", "brmse", "csq", "fsq", "count", "max_err")}
        return _finish(sums, self.spatial, self.domain_length)


# --------------------------------------------------------------------------------------------
# everything for one rollout
# --------------------------------------------------------------------------------------------
def all_metrics(pred: Tensor, true: Tensor, dx: float | None = None, domain_length: DomainLength = 1.0,
                u0: Tensor | None = None, ens: Tensor | None = None, ks: Sequence[int] = (1, 10, 31),
                corr_threshold: float = 0.8) -> dict[str, float]:
    """All scalar metrics of benchmark.md section 3 for one rollout, as floats.

    ``pred``/``true``: predicted frames only (B, T, *S[, C]); ``u0``: the last given frame
    (B, *S[, C]), the reference of the physics metrics (else the first predicted frame is); ``dx``
    (cell size; area in 2D) defaults to ``prod(domain_length / n)``; ``ens`` (M, B, T, *S[, C]) adds
    ``crps, spread_skill, coverage_50, coverage_90, ece`` and ``coverage_50_nominal``,
    ``coverage_90_nominal``: coverage_50/90 are the coverages of the representable intervals whose
    nominal levels (:func:`ensemble_levels`, e.g. 5/9 and 7/9 for M = 8) are nearest 0.5/0.9, and the
    ``_nominal`` keys are those levels (all nan for one member). The per-frame curve is
    :func:`nrmse_per_frame`, the per-channel figures :func:`nrmse_per_channel`."""
    p, t = _pair(pred, true)
    spatial = p.shape[2:-1]
    if dx is None:
        L = _lengths(domain_length, len(spatial))
        dx = L[0] / spatial[0] if len(spatial) == 1 else math.prod(L) / math.prod(spatial)
    out: dict[str, float] = pdebench_metrics(p, t, domain_length=domain_length)
    out.update(nrmse_at(p, t, ks))
    out["mass_drift"] = mass_drift(p, dx, u0=u0)
    out["energy_increase"] = energy_increase(p, u0=u0)
    out["tv_increase"] = tv_increase(p, u0=u0)
    out["spectral_energy_error"] = spectral_energy_error(p, t)
    out["correlation_horizon"] = correlation_horizon(p, t, corr_threshold)
    if ens is not None:
        e = torch.as_tensor(ens)
        if e.dim() == t.dim():  # members of (B, T, X) given without the channel axis
            e = e.unsqueeze(-1)
        out["crps"] = crps_ensemble(e, t)
        out["spread_skill"] = spread_skill_ratio(e, t)
        if e.shape[0] >= 2:
            for key, level in (("coverage_50", 0.5), ("coverage_90", 0.9)):
                i, out[f"{key}_nominal"] = nearest_level(e.shape[0], level)
                out[key] = interval_coverage(e, t, i)
            out["ece"] = ece_coverage(e, t)
        else:   # one member: no interval, no calibration (as spread_skill)
            for key in ("coverage_50", "coverage_50_nominal", "coverage_90", "coverage_90_nominal", "ece"):
                out[key] = math.nan
    return out
