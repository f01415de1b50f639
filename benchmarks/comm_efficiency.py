"""FLASC vs dense LoRA on wordnet-topics: final accuracy, upload bytes, bytes to target.

FLASC d_up in {1, 1/4, 1/16} at rank 16 and dense LoRA at ranks {4, 16}, Dirichlet
alpha = 0.1, same seed (so every run samples the same clients with the same data).
Target: FLASC d_up = 1/4 within 1 pt of LoRA r=16 at <= 0.28x its upload bytes.

    python benchmarks/comm_efficiency.py [--rounds 30] [--seeds 1] [--out runs/bench-comm]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedlora.report import load_runs, plot_utility_vs_upload
from fedlora.report.runs import read_metrics
from fedlora.report.table import bytes_to_target
from fedlora.sweep import run_point

ARMS = {  # most informative first; flasc d_up=1 is bit-identical to lora r16 (tested)
    "lora-r16": ["method.name=lora", "model.rank=16"],
    "flasc-r16-d1_4": ["method.name=flasc", "method.d_up=1/4"],
    "flasc-r16-d1_16": ["method.name=flasc", "method.d_up=1/16"],
    "lora-r4": ["method.name=lora", "model.rank=4"],
    "flasc-r16-d1": ["method.name=flasc", "method.d_up=1"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-comm")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = ["task.max_examples=20000", "task.test_size=1000", "client.max_steps=4",
            "clients_per_round=10", "eval_every=3", "task.alpha=0.1", f"rounds={args.rounds}",
            *args.set]
    out = Path(args.out)
    dirs: dict[str, list[Path]] = {}
    for seed in range(args.seeds):
        for name, over in ARMS.items():
            d = out / f"{name}-s{seed}"
            dirs.setdefault(name, []).append(d)
            summary = run_point(None, base + over + [f"seed={seed}"], d)  # resumes
            print(f"{name} seed {seed}: {summary['final']} {summary['total_upload_bytes']} B",
                  flush=True)
    ref = {s: float(read_metrics(dirs["lora-r16"][s] / "metrics.jsonl")["accuracy"]
                    .dropna().iloc[-1]) for s in range(args.seeds)}
    ref_bytes = [int(read_metrics(d / "metrics.jsonl")["cum_upload_bytes"].iloc[-1])
                 for d in dirs["lora-r16"]]
    print("| arm | final acc (per seed) | upload MB | x LoRA r16 bytes | bytes to LoRA-1pt |")
    print("|---|---|---|---|---|")
    for name, ds in dirs.items():
        accs, ups, hits = [], [], []
        for s, d in enumerate(ds):
            m = read_metrics(d / "metrics.jsonl")
            accs.append(float(m["accuracy"].dropna().iloc[-1]))
            ups.append(int(m["cum_upload_bytes"].iloc[-1]))
            hit = bytes_to_target(m, "accuracy", ref[s] - 0.01)
            hits.append("-" if hit is None else f"{hit / 1e6:.1f} MB")
        print(f"| {name} | {', '.join(f'{a:.3f}' for a in accs)} | "
              f"{sum(ups) / len(ups) / 1e6:.1f} | {sum(ups) / sum(ref_bytes):.3f} | "
              f"{', '.join(hits)} |")
    plot_utility_vs_upload(load_runs([d for ds in dirs.values() for d in ds]),
                           out / "accuracy_vs_upload.png", title="wordnet-topics, alpha=0.1")
    print(f"plot: {out / 'accuracy_vs_upload.png'}")


if __name__ == "__main__":
    main()
