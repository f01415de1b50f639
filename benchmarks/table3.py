"""Paper Table 3 at CPU scale: systems heterogeneity (budget tiers) on wordnet-topics.

    python benchmarks/table3.py [--quick] [--rounds R] [--alphas 1,0.01] [--tiers 3,5]
                                [--threads N] [--out DIR]

Client c gets tier b_c uniformly in {1..b_s} (seeded); the server rank is r_s = 16 in both
paper settings: 3 tiers with r_base 4 (ranks 1, 4, 16) and 5 tiers with r_base 2 (1..16).
Methods (paper Sec. 4.4): all clients at the lowest tier (rank 1), the highest tier only
(the others dropped), HetLoRA (rank r_c slices, zero padding), FLASC under tiers (rank 16,
upload density r_c / 16). Data heterogeneity: Dirichlet alpha in {1, 0.01}.

Prints final accuracy per method and setting, total upload, and HetLoRA's per-tier accuracy
(`tier{b}/accuracy`: the server model truncated to tier b's rank). Default scale: 20k
examples, 1k test, 10 clients x 4 local steps, 30 rounds: 16 runs, ~8 min each on one busy
CPU thread. --quick (5k examples, 12 rounds, tiers 3 only): 8 runs, ~3 min each.
The helpers here (BASE/QUICK settings, `run_arm`) are shared by fig8.py and padding.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import Simulation  # noqa: E402

BASE = {"task.name": "wordnet-topics", "task.max_examples": 20000, "task.test_size": 1000,
        "client.max_steps": 4, "clients_per_round": 10, "server.lr": 0.01, "rounds": 30,
        "eval_every": 5}
QUICK = {**BASE, "task.max_examples": 5000, "task.test_size": 500, "rounds": 12,
         "eval_every": 4}
TIERS = {3: 4, 5: 2}  # tiers -> r_base; r_s = 16 in both
METHODS = {
    "All lowest tier (rank 1)": "all_lowest_tier",
    "Highest tier only (rank 16)": "highest_tier_only",
    "HetLoRA": "hetlora",
    "FLASC": "flasc_tiers",
}


def add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base setting, e.g. --set task.max_examples=500")


def setup(args: argparse.Namespace, name: str) -> tuple[dict, Path]:
    torch.set_num_threads(args.threads)
    base = dict(QUICK if args.quick else BASE)
    if args.rounds:
        base["rounds"] = args.rounds
    base.update(item.split("=", 1) for item in args.set)
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    print(f"{name}: {base} -> {out}", flush=True)
    return base, out


def run_arm(base: dict, out: Path, overrides: dict) -> dict:
    """Run one config into `out`. A rerun skips finished arms and resumes interrupted ones."""
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    start = time.perf_counter()
    if (out / "checkpoint.safetensors").exists():
        summary = Simulation.resume(out, progress=False).run()
    else:
        cfg = load_config(None, [f"{k}={v}" for k, v in {**base, **overrides}.items()])
        summary = Simulation(cfg, out, progress=False).run()
    final = summary["final"]
    print(f"  {out.name}: acc {final.get('accuracy', float('nan')):.3f}, upload "
          f"{summary['total_upload_bytes'] / 1e6:.1f} MB, "
          f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return summary


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", default="1,0.01")
    ap.add_argument("--tiers", default=None, help="default 3,5; --quick 3")
    add_common(ap)
    args = ap.parse_args(argv)
    base, out = setup(args, "table3")
    alphas = [float(a) for a in args.alphas.split(",")]
    tiers = [int(t) for t in (args.tiers or ("3" if args.quick else "3,5")).split(",")]
    settings = [(a, b) for a in alphas for b in tiers]
    res: dict[tuple, dict] = {}
    for a, b in settings:
        for label, method in METHODS.items():
            over = {"method.name": method, "het.tiers": b, "het.r_base": TIERS[b],
                    "model.rank": 16, "task.alpha": a}
            res[label, a, b] = run_arm(base, out / f"{method}-a{a:g}-t{b}", over)
    head = " | ".join(f"a={a:g}, {b} tiers" for a, b in settings)
    lines = [f"| method | {head} | upload MB (per setting) |",
             "|---" * (len(settings) + 2) + "|"]
    for label in METHODS:
        accs = " | ".join(f"{res[label, a, b]['final']['accuracy']:.3f}" for a, b in settings)
        ups = ", ".join(f"{res[label, a, b]['total_upload_bytes'] / 1e6:.1f}"
                        for a, b in settings)
        lines.append(f"| {label} | {accs} | {ups} |")
    lines += ["", "HetLoRA per-tier accuracy (server model truncated to the tier's rank; "
              f"tier b_s = the full model): {'; '.join(_tiers(res, a, b) for a, b in settings)}"]
    table = "\n".join(lines)
    print(table)
    (out / "table3.md").write_text(f"settings: {base}\n\n{table}\n")
    return table


def _tiers(res: dict, a: float, b: int) -> str:
    final = res["HetLoRA", a, b]["final"]
    accs = [final.get(f"tier{t}/accuracy", float("nan")) for t in range(1, b)]
    return f"a={a:g}, {b} tiers: " + ", ".join(f"{x:.3f}" for x in [*accs, final["accuracy"]])


if __name__ == "__main__":
    main()
