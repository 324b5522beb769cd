"""Evaluation metrics in physical space (benchmark.md section 3).

Every function here takes decoded, de-normalised fields. Field arrays are ``(batch, time, x)`` or
``(batch, time, x, channels)`` (ARCHITECTURE.md); ensembles put the member axis first:
``(members, batch, time, x[, channels])``. ``pred`` and ``true`` hold the *predicted* frames only
(for the PDEBench protocol: frames 10..40, so index 0 is the first predicted frame, k = 1).

With ``e = pred - true`` and, for sample ``b``, frame ``t`` and channel ``c``:

- ``nrmse``  = mean_{b,t,c} sqrt(mean_x e^2) / sqrt(mean_x true^2)                     (headline)
- ``rmse``   = mean_{b,t,c} sqrt(mean_x e^2)
- ``crmse``  = mean_{t,c} sqrt(mean_b (mean_x e)^2)
- ``brmse``  = mean_{b,t,c} sqrt((e[x_0]^2 + e[x_last]^2) / 2)
- ``max_err``= max_{b,t,x,c} |e|                     (a true maximum over all samples)
- ``frmse_<band>`` = mean_{t,c} (1/|band|) sum_{k in band} sqrt(mean_b |E_k|^2) * L / nx
  with ``E_k = rfft_x(e)`` (unnormalised, k = 0 .. nx//2), L the domain length and bands
  low = [0, 4), mid = [4, 12), high = [12, nx//2] (an empty band gives NaN).

These are PDEBench's definitions (``pdebench/models/metrics.py``, ``metric_func``) with the batch
reductions taken over the whole test set at once: PDEBench forms cRMSE and fRMSE as an RMS over the
samples of one loader batch and then averages those per-batch figures dividing by ``n_batches - 1``,
and sums per-batch max errors. Here the RMS runs over *all* samples (what PDEBench gives with one
batch holding the whole test set), every mean is exact, and the max error is a maximum. All
reductions are computed from sums (``_rollout_sums``), so :class:`RolloutMetrics` (batched, DDP)
and :func:`pdebench_metrics` (one call) agree to round-off.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torchmetrics
from torch import Tensor

__all__ = [
    "FRMSE_BANDS",
    "pdebench_metrics",
    "nrmse_per_frame",
    "nrmse_at",
    "nrmse_pdebench",
    "mass_drift",
    "energy_increase",
    "tv_increase",
    "spectral_energy_error",
    "correlation_horizon",
    "crps_ensemble",
    "spread_skill_ratio",
    "coverage",
    "ece_coverage",
    "RolloutMetrics",
    "all_metrics",
]

#: Fourier bands of the fRMSE (PDEBench's iLow = 4, iHigh = 12); the high band runs to nx // 2.
FRMSE_BANDS: dict[str, tuple[int, int | None]] = {"low": (0, 4), "mid": (4, 12), "high": (12, None)}

PDEBENCH_KEYS = ("nrmse", "rmse", "crmse", "brmse", "max_err", "frmse_low", "frmse_mid", "frmse_high")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_btxc(u: Tensor, name: str = "field") -> Tensor:
    """(B, T, X) or (B, T, X, C) -> (B, T, X, C) float64."""
    if not isinstance(u, Tensor):
        u = torch.as_tensor(u)
    if u.dim() == 3:
        u = u.unsqueeze(-1)
    if u.dim() != 4:
        raise ValueError(f"{name}: expected (batch, time, x) or (batch, time, x, channels), got shape {tuple(u.shape)}")
    return u.detach().to(torch.float64)


def _pair(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    p, t = _as_btxc(pred, "pred"), _as_btxc(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t.to(p.device)


def _as_frame(u0: Tensor, like: Tensor) -> Tensor:
    """An initial frame (B, X) or (B, X, C) -> (B, 1, X, C) float64 on like's device."""
    u0 = torch.as_tensor(u0).detach().to(torch.float64).to(like.device)
    if u0.dim() == 2:
        u0 = u0.unsqueeze(-1)
    if u0.dim() == 4 and u0.shape[1] == 1:  # already (B, 1, X, C)
        return u0
    if u0.dim() != 3:
        raise ValueError(f"u0: expected (batch, x) or (batch, x, channels), got shape {tuple(u0.shape)}")
    return u0.unsqueeze(1)


def _with_initial(pred: Tensor, u0: Tensor | None) -> Tensor:
    p = _as_btxc(pred, "pred")
    if u0 is None:
        return p
    return torch.cat([_as_frame(u0, p), p], dim=1)


# --------------------------------------------------------------------------------------------
# PDEBench metrics, from exact sums
# --------------------------------------------------------------------------------------------
def _rollout_sums(pred: Tensor, true: Tensor) -> dict[str, Tensor]:
    """Sums over the batch from which every PDEBench metric is finished (see module doc).

    Shapes: ``nrmse/rmse/brmse/csq``: (T, C); ``fsq``: (T, C, nx//2 + 1); ``max_err`` and
    ``count``: scalars."""
    p, t = _pair(pred, true)
    e = p - t
    err_l2 = e.pow(2).mean(dim=2).sqrt()  # (B, T, C)
    nrm = t.pow(2).mean(dim=2).sqrt()
    bd = ((e[:, :, 0] ** 2 + e[:, :, -1] ** 2) / 2.0).sqrt()
    spec = torch.fft.rfft(e, dim=2).abs().pow(2)  # (B, T, K, C)
    return {
        "nrmse": (err_l2 / nrm).sum(0),
        "rmse": err_l2.sum(0),
        "brmse": bd.sum(0),
        "csq": e.mean(dim=2).pow(2).sum(0),
        "fsq": spec.sum(0).transpose(1, 2),  # (T, C, K)
        "max_err": e.abs().max() if e.numel() else torch.zeros((), dtype=torch.float64),
        "count": torch.tensor(float(e.shape[0]), dtype=torch.float64),
    }


def _finish(sums: dict[str, Tensor], nx: int, domain_length: float) -> dict[str, object]:
    n = sums["count"]
    out: dict[str, object] = {
        "nrmse": float((sums["nrmse"] / n).mean()),
        "rmse": float((sums["rmse"] / n).mean()),
        "crmse": float((sums["csq"] / n).sqrt().mean()),
        "brmse": float((sums["brmse"] / n).mean()),
        "max_err": float(sums["max_err"]),
    }
    f = (sums["fsq"] / n).sqrt() * (domain_length / nx)  # (T, C, K)
    kmax = f.shape[-1]
    for band, (lo, hi) in FRMSE_BANDS.items():
        hi = kmax if hi is None else min(hi, kmax)
        out[f"frmse_{band}"] = float(f[..., lo:hi].mean(-1).mean()) if hi > lo else math.nan
    out["nrmse_per_frame"] = (sums["nrmse"] / n).mean(-1).to(torch.float64)
    return out


def pdebench_metrics(pred: Tensor, true: Tensor, domain_length: float = 1.0) -> dict[str, float]:
    """PDEBench's error metrics over all samples, exactly averaged (formulas: module doc).

    Returns floats keyed ``nrmse, rmse, crmse, brmse, max_err, frmse_low, frmse_mid, frmse_high``.
    ``domain_length`` is PDEBench's ``Lx`` (it scales the fRMSE only)."""
    p, _ = _pair(pred, true)
    res = _finish(_rollout_sums(pred, true), p.shape[2], domain_length)
    return {k: res[k] for k in PDEBENCH_KEYS}  # type: ignore[misc]


def nrmse_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    """nRMSE per predicted frame, (T,) float64: mean over samples (and channels) of
    sqrt(mean_x e^2) / sqrt(mean_x true^2)."""
    p, t = _pair(pred, true)
    return ((p - t).pow(2).mean(2).sqrt() / t.pow(2).mean(2).sqrt()).mean(dim=(0, 2))


def nrmse_at(pred: Tensor, true: Tensor, ks: Sequence[int] = (1, 10, 31)) -> dict[str, float]:
    """nRMSE at the k-th predicted frame (k = 1 is the first predicted frame), keyed ``nrmse_<k>``;
    NaN where the rollout has fewer than k frames."""
    curve = nrmse_per_frame(pred, true)
    return {f"nrmse_{k}": (float(curve[k - 1]) if 1 <= k <= curve.numel() else math.nan) for k in ks}


def nrmse_pdebench(pred_full: Tensor, true_full: Tensor, initial_step: int) -> float:
    """For comparison with published PDEBench tables only, never the headline.

    PDEBench's ``metrics()`` scores the full trajectory with its first ``initial_step`` frames copied
    from the truth (zero error there), which shrinks the figure by about (T - initial_step) / T.
    ``pred_full``/``true_full`` are full trajectories (B, T_full, X[, C]); the first ``initial_step``
    frames of ``pred_full`` are ignored and replaced by the truth."""
    p, t = _pair(pred_full, true_full)
    p = p.clone()
    p[:, :initial_step] = t[:, :initial_step]
    return float(nrmse_per_frame(p, t).mean())


# --------------------------------------------------------------------------------------------
# physics
# --------------------------------------------------------------------------------------------
def mass_drift(pred: Tensor, dx: float = 1.0, u0: Tensor | None = None, reduce: str = "max") -> float:
    """Relative mass drift: per sample, |sum_x u(t) - sum_x u(t0)| dx / (sum_x |u(t0)| dx) over the
    predicted frames t, reduced over t by its **maximum** (``reduce="max"``, default: the worst drift
    of the rollout) or mean (``reduce="mean"``), then averaged over samples. ``t0`` is ``u0`` (the
    last given frame, (B, X[, C])) when given, else the first frame of ``pred``. ``dx`` cancels in the
    ratio; it is kept so the call reads as the formula."""
    u = _as_btxc(pred, "pred")
    ref = _as_frame(u0, u)[:, 0] if u0 is not None else u[:, 0]
    m = u.sum(dim=(2, 3)) * dx  # (B, T)
    m0 = ref.sum(dim=(1, 2)) * dx  # (B,)
    scale = ref.abs().sum(dim=(1, 2)) * dx
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
    E = sum_x u^2 / 2, relative to the initial energy E(t0); mean over samples. Burgers only
    dissipates energy, so the exact solution scores 0. ``u0`` (B, X[, C]) is prepended as t0."""
    u = _with_initial(pred, u0)
    return float(_relative_increase(0.5 * u.pow(2).sum(dim=(2, 3))).mean())


def _total_variation(u: Tensor) -> Tensor:
    """Periodic total variation over x, summed over channels: (B, T, X, C) -> (B, T)."""
    return (torch.roll(u, shifts=-1, dims=2) - u).abs().sum(dim=(2, 3))


def tv_increase(pred: Tensor, u0: Tensor | None = None) -> float:
    """Total-variation creation: per sample, sum over consecutive frames of the positive part of the
    increase of the periodic TV = sum_i |u_{i+1} - u_i|, relative to TV(t0); mean over samples."""
    return float(_relative_increase(_total_variation(_with_initial(pred, u0))).mean())


def spectral_energy_error(pred: Tensor, true: Tensor) -> float:
    """Relative error of the energy spectrum: per sample and frame, with S(k) = sum_c |rfft_x u|^2,
    sum_k |S_pred(k) - S_true(k)| / sum_k S_true(k); mean over samples and frames."""
    p, t = _pair(pred, true)
    sp = torch.fft.rfft(p, dim=2).abs().pow(2).sum(-1)
    st = torch.fft.rfft(t, dim=2).abs().pow(2).sum(-1)
    return float(((sp - st).abs().sum(-1) / st.sum(-1)).mean())


def _pearson_over_x(p: Tensor, t: Tensor) -> Tensor:
    """Pearson correlation over (x, channels) per sample and frame: (B, T, X, C) -> (B, T).
    Where either field is constant over x, rho := 1 if the two fields agree to 1e-12 (relative), else 0."""
    pc = p - p.mean(dim=(2, 3), keepdim=True)
    tc = t - t.mean(dim=(2, 3), keepdim=True)
    cov = (pc * tc).sum(dim=(2, 3))
    sp = pc.pow(2).sum(dim=(2, 3)).sqrt()
    st = tc.pow(2).sum(dim=(2, 3)).sqrt()
    denom = sp * st
    rho = cov / torch.where(denom > 0, denom, torch.ones_like(denom))
    same = ((p - t).abs().amax(dim=(2, 3)) <= 1e-12 * (1.0 + t.abs().amax(dim=(2, 3)))).to(rho.dtype)
    return torch.where(denom > 0, rho, same)


def correlation_horizon(pred: Tensor, true: Tensor, threshold: float = 0.8) -> float:
    """Stability horizon: per sample, the first predicted frame (1-based count, k = 1 is the first
    predicted frame) at which the Pearson correlation over x of pred and true drops below
    ``threshold``; T + 1 if it never does (the rollout stayed correlated to its end). Mean over
    samples, so the figure lies in [1, T + 1]."""
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


def _sorted_quantile(xs: Tensor, q: float) -> Tensor:
    """Quantile along dim 0 of already sorted members, linear interpolation (numpy's default)."""
    M = xs.shape[0]
    pos = q * (M - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, M - 1)
    w = pos - lo
    return xs[lo] * (1.0 - w) + xs[hi] * w


def coverage(ens: Tensor, true: Tensor, level: float = 0.9, _sorted: Tensor | None = None) -> float:
    """Empirical coverage of the central ``level`` interval [q_{(1-level)/2}, q_{(1+level)/2}] of the
    ensemble members (linear-interpolated quantiles over members, per point): the fraction of points
    whose truth lies inside (bounds included)."""
    e, t = _ens_pair(ens, true)
    xs = e.sort(dim=0).values if _sorted is None else _sorted
    lo = _sorted_quantile(xs, (1.0 - level) / 2.0)
    hi = _sorted_quantile(xs, (1.0 + level) / 2.0)
    return float(((t >= lo) & (t <= hi)).to(torch.float64).mean())


def ece_coverage(ens: Tensor, true: Tensor, levels: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> float:
    """Coverage calibration error: mean over ``levels`` of |empirical coverage - nominal level| of the
    central intervals (see :func:`coverage`). 0 is perfectly calibrated."""
    e, t = _ens_pair(ens, true)
    xs = e.sort(dim=0).values
    levels = list(levels)
    return float(sum(abs(coverage(e, t, lv, _sorted=xs) - lv) for lv in levels) / len(levels))


# --------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------
class RolloutMetrics(torchmetrics.Metric):
    """PDEBench metrics accumulated over batches of rollouts, exact over all samples.

    ``update(pred, true)`` with (B, T, X[, C]) predicted frames; ``compute()`` returns the same floats
    as :func:`pdebench_metrics` on the concatenated data plus ``nrmse_per_frame`` (T,) tensor.
    Only sum states (and one max state for the max error) are kept, so the DDP reduction is exact.
    Give ``n_frames``, ``nx`` and ``channels`` to allocate the states up front (the DDP-safe way, no
    rank can then hold an empty state of another shape); otherwise they are sized on the first update.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, n_frames: int | None = None, nx: int | None = None, channels: int = 1,
                 domain_length: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.domain_length = float(domain_length)
        self.nx = nx
        if n_frames is not None and nx is not None:
            tc, tck = (n_frames, channels), (n_frames, channels, nx // 2 + 1)
        else:
            tc, tck = (0,), (0,)
        f64 = torch.float64
        for name in ("nrmse", "rmse", "brmse", "csq"):
            self.add_state(name, default=torch.zeros(tc, dtype=f64), dist_reduce_fx="sum")
        self.add_state("fsq", default=torch.zeros(tck, dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("max_err", default=torch.zeros((), dtype=f64), dist_reduce_fx="max")

    def update(self, pred: Tensor, true: Tensor) -> None:  # type: ignore[override]
        sums = _rollout_sums(pred, true)
        nx = _as_btxc(pred).shape[2]
        if self.nx is None:
            self.nx = nx
        elif self.nx != nx:
            raise ValueError(f"RolloutMetrics: got nx={nx} after nx={self.nx}")
        for name in ("nrmse", "rmse", "brmse", "csq", "fsq"):
            cur = getattr(self, name)
            new = sums[name].to(cur.device)
            if cur.numel() == 0:
                setattr(self, name, new.clone())
            elif cur.shape != new.shape:
                raise ValueError(f"RolloutMetrics: batch of shape {tuple(_as_btxc(pred).shape)} does not match "
                                 f"the accumulated (frames, channels) {tuple(self.nrmse.shape)}")
            else:
                setattr(self, name, cur + new)
        self.count = self.count + sums["count"].to(self.count.device)
        self.max_err = torch.maximum(self.max_err, sums["max_err"].to(self.max_err.device))

    def compute(self) -> dict[str, object]:  # type: ignore[override]
        if self.nx is None or float(self.count) == 0:
            raise RuntimeError("RolloutMetrics.compute() called before any update()")
        sums = {n: getattr(self, n) for n in ("nrmse", "rmse", "brmse", "csq", "fsq", "count", "max_err")}
        return _finish(sums, int(self.nx), self.domain_length)


# --------------------------------------------------------------------------------------------
# everything for one rollout
# --------------------------------------------------------------------------------------------
def all_metrics(pred: Tensor, true: Tensor, dx: float | None = None, domain_length: float = 1.0,
                u0: Tensor | None = None, ens: Tensor | None = None, ks: Sequence[int] = (1, 10, 31),
                corr_threshold: float = 0.8) -> dict[str, float]:
    """All scalar metrics of benchmark.md section 3 for one rollout, as floats.

    ``pred``/``true``: predicted frames only (B, T, X[, C]); ``u0``: the last given frame (B, X[, C]),
    the reference of the physics metrics (else the first predicted frame is); ``dx`` defaults to
    ``domain_length / nx``; ``ens`` (M, B, T, X[, C]) adds ``crps, spread_skill, coverage_50,
    coverage_90, ece``. The per-frame curve is :func:`nrmse_per_frame`."""
    p, t = _pair(pred, true)
    if dx is None:
        dx = domain_length / p.shape[2]
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
        out["coverage_50"] = coverage(e, t, 0.5)
        out["coverage_90"] = coverage(e, t, 0.9)
        out["ece"] = ece_coverage(e, t)
    return out
