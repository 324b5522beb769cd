"""The one interface every equation implements (a spec object per PDE), and the pieces they share.

A spec says everything the rest of the project may know about an equation:

- its fields (channels), spatial dimension and boundary conditions;
- its parameters: their names in configs and on the command line, the HDF5 attributes PDEBench
  stores them under, the pattern of PDEBench's file names (released files often carry the
  parameters in the name only), their valid range, and how each becomes a conditioning feature;
- its initial-condition recipe and its validated reference solver (numpy, float64);
- its invariants, which the rollout guard may project onto (``project``);
- its TTC rewards (``penalties``), computed from decoded candidate states only.

Data, models, stages, rollout, evaluation and bench ask a spec (``ups_lightning.pdes.get_pde``)
and never name an equation. Adding an equation = one module under ``pdes/`` that subclasses
``PDE`` and registers an instance in ``pdes/__init__.py``, one data config, and its tests.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ups_lightning.errors import UserError

__all__ = ["Parameter", "Published", "PDE", "PENALTY_DOCS", "trapezoid_residual", "rms", "solver_rows",
           "check_save_times", "steps_per_interval"]

_EPS = 1e-12


@dataclass(frozen=True)
class Parameter:
    """One physical parameter of an equation.

    ``attrs``: HDF5 attribute names, the first is what the generator writes (PDEBench's spelling);
    ``filename_key``: how PDEBench's file names spell it (``Nu0.001``, ``beta0.1``, ``Rho1.0``);
    ``feature``: "log10" (conditioning feature log10(value / ref)) or "linear" (value / ref);
    ``positive``: values must be > 0 (else any finite value)."""

    name: str
    attrs: Tuple[str, ...]
    filename_key: str
    default: float
    ref: float
    feature: str = "log10"
    positive: bool = True
    doc: str = ""

    def check(self, value: Any, where: str) -> float:
        """``value`` as a float in range, or a UserError naming ``where`` (attribute or setting)."""
        try:
            if isinstance(value, (bool, np.bool_)):
                raise TypeError
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v) or (self.positive and v <= 0):
            need = "a finite number > 0" if self.positive else "a finite number"
            raise UserError(f"{where} = {value!r}: {self.name} ({self.doc}) must be {need} (e.g. "
                            f"{self.default:g}).")
        return v

    def feature_value(self, value: float) -> float:
        return math.log10(value / self.ref) if self.feature == "log10" else value / self.ref


# What each reward penalty measures; a spec lists the ones that hold for its equation.
PENALTY_DOCS = {
    "mass": "|mean u_next - mean u_prev| / (mean |u_prev|): the PDE conserves the mean",
    "energy": "relative growth of mean u^2/2: the PDE never creates energy",
    "tv": "relative growth of the periodic total variation: the PDE is total-variation diminishing",
    "bounds": "distance outside the invariant interval [lo, hi], relative to its width",
    "pde": "trapezoidal-rule residual of u_t = R(u) across the frame step, in [0, 1]",
}


def rms(v: Tensor, space: Tuple[int, ...] = (-1,)) -> Tensor:
    return v.pow(2).mean(dim=space).sqrt()


def trapezoid_residual(operator: Callable[[Tensor], Tensor], up: Tensor, un: Tensor, dt: float,
                       space: Tuple[int, ...] = (-1,)) -> Tensor:
    """RMS_x(r) / (RMS_x(u_t) + RMS_x(R_bar) + eps) with r = (un - up)/dt - (R(up) + R(un))/2: 0 when
    the time derivative balances the spatial operator, 1 for a frozen field that should move. RMS over
    the axes ``space`` (x; y and x in 2D)."""
    ut = (un - up) / dt
    rbar = 0.5 * (operator(up) + operator(un))
    return rms(ut - rbar, space) / (rms(ut, space) + rms(rbar, space) + _EPS)


# --- pieces the reference solvers share ------------------------------------------------------
def solver_rows(u0, who: str) -> tuple:
    """``u0`` (B, X) or (X,) as a float64 copy (B, X), and whether it was one row; refuses fewer
    than 3 cells and non-finite values."""
    u = np.array(u0, dtype=np.float64, copy=True)
    squeeze = u.ndim == 1
    if squeeze:
        u = u[None]
    if u.ndim != 2 or u.shape[-1] < 3:
        raise ValueError(f"{who}: u0 must be (B, X) with X >= 3, got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError(f"{who}: u0 has non-finite values")
    return u, squeeze


def solver_fields_2d(w0, channels: int, who: str) -> tuple:
    """``w0`` (B, Y, X, channels) or (Y, X, channels) as a float64 copy (B, Y, X, channels), and
    whether it was one state; refuses other shapes, grids under 2 x 2 and non-finite values."""
    w = np.array(w0, dtype=np.float64, copy=True)
    squeeze = w.ndim == 3
    if squeeze:
        w = w[None]
    if w.ndim != 4 or w.shape[-1] != channels or min(w.shape[1:3]) < 2:
        raise ValueError(f"{who}: the initial state must be (B, Y, X, {channels}) with Y, X >= 2, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"{who}: the initial state has non-finite values")
    return w, squeeze


def check_save_times(t_save, who: str) -> np.ndarray:
    t = np.asarray(t_save, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or not np.isfinite(t).all() or t[0] != 0.0 or np.any(np.diff(t) <= 0):
        raise ValueError(f"{who}: t_save must be a 1-D increasing sequence of finite times starting "
                         f"at 0, got {np.asarray(t_save).tolist()!r:.200}")
    return t


def steps_per_interval(interval: float, dt_max: float) -> int:
    """Number of equal steps of size <= dt_max (up to round-off) that cover ``interval``."""
    if not math.isfinite(dt_max):
        return 1
    return max(1, int(math.ceil(interval / dt_max * (1.0 - 1e-12))))


@dataclass(frozen=True)
class Published:
    """A figure from the literature on this equation's PDEBench file, shown beside ours (labelled,
    never mixed with our figures): ``method`` at ``params``, its nRMSE in PDEBench's own metric
    (all frames, the given ones copied: our ``nrmse_pdebench``), where it was published and how it
    was trained."""

    method: str
    nrmse: float
    params: Mapping[str, float]
    source: str
    setting: str = "PDEBench's data, GPU, 500 epochs"

    def applies(self, params: Mapping[str, float]) -> bool:
        """Whether it was measured at these parameter values."""
        return all(k in params and math.isclose(float(params[k]), float(v), rel_tol=1e-6)
                   for k, v in self.params.items())

class PDE:
    """Base class of an equation's spec. Subclasses set the class attributes and implement
    ``initial_conditions``, ``solve`` and ``spatial_operator``; the rest has working defaults."""

    name: str = ""                       # registry key and data.pde value, e.g. "burgers1d"
    title: str = ""                      # for people, e.g. "1D viscous Burgers"
    equation: str = ""                   # the PDE as text
    fields: Tuple[str, ...] = ("u",)     # channel names, in the file's channel order
    spatial_dims: int = 1
    boundary: str = "periodic"
    params: Tuple[Parameter, ...] = ()
    dt_ref: float = 0.05                 # conditioning feature dt / dt_ref keeps it O(1)
    filename: str = ""                   # PDEBench's file name, with {param} fields
    penalties: Tuple[str, ...] = ("pde",)
    invariants: Tuple[str, ...] = ()     # what the guard projects: "mass", "bounds"
    bounds: Optional[Tuple[float, float]] = None   # the invariant interval, with "bounds"
    # the file's fields are the whole state ``solve`` evolves, so a solve may start from any frame;
    # False: only from frame 0 (a file that saves part of the state, as PDEBench's dam break saves
    # the depth and not the momentum): solver rows start there, solver-based rewards are refused
    frames_hold_state: bool = True
    solver_settings: Dict[str, Any] = {}   # the scheme, for manifests ("scheme" required)
    recipe_id: str = ""                    # initial-condition recipe and version, for manifests
    published: Tuple[Published, ...] = ()   # the literature's figures on PDEBench's files (bench, docs)

    # -- channels and parameters --------------------------------------------------------------
    @property
    def n_channels(self) -> int:
        return len(self.fields)

    @property
    def param_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def parameter(self, name: str) -> Parameter:
        for p in self.params:
            if p.name == name:
                return p
        raise UserError(f"{self.name} has no parameter {name!r}; its parameters are "
                        f"{', '.join(self.param_names) or 'none'}.")

    def check_params(self, values: Mapping[str, Any], where: str = "setting") -> Dict[str, float]:
        """Every parameter present, in range; unknown names refused."""
        unknown = sorted(set(values) - set(self.param_names))
        if unknown:
            raise UserError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} "
                            f"not a parameter of {self.name} ({self.equation}); its parameters are "
                            f"{', '.join(self.param_names) or 'none'}.")
        missing = [p.name for p in self.params if values.get(p.name) is None]
        if missing:
            raise UserError(f"{where}: {self.name} needs {', '.join(m + '=' for m in missing)} "
                            f"({'; '.join(self.parameter(m).doc for m in missing)}).")
        return {p.name: p.check(values[p.name], f"{where} {p.name}") for p in self.params}

    def default_params(self) -> Dict[str, float]:
        return {p.name: p.default for p in self.params}

    def features(self, params: Mapping[str, float]) -> list[float]:
        """The parameters as conditioning features, in ``params`` order (each O(1))."""
        return [p.feature_value(float(params[p.name])) for p in self.params]

    def file_name(self, params: Mapping[str, float]) -> str:
        return self.filename.format(**{k: repr(float(v)) for k, v in params.items()})   # 0.001, 1.0

    def params_from_filename(self, path: str) -> Dict[str, float]:
        """Parameters spelt in a PDEBench file name (``1D_Burgers_Sols_Nu0.001.hdf5``)."""
        found = {}
        for p in self.params:
            m = re.search(rf"(?:^|[_/]){re.escape(p.filename_key)}([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)",
                          str(path).rsplit("/", 1)[-1])
            if m:
                found[p.name] = float(m.group(1))
        return found

    # -- the physics: subclasses implement these ------------------------------------------------
    def initial_conditions(self, seeds: Sequence[int] | np.ndarray, nx: Any) -> np.ndarray:
        """One initial condition per seed on ``nx`` cell centres of the unit domain: (n, nx, C); a 2D
        spec takes ``(ny, nx)`` and returns (n, ny, nx, C) on its ``domain``."""
        raise NotImplementedError

    def solve(self, u0: np.ndarray, params: Mapping[str, float], t_save: Sequence[float] | np.ndarray,
              domain_length: float = 1.0) -> np.ndarray:
        """Reference solution from ``u0`` (B, X, C) at relative times ``t_save`` (increasing, from
        0): (B, len(t_save), X, C) float64, frame 0 = u0. Row-local: a row's result never depends
        on the other rows of its batch."""
        raise NotImplementedError

    def domain_forms(self, file_length: float) -> list:
        """[(what it is, domain length)] of the physical domains a file of this equation may follow,
        its coordinates spanning ``file_length``: the file's own first. ``pdes.fit.fit_domain`` picks
        the one whose solver step reproduces the file's frames (a spec adds a released layout whose
        stored coordinates are not the ones its data was solved on)."""
        return [("the file's coordinates", float(file_length))]

    def scalar_solve_inputs(self, u0: np.ndarray, params: Mapping[str, float]) -> tuple:
        """For a one-field equation's ``solve``: ``u0`` (B, X, 1) as (B, X) and the checked
        parameters; a bad shape or parameter is a ValueError, as the solvers raise."""
        u0 = np.asarray(u0)
        if u0.ndim != 3 or u0.shape[-1] != 1:
            raise ValueError(f"{self.name} solve: u0 must be (B, X, 1), got shape {u0.shape}")
        try:
            return u0[..., 0], self.check_params(params, f"{self.name} solve")
        except UserError as exc:
            raise ValueError(str(exc)) from exc

    def spatial_operator(self, u: Tensor, params: Mapping[str, float], dx: float) -> Tensor:
        """R(u) of u_t = R(u) on frames (B, C, X) (torch, x last; a scalar equation may treat the
        channel axis as a batch axis), periodic."""
        raise NotImplementedError

    def order_cases(self) -> list:
        """Convergence problems for ``python -m ups_lightning.bench.solver_order`` (see there): each a
        dict with ``title`` and ``run(n) -> (numerical, reference, wall seconds)``. None by default."""
        return []

    # -- guard and rewards -----------------------------------------------------------------------
    def project(self, u: Tensor, given: Tensor) -> Tensor:
        """The guard's projection of decoded frames (B, *space, C) onto the invariants that the last
        given frame ``given`` (B, *space, C) fixes: its mean over space per channel (mass) and/or the
        invariant interval."""
        if "mass" in self.invariants:
            space = tuple(range(-1 - self.spatial_dims, -1))
            u = u - u.mean(dim=space, keepdim=True) + given.mean(dim=space, keepdim=True)
        if "bounds" in self.invariants and self.bounds is not None:
            u = u.clamp(*self.bounds)
        return u

    def rewards(self, u_prev: Tensor, u_next: Tensor, params: Mapping[str, float], dx: float,
                dt: float) -> Dict[str, Tensor]:
        """This equation's penalties (``penalties``) of the step u_prev -> u_next, frames (B, *space, C)
        in physical units (u_prev may have batch 1). Each (B,), >= 0, lower is better; non-finite
        candidates get +inf. Multi-channel penalties are means over channels; means and sums run over
        every spatial axis (the total variation along each, periodic)."""
        if not (dx > 0 and dt > 0):
            raise UserError(f"{self.name} rewards: need dx > 0 and dt > 0, got dx={dx}, dt={dt}.")
        if self.spatial_dims == 1 and u_prev.dim() == 2:
            u_prev = u_prev.unsqueeze(-1)
        if self.spatial_dims == 1 and u_next.dim() == 2:
            u_next = u_next.unsqueeze(-1)
        n_space = self.spatial_dims
        if u_next.dim() != 2 + n_space or u_prev.shape[1:] != u_next.shape[1:]:
            shape = "(B, X, C)" if n_space == 1 else "(B, Y, X, C)"
            raise ValueError(f"{self.name} rewards: frames must be {shape} alike, got "
                             f"{tuple(u_prev.shape)} and {tuple(u_next.shape)}")
        dtype = torch.promote_types(u_next.dtype, torch.float32)
        up, un = u_prev.to(dtype).expand_as(u_next), u_next.to(dtype)
        up, un = up.movedim(-1, 1), un.movedim(-1, 1)           # (B, C, *space): x last
        space = tuple(range(2, 2 + n_space))

        def tv(u: Tensor) -> Tensor:
            return sum((torch.roll(u, -1, a) - u).abs().sum(space) for a in space)

        out: Dict[str, Tensor] = {}
        for name in self.penalties:
            if name == "mass":
                v = (un.mean(space) - up.mean(space)).abs() / (up.abs().mean(space) + _EPS)
            elif name == "energy":
                e_prev, e_next = 0.5 * up.pow(2).mean(space), 0.5 * un.pow(2).mean(space)
                v = torch.clamp(e_next - e_prev, min=0.0) / (e_prev + _EPS)
            elif name == "tv":
                tv_prev, tv_next = tv(up), tv(un)
                v = torch.clamp(tv_next - tv_prev, min=0.0) / (tv_prev + _EPS)
            elif name == "bounds":
                lo, hi = self.bounds
                v = ((lo - un).clamp_min(0) + (un - hi).clamp_min(0)).mean(space) / (hi - lo)
            elif name == "pde":
                v = trapezoid_residual(lambda w: self.spatial_operator(w, params, dx), up, un, dt, space)
            else:
                raise ValueError(f"{self.name}: unknown penalty {name!r}")
            out[name] = torch.nan_to_num(v.mean(-1), nan=math.inf)
        return out

    def score(self, u_prev: Tensor, u_next: Tensor, params: Mapping[str, float], dx: float, dt: float,
              weights: Optional[Mapping[str, float]] = None) -> Tensor:
        """TTC reward (B,), higher is better: -(sum_k w_k penalty_k) over this equation's penalties.
        ``weights`` (default 1 each) may name any known penalty; ones this equation lacks are unused."""
        w = {k: 1.0 for k in self.penalties}
        if weights:
            unknown = sorted(set(weights) - set(PENALTY_DOCS))
            if unknown:
                raise UserError(f"reward weight(s) {unknown} unknown: the rewards are "
                                f"{', '.join(PENALTY_DOCS)}.")
            w.update({k: float(v) for k, v in weights.items() if k in self.penalties})
        pen = self.rewards(u_prev, u_next, params, dx, dt)
        total = torch.zeros_like(next(iter(pen.values())))
        for k, v in pen.items():
            if w[k] != 0.0:
                total = total + w[k] * v
        return -total

    def __repr__(self) -> str:
        return f"<PDE {self.name}: {self.equation}>"
