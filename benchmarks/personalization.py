"""Per-client accuracy of the personalization methods on wordnet-topics (issue 17).

Arms (same seed = same partition, local test splits, cohorts and minibatches):
  finetune_global  FLASC d_up=1/4; its pers/global row is "FLASC global", pers/deployed
                   "FLASC + fine-tune" (personal.finetune_steps local steps at evaluation)
  fdlora-dense     FDLoRA, global half dense (d_up=1)
  fdlora-d1_4      FDLoRA, global half FLASC top-k at d_up=1/4
  flasc_personal   FLASC d_up=1/4, the non-uploaded entries kept as a personal residual
  local_only       every client trains alone, nothing sent
One task (model + tokenized data) is built per (alpha, seed) and reused by every arm.

    python benchmarks/personalization.py [--alphas 0.1,1] [--seeds 3] [--rounds 15]
        [--out runs/bench-personal] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.rundir import read_jsonl
from fedlora.tasks import build_task

ARMS = {
    "finetune_global": ["method.name=finetune_global", "method.d_up=1/4"],
    "fdlora-dense": ["method.name=fdlora", "method.d_up=1"],
    "fdlora-d1_4": ["method.name=fdlora", "method.d_up=1/4"],
    "flasc_personal": ["method.name=flasc_personal", "method.d_up=1/4"],
    "local_only": ["method.name=local_only"],
}
ROWS = [  # table row, arm, which model
    ("FLASC global (d_up=1/4)", "finetune_global", "global"),
    ("FLASC + fine-tune", "finetune_global", "deployed"),
    ("FDLoRA dense", "fdlora-dense", "deployed"),
    ("FDLoRA d_up=1/4", "fdlora-d1_4", "deployed"),
    ("flasc_personal d_up=1/4", "flasc_personal", "deployed"),
    ("local_only", "local_only", "deployed"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0.1,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default="runs/bench-personal")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = ["task.max_examples=4000", "task.test_size=500", "task.num_clients=20",
            "task.local_test_fraction=0.2", "clients_per_round=5", "client.max_steps=8",
            "eval_every=5", "eval.personalized=true", "eval.clients=20", "eval.local_steps=40",
            "personal.finetune_steps=10", f"rounds={args.rounds}", *args.set]
    out = Path(args.out)
    results: dict = {}
    for alpha in args.alphas.split(","):
        for seed in range(args.seeds):
            common = [*base, f"task.alpha={alpha}", f"seed={seed}"]
            task = None
            for arm, over in ARMS.items():
                d = out / f"a{alpha}-{arm}-s{seed}"
                if not (d / "summary.json").exists():
                    cfg = load_config(None, [*common, *over])
                    if task is None:
                        task = build_task(cfg)
                    start = time.perf_counter()
                    Simulation(cfg, d, progress=False, task=task).run()
                    print(f"alpha={alpha} seed={seed} {arm}: {time.perf_counter() - start:.0f}s",
                          flush=True)
                last = read_jsonl(d / "metrics.jsonl")[-1]
                summary = json.loads((d / "summary.json").read_text())
                results.setdefault((alpha, arm), []).append(
                    (last, summary["total_upload_bytes"]))
    for alpha in args.alphas.split(","):
        print(f"\nalpha = {alpha} ({args.seeds} seeds; mean ± std over seeds)\n")
        print("| model | per-client mean acc | p10 acc | beats local-only | upload MB |")
        print("|---|---|---|---|---|")
        for label, arm, model in ROWS:
            rs = results[(alpha, arm)]

            def stat(key, rs=rs, model=model):
                v = np.array([r[0][f"pers/{model}/{key}"] for r in rs])
                return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"

            mb = np.mean([r[1] for r in rs]) / 1e6
            print(f"| {label} | {stat('mean')} | {stat('p10')} | {stat('beats_local')} | "
                  f"{mb:.2f} |")
        ref = np.array([r[0]["pers/local/mean"] for r in results[(alpha, "local_only")]])
        print(f"\nlocal-only reference (eval.local_steps from init): mean {ref.mean():.3f}")


if __name__ == "__main__":
    main()
