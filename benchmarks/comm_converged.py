"""The comm-efficiency comparison run until dense LoRA plateaus (issue 14, section 5).

The setup of benchmarks/comm_efficiency.py (wordnet-topics, MiniLM, LoRA on query/value plus
the head, 20k examples over 100 Dirichlet clients, 10 clients x 4 local steps at batch 16,
FedAdam), at Dirichlet alpha 0.1 and 1, several seeds, with `client.workers=auto`. For each
(alpha, seed) dense LoRA r=16 runs first, `--step` rounds at a time (a run is extended by
resuming it with more rounds, which is the same run as one started with that many), until
it has plateaued: its best accuracy over the last `--window` evaluations is less than 1 pt
above its best before them, or `--max-rounds` is reached (the table says which). The
plateau accuracy is the mean of those last evaluations. FLASC d_up = 1/4 then runs the same
number of rounds. Reported per arm and alpha over seeds: mean ± std of final accuracy, and
the upload bytes at which each run first reaches its seed's LoRA plateau - 1 pt.

    python benchmarks/comm_converged.py [--alphas 0.1,1] [--seeds 3] [--step 12]
        [--max-rounds 96] [--window 3] [--out runs/bench-converged] [--table]

It prints one table per alpha and writes OUT/converged-a{alpha}.png: accuracy against
cumulative upload bytes, mean over seeds with the min..max band (past the round where a
seed's LoRA run stopped, the line is the mean of the seeds that went on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedlora.engine import Simulation
from fedlora.report import load_run, plot_utility_vs_upload
from fedlora.report.runs import SeedGroup, read_metrics
from fedlora.report.table import bytes_to_target
from fedlora.rundir import has_checkpoint
from fedlora.sweep import run_point

ARMS = {"lora-r16": ["method.name=lora", "model.rank=16"],
        "flasc-r16-d1_4": ["method.name=flasc", "method.d_up=1/4"]}
LABELS = {"lora-r16": "dense LoRA r=16", "flasc-r16-d1_4": "FLASC r=16, d_up = 1/4"}
BASE = ["task.max_examples=20000", "task.test_size=1000", "client.max_steps=4",
        "clients_per_round=10", "eval_every=4", "client.workers=auto"]


def accuracies(d: Path) -> np.ndarray:
    return read_metrics(d / "metrics.jsonl")["accuracy"].dropna().to_numpy()


def plateau(acc: np.ndarray, window: int) -> bool:
    """No new best by more than 1 pt in the last `window` evaluations."""
    return len(acc) > 2 * window and acc[-window:].max() < acc[:-window].max() + 0.01


def run_to(d: Path, over: list[str], rounds: int) -> None:
    """The run in `d` with `rounds` rounds: started, resumed, or extended."""
    if has_checkpoint(d) and (d / "summary.json").exists():
        done = int(json.loads((d / "summary.json").read_text())["rounds"])
        if done < rounds:
            Simulation.resume(d, rounds=rounds, progress=False).run()
        return
    run_point(None, [*over, f"rounds={rounds}"], d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0.1,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--step", type=int, default=12)
    ap.add_argument("--max-rounds", type=int, default=96)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-converged")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--table", action="store_true", help="only print the table")
    args = ap.parse_args()
    out = Path(args.out)
    for seed in range(0 if args.table else args.seeds):
        for alpha in args.alphas.split(","):
            common = [*BASE, f"task.alpha={alpha}", f"seed={seed}", *args.set]
            lora = out / f"a{alpha}-lora-r16-s{seed}"
            rounds = args.step
            while True:
                run_to(lora, [*common, *ARMS["lora-r16"]], rounds)
                acc = accuracies(lora)
                if plateau(acc, args.window) or rounds >= args.max_rounds:
                    break
                rounds += args.step
            print(f"alpha={alpha} seed={seed} lora: {rounds} rounds, last {acc[-3:]}",
                  flush=True)
            d = out / f"a{alpha}-flasc-r16-d1_4-s{seed}"
            run_to(d, [*common, *ARMS["flasc-r16-d1_4"]], rounds)
            print(f"alpha={alpha} seed={seed} flasc 1/4: last {accuracies(d)[-3:]}",
                  flush=True)
    table(out, args.alphas.split(","), args.window)


def ms(v: list[float], digits: int = 3) -> str:
    """mean ± sample std (0 for one value)."""
    sd = np.std(v, ddof=1) if len(v) > 1 else 0.0
    return f"{np.mean(v):.{digits}f} ± {sd:.{digits}f}"


def table(out: Path, alphas: list[str], window: int) -> None:
    for alpha in alphas:
        seeds = sorted(int(p.name.rsplit("-s", 1)[1])
                       for p in out.glob(f"a{alpha}-lora-r16-s*") if accuracies(p).size)
        if not seeds:
            continue
        ref, rounds, flat = {}, {}, {}
        for s in seeds:
            acc = accuracies(out / f"a{alpha}-lora-r16-s{s}")
            ref[s] = float(acc[-window:].mean())
            rounds[s] = int(read_metrics(out / f"a{alpha}-lora-r16-s{s}" / "metrics.jsonl")
                            ["round"].max())
            flat[s] = bool(plateau(acc, window))
        print(f"\nalpha = {alpha}: seeds {seeds}; LoRA r16 rounds "
              f"{[rounds[s] for s in seeds]}, plateaued {[flat[s] for s in seeds]}, "
              f"plateau accuracy (mean of last {window} evals) {ms(list(ref.values()))}\n")
        print(f"| arm | seeds | final accuracy | mean of last {window} evals | upload MB | "
              "bytes to LoRA plateau − 1 pt (MB) | reached |")
        print("|---|---|---|---|---|---|---|")
        # One group per arm, though LoRA's seeds ran different numbers of rounds.
        groups = [SeedGroup(LABELS[arm]) for arm in ARMS]
        for arm, group in zip(ARMS, groups):
            accs, lasts, ups, hits = [], [], [], []
            for s in seeds:
                d = out / f"a{alpha}-{arm}-s{s}"
                if not (d / "summary.json").exists():
                    continue
                group.runs.append(run := load_run(d))
                m = run.metrics
                accs.append(float(m["accuracy"].dropna().iloc[-1]))
                lasts.append(float(m["accuracy"].dropna().iloc[-window:].mean()))
                ups.append(int(m["cum_upload_bytes"].iloc[-1]))
                hit = bytes_to_target(m, "accuracy", ref[s] - 0.01)
                if hit is not None:
                    hits.append(hit / 1e6)
            if not accs:
                continue
            hit_s = ms(hits, 1) if hits else "–"
            print(f"| {arm} | {len(accs)} | {ms(accs)} | {ms(lasts)} | "
                  f"{np.mean(ups) / 1e6:.1f} | {hit_s} | {len(hits)}/{len(accs)} |")
        png = plot_utility_vs_upload([g for g in groups if g.runs],
                                     out / f"converged-a{alpha}.png",
                                     title=f"wordnet-topics, α = {alpha}: accuracy vs upload")
        print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
