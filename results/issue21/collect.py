"""The TTC-against-its-baselines table of issue 21 from the leaderboard rows of its evaluations.

    python results/issue21/collect.py outputs/ttc21/lb.csv > results/issue21/ttc_baselines.json
"""
import csv
import json
import sys

ROWS = ("operator", "members_mean", "candidates_mean", "solver_hybrid", "solver_32", "ttc", "solver")
KEYS = ("nrmse", "nrmse_1", "nrmse_10", "nrmse_31", "ms_per_traj")


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


out = []
with open(sys.argv[1]) as f:
    for r in csv.DictReader(f):
        rows = {name: {k: num(r.get(f"{name}_{k}")) for k in KEYS} for name in ROWS if r.get(f"{name}_nrmse")}
        out.append({
            "run_id": r["run_id"], "git_commit": r["git_commit"], "split": r["split"], "n": int(r["n_test"]),
            "run_dir": r["run_dir"], "ttc": json.loads(r["ttc"]) if r["ttc"] != "off" else "off",
            "params_ttc_row": int(float(r["params"])), "rows": rows,
            "ttc_best_baseline": r.get("ttc_best_baseline"),
            "ttc_gain_nrmse_over_plain": num(r.get("ttc_gain_nrmse")),
            "ttc_gain_beyond_baselines": num(r.get("ttc_gain_beyond_baselines")),
            "solver_hybrid_weight": num(r.get("solver_hybrid_weight")),
            "solver_hybrid_weight_chosen_on": r.get("solver_hybrid_weight_chosen_on"),
            "solver_hybrid_val_nrmse": json.loads(r["solver_hybrid_val_nrmse"]) if r.get("solver_hybrid_val_nrmse") else None,
        })
print(json.dumps(out, indent=1))
