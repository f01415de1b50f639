"""HetLoRA padding rules under rank heterogeneity: zero vs replication vs sparsity-weighted.

    python benchmarks/padding.py [--quick] [--rounds R] [--seeds 3] [--alpha 1] [--tiers 3]
                                 [--target ACC] [--threads N] [--out DIR]

HetLoRA on wordnet-topics with budget tiers (3 tiers, r_base 4: ranks 1, 4, 16; or 5 tiers,
r_base 2), `het.aggregation` in {zero_pad, replication_pad, sparsity_weighted}, plus
replication padding with `het.rank_allocation=loss` (docs/heterogeneity.md).
Same seeds for every rule, so each seed samples the same clients
with the same tiers and data. Reports, over seeds: rounds and cumulative upload bytes until
the server model first reaches the target accuracy (default: the best accuracy that every
run reaches, so it is defined for all), final accuracy (mean +- std) and total upload.
Default scale (BASE in table3.py, 30 rounds, 3 seeds): 12 runs, ~8 min each on one busy CPU
thread. --quick: 12 rounds, 1 seed: 4 runs, ~3 min each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from table3 import TIERS, add_common, run_arm, setup  # noqa: E402

from fedlora.rundir import read_jsonl  # noqa: E402

# arm name -> het overrides; the last arm is replication padding with the loss-based rank
# allocation its paper pairs it with (same multiset of ranks per round, so the same bytes).
ARMS = {"zero_pad": {"het.aggregation": "zero_pad"},
        "replication_pad": {"het.aggregation": "replication_pad"},
        "sparsity_weighted": {"het.aggregation": "sparsity_weighted"},
        "replication_pad + loss ranks": {"het.aggregation": "replication_pad",
                                         "het.rank_allocation": "loss"}}
RULES = tuple(ARMS)


def to_target(rows: list[dict], target: float) -> tuple[int, int] | None:
    """(round, cumulative upload bytes) of the first evaluation reaching `target`."""
    for r in rows:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return r["round"], r["cum_upload_bytes"]
    return None


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=None, help="default 3; --quick 1")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--tiers", type=int, default=3, choices=sorted(TIERS))
    ap.add_argument("--target", type=float, default=None)
    add_common(ap)
    args = ap.parse_args(argv)
    base, out = setup(args, "padding")
    seeds = range(args.seeds or (1 if args.quick else 3))
    het = {"method.name": "hetlora", "het.tiers": args.tiers, "het.r_base": TIERS[args.tiers],
           "model.rank": 16, "task.alpha": args.alpha}
    rows: dict[tuple[str, int], list[dict]] = {}
    for rule in RULES:
        for seed in seeds:
            d = out / f"{rule.replace(' + ', '-').replace(' ', '_')}-s{seed}"
            run_arm(base, d, {**het, **ARMS[rule], "seed": seed})
            rows[rule, seed] = read_jsonl(d / "metrics.jsonl")
    target = args.target
    if target is None:
        target = min(max(r["accuracy"] for r in rs if "accuracy" in r) for rs in rows.values())
    lines = [f"target accuracy {target:.3f}; alpha {args.alpha:g}, {args.tiers} tiers, "
             f"seeds {list(seeds)}", "",
             "| rule | rounds to target | upload MB to target | final acc | total upload MB |",
             "|---|---|---|---|---|"]
    for rule in RULES:
        hits = [to_target(rows[rule, s], target) for s in seeds]
        finals = [[r for r in rows[rule, s] if "accuracy" in r][-1]["accuracy"] for s in seeds]
        total = statistics.mean(rows[rule, s][-1]["cum_upload_bytes"] for s in seeds)
        rounds = ", ".join("-" if h is None else str(h[0]) for h in hits)
        mb = ", ".join("-" if h is None else f"{h[1] / 1e6:.1f}" for h in hits)
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(f"| {rule} | {rounds} | {mb} | {statistics.mean(finals):.3f} +- {std:.3f} "
                     f"| {total / 1e6:.1f} |")
    table = "\n".join(lines)
    print(table)
    (out / "padding.md").write_text(f"settings: {base}\n\n{table}\n")
    return table


if __name__ == "__main__":
    main()
