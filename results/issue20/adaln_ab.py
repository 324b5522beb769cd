"""A/B of the operator's AdaLN changes (issue 20), in one process, alternating: the dim32 operator
training step (batch 64, 8-step unroll, fused AdamW) with (new) the conditioning made once per unroll
and fused multiply-adds for modulation and gates, against (old) the same model with the conditioning
recomputed every step and separate multiply/add operations. Eager, 2 threads.

    python results/issue20/adaln_ab.py > results/issue20/adaln_ab.json
"""
import json
import statistics
import subprocess

import torch

import ups_lightning.models.layers as layers
from ups_lightning.bench.throughput import _median_ms, _stage, _synthetic_loader
from ups_lightning.runtime import configure_cpu

threads = configure_cpu(2, "threads")
m, mc, sc, contract = _stage("dim32", "operator", "burgers1d", 0)
batch = next(iter(_synthetic_loader("operator", contract, mc, sc, 64, 4)))
m.log = lambda *a, **k: None
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=True)
new_mod, new_gated = layers.modulate, layers.gated


def old_mod(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def old_gated(x, g, y):
    return x + g.unsqueeze(1) * y


def old_loss(b):
    z, u, cond = b["z"], b["u"], b["cond"]
    state, loss, steps = z[:, 0], z.new_zeros(()), z.shape[1] - 1
    for k in range(1, steps + 1):
        pred = m(state, cond)   # raw cond: the conditioning recomputed at every unrolled step
        loss = loss + m.step_loss(pred, z[:, k], u[:, k])
        state = pred
    return loss / steps


def run(variant, n=8):
    layers.modulate, layers.gated = (old_mod, old_gated) if variant == "old" else (new_mod, new_gated)
    f = old_loss if variant == "old" else (lambda b: m.training_step(b, 0))

    def step():
        opt.zero_grad(set_to_none=True)
        f(batch).backward()
        opt.step()

    return _median_ms(step, n)


for v in ("old", "new"):
    run(v, 3)
res = {"old": [], "new": []}
for _ in range(5):
    for v in ("old", "new"):
        res[v].append(run(v))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"command": "python results/issue20/adaln_ab.py", "commit": commit, "threads": threads,
                  "what": "dim32 operator training step, batch 64, 8-step unroll, ms (median of 8 steps per round, "
                          "5 alternating rounds)", "step_ms": res,
                  "ratio_old_over_new": statistics.median(res["old"]) / statistics.median(res["new"])}, indent=1))
