"""Eager against compiled training steps per stage (issue 20), in one process: each stage's module
at dim32 (as training builds it), its trainable networks compiled by ``training.compile_networks``
(what ``trainer.compile`` does), then eager and compiled steps alternated in rounds
(``torch.compiler.set_stance("force_eager")`` runs the compiled module eager). Compilation from a
cold inductor cache (the caller clears it). 2 threads, fused AdamW, synthetic batches of the small
sets' shapes.

    rm -rf /tmp/torchinductor_$USER; python results/issue20/compile_ab.py > results/issue20/compile_ab.json
"""
import json
import statistics
import subprocess
import sys
import time

import torch

from ups_lightning.bench.throughput import _median_ms, _stage, _synthetic_loader
from ups_lightning.runtime import configure_cpu
from ups_lightning.training import compile_networks

threads = configure_cpu(2, "threads")


def measure(name, size="dim32", rounds=3, n=8):
    m, mc, sc, contract = _stage(size, name, "burgers1d", 0)
    batch = next(iter(_synthetic_loader(name, contract, mc, sc, sc[name]["batch_size"], 4)))
    m.log = lambda *a, **k: None
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    m.train()

    def step():
        opt.zero_grad(set_to_none=True)
        m.training_step(batch, 0).backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    compile_networks(m)
    step()
    step()
    compile_s = time.perf_counter() - t
    eager, compiled = [], []
    for _ in range(rounds):
        with torch.compiler.set_stance("force_eager"):
            eager.append(_median_ms(step, n))
        compiled.append(_median_ms(step, n))
    return {"stage": name, "size": size, "batch": sc[name]["batch_size"], "eager_step_ms": eager,
            "compiled_step_ms": compiled, "compile_and_2_steps_s": compile_s,
            "speedup": statistics.median(eager) / statistics.median(compiled)}


stages = sys.argv[1:] or ["operator", "autoencoder", "diffusion"]
rows = [measure(s) for s in stages]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"command": "python results/issue20/compile_ab.py (inductor cache cleared first)",
                  "commit": commit, "threads": threads, "rows": rows}, indent=1))
