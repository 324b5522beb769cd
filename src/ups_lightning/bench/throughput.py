"""`python -m ups_lightning.bench.throughput [smoke=true] [sizes=[...]] [train_stages=[...]]`: how much of
this machine training and rollouts use (issue 20).

Measured in one process, one configuration after another, on synthetic data of the small sets'
shapes (1D: 256 cells and 32 tokens; 2D, ``pde=swe2d`` or another 2D equation: 64 x 64 cells and
8 x 8 tokens; ``grid`` sets another; the equation's channels, 41 frames; the speed of a step does
not depend on the values). ``variants`` times each size again under other model settings, e.g. the
encoder's stem (``"variants=[[],['model.stem_kernel=3']]"`` on the command line):

- **the machine's peak**: an ``n x n`` matmul in float32 and bfloat16 (best of 5), in the same run;
- **training**, per stage (autoencoder, operator, diffusion, distill) x model size x precision x
  batch scale: each stage's own LightningModule and DataLoader under a Lightning Trainer, as training
  runs them (logging, optimizer, the stage's batch size from ``conf/stages``); per step: the FLOPs
  of forward + backward (``torch.utils.flop_counter``: matmuls, convolutions, attention), the median
  step time, samples per second over the whole loop (data loading included), achieved GFLOP/s and
  its share of the float32 peak. ``compile=true`` adds a torch.compile run and reports its compile
  time (the first steps) apart;
- **inference**: a guarded plain rollout (``evaluate``'s default guard: re-encode + the equation's
  projection) of ``rollout.trajectories`` trajectories of ``pde`` batched, ``rollout.steps`` steps, in
  ms per trajectory split into operator step, decode, guard (projection), encode and the
  consistency reward (``ttc=ensemble``'s, scored on one candidate per step); the whole rollout on
  the fast path (the decoder's cached grid plan) against the direct path, alternating; and the
  ``ttc=ensemble`` search over ``rollout.ttc_members`` members (the reward and the search in 1D only:
  the consistency reward's coarse solver is 1D).

The torch thread count and how busy the cores were before and after are printed with the figures:
a figure taken on busy cores is not a figure of this machine (the report says so). Writes ``out``
(JSON, atomically).
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ups_lightning.atomic import atomic_write_json
from ups_lightning.provenance import command_line
from ups_lightning.errors import UserError, report_user_errors
from ups_lightning.pdes import get_pde, registered
from ups_lightning.schema import setting, validate

log = logging.getLogger("ups_lightning.throughput")

__all__ = ["matmul_peak", "train_throughput", "rollout_breakdown", "run_throughput"]

CELLS, FRAMES, DT = 256, 41, 0.05   # the small 1D sets' grid, frames and frame step
GRID_2D, TOKENS_2D = (64, 64), 64    # the small 2D sets' grid and tokens (8 x 8)
SMOKE = dict(sizes=["dim8"], warmup_steps=1, steps=2, peak_size=256,
             rollout=dict(sizes=["dim8"], trajectories=4, steps=3, repeats=1, reward_cells=16, ttc_members=2))
SMOKE_GRID_2D = (16, 16)


def grid_of(pde: str, grid: Optional[List[int]], smoke: bool = False) -> tuple:
    """The measured grid: ``grid``, or the small sets' grid of the equation's dimension."""
    if grid:
        return tuple(int(v) for v in grid)
    if get_pde(pde).spatial_dims == 1:
        return (CELLS,)
    return SMOKE_GRID_2D if smoke else GRID_2D


def _unit_grid(shape: tuple) -> torch.Tensor:
    """Cell-centre unit coordinates: (X,) in 1D, (H, W, 2) in 2D (x[..., k] along axis k)."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in shape]
    return axes[0] if len(shape) == 1 else torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype``: the best of ``repeats`` after a warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# --- training -------------------------------------------------------------------------------------
class _StepTimer(L.Callback):
    """Times each training step (batch start to batch end: forward, backward, optimizer) after
    ``warmup``; counts one step's FLOPs (untimed, the step after warm-up)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.flop_step = warmup, warmup
        self.step_s: List[float] = []
        self.first_s: List[float] = []
        self.ends: List[float] = []
        self.flops = 0
        self._counter: Optional[FlopCounterMode] = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.flop_step:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        took = time.perf_counter() - self._t0
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = int(self._counter.get_total_flops())
            self._counter = None
        elif batch_idx < self.warmup:
            self.first_s.append(took)
        else:
            self.step_s.append(took)
            self.ends.append(time.perf_counter())


def _synthetic_loader(name: str, contract: Any, model_cfg: Dict[str, Any], stages_cfg: Dict[str, Any],
                      batch_size: int, n_batches: int) -> DataLoader:
    """The stage's own dataset class over random tensors of the small sets' shapes."""
    from ups_lightning.data.datamodule import _as_batch, _TensorItems, _Windows

    g = torch.Generator().manual_seed(0)
    C, space = contract.n_channels, tuple(contract.spatial_shape)
    if name == "autoencoder":
        ds = _TensorItems({"u": torch.randn(batch_size * n_batches, *space, C, generator=g)})
    else:
        steps = stages_cfg["operator"]["rollout_steps"] if name == "operator" else 1
        n_traj = max(1, -(-batch_size * n_batches // (FRAMES - steps)))
        z = torch.randn(n_traj, FRAMES, model_cfg["n_tokens"], model_cfg["dim"], generator=g)
        u = torch.randn(n_traj, FRAMES, *space, C, generator=g)
        cond = torch.randn(n_traj, contract.cond_dim, generator=g)
        ds = _Windows(z, u, cond, np.arange(FRAMES - steps), steps)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=_as_batch,
                      generator=torch.Generator().manual_seed(0))


def _stage(size: str, name: str, pde: str, seed: int, shape: tuple = (CELLS,), variant: tuple = ()) -> tuple:
    """(module, model settings, stages' settings, data contract) of stage ``name`` at ``size`` (with the
    model overrides ``variant``), built as training builds it (``training._stage_module``), on the grid
    ``shape`` of equation ``pde``."""
    from ups_lightning.config import compose_config
    from ups_lightning.data.contract import DataContract
    from ups_lightning.training import _stage_module

    tokens = [f"model.n_tokens={TOKENS_2D}"] if len(shape) == 2 else []
    cfg = compose_config("train", [f"model={size}", *tokens, *variant])
    contract = DataContract((pde,), tuple(shape), get_pde(pde).n_channels)
    torch.manual_seed(seed)
    module = _stage_module(cfg, name, contract)
    with torch.no_grad():
        module.x.copy_(_unit_grid(tuple(shape)))
    return (module, OmegaConf.to_container(cfg.model, resolve=True),
            OmegaConf.to_container(cfg.stages, resolve=True), contract)


def train_throughput(size: str, name: str, pde: str, precision: str = "32-true", batch_scale: float = 1.0,
                     compile: bool = False, warmup: int = 3, steps: int = 20, shape: tuple = (CELLS,),
                     variant: tuple = ()) -> Dict[str, Any]:
    """One stage x size x precision x batch scale on data of equation ``pde`` on the grid ``shape``,
    with the model overrides ``variant`` (module doc): a dict of its figures."""
    from ups_lightning.training import compile_networks

    module, model_cfg, stages_cfg, contract = _stage(size, name, pde, seed=0, shape=shape, variant=variant)
    batch = max(1, int(round(stages_cfg[name]["batch_size"] * batch_scale)))
    if compile:
        compile_networks(module)
    total = warmup + 1 + steps
    loader = _synthetic_loader(name, contract, model_cfg, stages_cfg, batch, total)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=total, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - start
    step = statistics.median(timer.step_s) if timer.step_s else float("nan")
    loop = (timer.ends[-1] - timer.ends[0]) / (len(timer.ends) - 1) if len(timer.ends) > 1 else step
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"size": size, "stage": name, "precision": precision, "compile": compile, "batch": batch,
            "grid": list(shape), "variant": list(variant), "trainable_params": params, "gflop_per_step": timer.flops / 1e9, "step_ms": 1000 * step,
            "loop_ms": 1000 * loop, "samples_per_s": batch / loop, "gflops": timer.flops / step / 1e9,
            "first_steps_s": sum(timer.first_s), "wall_s": wall}


# --- inference ------------------------------------------------------------------------------------
def _random_pipeline(size: str, seed: int, pde: str, shape: tuple = (CELLS,), variant: tuple = ()) -> Any:
    """An operator-stage module of ``size`` with random weights (the zero-initialised output heads
    too, so every layer computes), on the grid ``shape``."""
    module = _stage(size, "operator", pde, seed, shape, variant)[0]
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not p.abs().sum():
                p.normal_(0.0, 0.02)
    return module.eval()


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def rollout_breakdown(size: str, pde: str, trajectories: int = 128, steps: int = 31, repeats: int = 3,
                      reward_cells: int = 32, ttc_members: int = 3, seed: int = 0, shape: tuple = (CELLS,),
                      variant: tuple = ()) -> Dict[str, Any]:
    """ms per trajectory of a guarded plain rollout by part, the whole rollout on the fast and the
    direct decode path, and the ``ttc=ensemble`` search (module doc; the reward and the search in 1D
    only, else None)."""
    from ups_lightning.inference.candidates import Proposer
    from ups_lightning.inference.rewards import make_reward
    from ups_lightning.inference.rollout import Guard, Physics, Surrogate, rollout, ttc_rollout
    from ups_lightning.inference.ttc import TTCConfig
    spec = get_pde(pde)
    params = spec.default_params()
    one_d = len(shape) == 1
    dt = DT if one_d else spec.dt_ref
    physics = Physics(pde=pde, params=params, dx=1.0 / shape[-1], dt=dt, domain_length=1.0)
    u0 = torch.from_numpy(spec.initial_conditions(np.arange(trajectories) + 10_000,
                                                  shape[0] if one_d else shape)).float()

    def surrogate(k: int) -> Surrogate:
        module = _random_pipeline(size, seed + k, pde, shape, variant)
        cond = module.contract.conditioning(pde, params, dt)
        return Surrogate(module, module.x.clone(), cond, guard=Guard(reencode=True, invariants=True), pde=spec)

    sur = surrogate(0)
    reward = make_reward("consistency", physics, cells=reward_cells) if one_d else (lambda prev, u: None)
    parts = {"operator_step": 0.0, "decode": 0.0, "guard": 0.0, "encode": 0.0, "reward": 0.0}
    with torch.no_grad():
        rollout(sur, u0[:2], 1)   # first-call allocations and the decode plan, not timed

        def lap(key: str, fn):
            start = time.perf_counter()
            out = fn()
            parts[key] += time.perf_counter() - start
            return out

        z, prev = sur.encode(u0), u0
        for _ in range(steps):
            z = lap("operator_step", lambda: sur.step(z))
            u = lap("decode", lambda: sur.decode(z))
            u = lap("guard", lambda: sur.pde.project(u, u0))
            lap("reward", lambda: reward(prev, u.unsqueeze(1)))
            z = lap("encode", lambda: sur.encode(u))
            prev = u
        counted = {}
        for key, fn in (("operator_step", lambda: sur.step(z)), ("decode", lambda: sur.decode(z)),
                        ("encode", lambda: sur.encode(u))):
            with FlopCounterMode(display=False) as counter:
                fn()
            counted[key] = counter.get_total_flops() * steps / trajectories   # FLOPs per trajectory
        fast, direct = [], []
        decoder = sur.m.autoencoder.decoder
        for _ in range(repeats):   # A B A B: the two paths see the same machine
            fast.append(_median_ms(lambda: rollout(sur, u0, steps), 1))
            decoder.fast_decode = False
            try:
                direct.append(_median_ms(lambda: rollout(sur, u0, steps), 1))
            finally:
                decoder.fast_decode = True
        ttc_ms = None
        if one_d:
            members = [sur] + [surrogate(k) for k in range(1, ttc_members)]
            proposer = Proposer(members)
            cfg = TTCConfig(n_candidates=ttc_members, beam_width=1, horizon=1, budget=None)
            ttc_ms = _median_ms(lambda: ttc_rollout(proposer, u0, steps, cfg, reward), max(1, repeats - 1))
    per_traj = {k: 1000 * v / trajectories for k, v in parts.items()}
    if not one_d:
        per_traj["reward"] = None
    return {"size": size, "grid": list(shape), "variant": list(variant), "trajectories": trajectories, "steps": steps,
            "parts_ms_per_traj": per_traj, "parts_mflop_per_traj": {k: v / 1e6 for k, v in counted.items()},
            "rollout_ms_per_traj": statistics.median(fast) / trajectories,
            "rollout_direct_ms_per_traj": statistics.median(direct) / trajectories,
            "ttc_ensemble_ms_per_traj": None if ttc_ms is None else ttc_ms / trajectories, "ttc_members": ttc_members,
            "reward_cells": reward_cells}


# --- the command ----------------------------------------------------------------------------------
def _machine(threads: int, busy_before: Optional[float]) -> Dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ups_lightning.provenance import git_commit, package_version

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": threads, "busy_cores_before": busy_before, "commit": git_commit(),
            "package_version": package_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


@dataclass
class RolloutSettings:
    sizes: List[str] = MISSING
    trajectories: int = setting(1)
    steps: int = setting(1)
    repeats: int = setting(1)
    reward_cells: int = setting(3)
    ttc_members: int = setting(2)


@dataclass
class ThroughputSettings:
    """conf/throughput.yaml: its keys, types and ranges (ups_lightning.schema)."""

    pde: str = MISSING
    grid: Optional[List[int]] = MISSING
    smoke: bool = MISSING
    sizes: List[str] = MISSING
    variants: List[List[str]] = MISSING
    train_stages: List[str] = MISSING
    precisions: List[str] = MISSING
    compile: bool = MISSING
    batch_scales: List[float] = MISSING
    warmup_steps: int = setting(1)
    steps: int = setting(1)
    peak_size: int = setting(1)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    threads: Optional[int] = setting(1)
    out: str = MISSING
    seed: int = setting(0)


def check_config(cfg: DictConfig) -> Dict[str, Any]:
    """The settings to run, smoke mode applied; a UserError naming a bad one."""
    from ups_lightning.stages import STAGE_ORDER

    settings = OmegaConf.to_container(validate(cfg, ThroughputSettings, "throughput", "conf/throughput.yaml"))
    if settings["smoke"]:
        for k, v in SMOKE.items():
            settings[k] = {**settings[k], **v} if isinstance(v, dict) else v
    if settings["pde"] not in registered():
        raise UserError(f"throughput: pde={settings['pde']!r} is not an equation; choose from {sorted(registered())}.")
    bad = [s for s in settings["train_stages"] if s not in STAGE_ORDER]
    if bad:
        raise UserError(f"throughput: train_stages={bad} are not stages; choose from {STAGE_ORDER}.")
    dims = get_pde(settings["pde"]).spatial_dims
    if settings["grid"] is not None and (len(settings["grid"]) != dims or min(settings["grid"]) < 1
                                         or (dims == 2 and any(v % 8 for v in settings["grid"]))
                                         or (dims == 1 and settings["grid"][0] < 32)):
        raise UserError(f"throughput: grid={settings['grid']}: expected {dims} positive cell count(s) for "
                        f"{settings['pde']} ({'each a multiple of 8, for its 8 x 8 tokens' if dims == 2 else 'at least 32'}), "
                        "or null for the small sets' grid.")
    if not settings["variants"] or not all(isinstance(v, list) for v in settings["variants"]):
        raise UserError(f"throughput: variants={settings['variants']}: expected a list of model override lists, "
                        "e.g. [[]] (as configured) or \"variants=[[],['model.stem_kernel=3']]\" on the command line.")
    if any(not isinstance(s, (int, float)) or s <= 0 for s in settings["batch_scales"]):
        raise UserError(f"throughput: batch_scales={settings['batch_scales']} must be positive numbers.")
    from ups_lightning import CONF_DIR

    known = {p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")}
    for size in list(settings["sizes"]) + list(settings["rollout"]["sizes"]):
        if size not in known:
            raise UserError(f"throughput: size {size!r} is not a model config; choose from {sorted(known)}.")
    return settings


def run_throughput(cfg: DictConfig, say=print) -> Dict[str, Any]:
    from ups_lightning.runtime import busy_cores, configure_cpu

    s = check_config(cfg)
    busy_before = busy_cores(0.5)
    threads = configure_cpu(s["threads"], "threads")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    result: Dict[str, Any] = {"command": command_line(), "settings": s,
                              "machine": _machine(threads, busy_before)}
    peak32 = matmul_peak(torch.float32, s["peak_size"])
    peak16 = matmul_peak(torch.bfloat16, s["peak_size"])
    result["peak_gflops"] = {"float32": peak32, "bfloat16": peak16}
    say(f"machine: {result['machine']['cpu']}, {threads} torch threads, {busy_before if busy_before is not None else '?'}"
        f" cores busy before; peak ({s['peak_size']}^2 matmul): float32 {peak32:.0f} GFLOP/s, bfloat16 "
        f"{peak16:.0f} GFLOP/s")
    shape = grid_of(s["pde"], s["grid"], s["smoke"])
    variants = [tuple(v) for v in s["variants"]]
    result["grid"] = list(shape)
    say(f"{s['pde']} on {' x '.join(map(str, shape))} cells")
    rows = []
    say("\n| stage | size | variant | precision | compile | batch | GFLOP/step | step ms | samples/s | GFLOP/s | % fp32 peak |")
    say("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    configs = [(name, size, variant, precision, scale, comp) for name in s["train_stages"] for size in s["sizes"]
               for variant in variants for precision in s["precisions"] for scale in s["batch_scales"]
               for comp in ([False, True] if s["compile"] else [False])]
    for name, size, variant, precision, scale, comp in configs:
        r = train_throughput(size, name, s["pde"], precision, scale, comp, s["warmup_steps"], s["steps"], shape, variant)
        r["share_of_fp32_peak"] = r["gflops"] / peak32
        rows.append(r)
        say(f"| {name} | {size} | {' '.join(variant) or '-'} | {precision} | {'yes' if comp else 'no'} | {r['batch']} | "
            f"{r['gflop_per_step']:.3f} | {r['step_ms']:.1f} | {r['samples_per_s']:.0f} | "
            f"{r['gflops']:.1f} | {100 * r['share_of_fp32_peak']:.0f}% |"
            + (f" (compile + first steps {r['first_steps_s']:.0f} s)" if comp else ""))
    result["training"] = rows
    ro = s["rollout"]
    result["rollout"] = []
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"

    for size, variant in [(size, variant) for size in ro["sizes"] for variant in variants]:
        r = rollout_breakdown(size, s["pde"], ro["trajectories"], ro["steps"], ro["repeats"], ro["reward_cells"],
                              ro["ttc_members"], s["seed"], shape, variant)
        result["rollout"].append(r)
        p = r["parts_ms_per_traj"]
        say(f"\nrollout {size}{' ' + ' '.join(variant) if variant else ''}: {ro['trajectories']} trajectories x "
            f"{ro['steps']} steps, guarded (re-encode + projection), ms per trajectory:")
        say("| operator step | decode | guard | encode | reward (consistency, "
            f"{ro['reward_cells']} cells) | plain rollout | direct decode path | ttc=ensemble ({ro['ttc_members']}) |")
        say("|---:|---:|---:|---:|---:|---:|---:|---:|")
        say(f"| {p['operator_step']:.2f} | {p['decode']:.2f} | {p['guard']:.3f} | {p['encode']:.2f} | "
            f"{ms(p['reward'])} | {r['rollout_ms_per_traj']:.2f} | {r['rollout_direct_ms_per_traj']:.2f} | "
            f"{ms(r['ttc_ensemble_ms_per_traj'])} |")
        f = r["parts_mflop_per_traj"]
        floor = sum(f.values()) / 1e3 / peak32 * 1e3   # ms per trajectory at the float32 peak
        r["ms_per_traj_at_fp32_peak"] = floor
        r["share_of_fp32_peak"] = floor / r["rollout_ms_per_traj"]
        say(f"FLOPs per trajectory (matmul/conv/attention): operator {f['operator_step']:.0f} M, decode "
            f"{f['decode']:.0f} M, encode {f['encode']:.0f} M: {floor:.2f} ms at the float32 peak, so the "
            f"plain rollout runs at {100 * r['share_of_fp32_peak']:.0f}% of it")
    busy_after = busy_cores(0.5)
    result["machine"]["busy_cores_after"] = busy_after
    # this process is idle while it samples, so anything busy is another process
    busy = max(b for b in (busy_before, busy_after) if b is not None) if (busy_before, busy_after) != (None, None) else None
    if busy is not None and busy > 0.3:
        result["warning"] = (f"{busy:.1f} cores were busy outside this benchmark: its figures are not this "
                             "machine's. Rerun with nothing else running.")
        say(f"\nWARNING: {result['warning']}")
    out = Path(s["out"])
    atomic_write_json(out, result)
    say(f"\nwrote {out}")
    return result


@hydra.main(config_path="pkg://ups_lightning.conf", config_name="throughput", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_throughput(cfg)


if __name__ == "__main__":
    main()
