"""Paper Figs. 9-10 at CPU scale: what user-level DP costs each method on wordnet-topics.

    python benchmarks/privacy.py [--quick] [--rounds R] [--epsilons 8,2] [--threads N] [--out DIR]

Fig. 9: full fine-tuning, LoRA r=16, FFA-LoRA r=16 and FLASC r=16 (d_up = 1/4) without
noise and at two privacy levels. Fig. 10: LoRA at ranks {1, 4, 16, 64}, the same levels.

Setting. N = 1,000 clients (50,000 training examples, Dirichlet alpha = 1), Poisson sampling
with an expected 10 clients per round, and the paper's cohort simulation: the noise is that
of a 1,000-client round (``dp.noise_cohort_size``), so epsilon is for that simulated run and
the model actually trained is less private (see docs/privacy.md). DP-FedAdam: clip each
upload to C, sum, add N(0, sigma^2 C^2 (m/M)^2), divide by m, FedAdam step.

sigma per level is calibrated with ``fedlora.privacy.calibrate_noise`` to the target epsilon
over the run's rounds (PLD accountant, add/remove neighbours, delta = 1/N). The clip norm C is
set per method from its own non-private run (sigma = 0, C = inf, bit-identical to a plain
run): the median over rounds of the median upload l2 norm, so about half the updates are
clipped. Noise std per coordinate of the aggregate is then sigma C / M, and what hurts a
method is its noise norm sigma C sqrt(D) / M against a signal of norm <= C: the number of
trained entries D is the whole story the paper tells (full fine-tuning D = 22.7M, LoRA
r = 16 D ~ 0.15M).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table1 import BACKBONE, QUICK, Runner  # noqa: E402

from fedlora.privacy import calibrate_noise  # noqa: E402
from fedlora.rundir import read_jsonl  # noqa: E402

POPULATION, NOISE_COHORT = 1000, 1000
BASE = {**QUICK, "task.num_clients": POPULATION, "task.max_examples": 50 * POPULATION,
        "task.alpha": 1.0, "sampling": "poisson", "dp.enabled": True,
        "dp.noise_cohort_size": NOISE_COHORT}
FIG9 = {
    "Full finetune": {**BACKBONE, "method.name": "full_finetune"},
    "LoRA r=16": {"method.name": "lora", "model.rank": 16},
    "FFA-LoRA r=16": {"method.name": "ffa_lora", "model.rank": 16},
    "FLASC r=16 d_up=1/4": {"method.name": "flasc", "model.rank": 16, "method.d_up": 0.25},
}
FIG10 = {f"LoRA r={r}": {"method.name": "lora", "model.rank": r} for r in (1, 4, 64)}


def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace("=", "").replace("/", "_")


def clip_from(run_dir: Path) -> float:
    """Median over rounds of the median upload norm of a sigma = 0 run."""
    norms = [r["dp_update_norm_median"] for r in read_jsonl(run_dir / "metrics.jsonl")
             if r.get("dp_update_norm_median") is not None]
    return float(statistics.median(norms))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Fig. 9 arms only (no rank sweep)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--epsilons", default="8,2", help="target epsilons of the noisy levels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = dict(BASE)
    if args.rounds:
        base["rounds"] = args.rounds
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-privacy"
    runner = Runner(base, out)
    arms = FIG9 if args.quick else {**FIG9, **FIG10}
    targets = [float(e) for e in args.epsilons.split(",")]
    m = base["clients_per_round"]
    sigmas = {e: calibrate_noise(e, rounds=base["rounds"], sampling="poisson",
                                 population=POPULATION, cohort_size=m,
                                 noise_cohort_size=NOISE_COHORT) for e in targets}
    print(f"privacy: {base} -> {out}\n  sigma per target epsilon: {sigmas}", flush=True)

    results: dict[str, dict] = {}
    for name, over in arms.items():
        free = runner.run(f"{slug(name)}-sigma0", {**over, "dp.noise_multiplier": 0.0,
                                                    "dp.clip": math.inf})
        clip = clip_from(out / f"{slug(name)}-sigma0")
        results[name] = {"clip": clip, "levels": {"none": free}}
        for e, sigma in sigmas.items():
            results[name]["levels"][f"eps={e:g}"] = runner.run(
                f"{slug(name)}-eps{e:g}", {**over, "dp.noise_multiplier": sigma,
                                           "dp.clip": clip})

    levels = ["none", *(f"eps={e:g}" for e in targets)]
    head = " | ".join(f"acc {lv}" for lv in levels)
    lines = [f"| method | vector entries | clip C | {head} | upload MB (each) |",
             "|---" * (4 + len(levels)) + "|"]
    for name, r in results.items():
        d = r["levels"]["none"]["num_params"]
        accs = " | ".join(f"{r['levels'][lv]['final'].get('accuracy', float('nan')):.3f}"
                          for lv in levels)
        lines.append(f"| {name} | {d:,} | {r['clip']:.3g} | {accs} "
                     f"| {r['levels']['none']['total_upload_bytes'] / 1e6:.1f} |")
    eps = {lv: next(iter(results.values()))["levels"][lv].get("privacy", {}) for lv in levels}
    notes = [f"{lv}: sigma {p.get('noise_multiplier', 0):.4g}, epsilon {p.get('epsilon')}, "
             f"delta {p.get('delta')}, {p.get('accountant')}, {p.get('sampling')}, "
             f"{p.get('neighboring_relation')}" for lv, p in eps.items()]
    table = "\n".join(lines)
    report = f"settings: {base}\n\n{table}\n\n" + "\n".join(notes) + "\n"
    print(report)
    (out / "privacy.md").write_text(report)
    (out / "privacy.json").write_text(json.dumps({"sigmas": sigmas, "results": results},
                                                 indent=2, default=str))
    return table


if __name__ == "__main__":
    main()
