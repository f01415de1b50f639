"""Per-client accuracy of the personalization methods on wordnet-topics (issue 17).

Arms (same seed = same partition, local test splits, cohorts and minibatches):
  finetune_global  FLASC d_up=1/4; its pers/global row is "FLASC global", pers/deployed
                   "FLASC + fine-tune" (method.finetune_steps local steps at evaluation)
  fdlora-dense     FDLoRA, global half dense (d_up=1)
  fdlora-d1_4      FDLoRA, global half FLASC top-k at d_up=1/4
  flasc_personal   FLASC d_up=1/4, the non-uploaded entries kept as a personal residual
  local_only       every client trains alone, nothing sent
One task (model + tokenized data) is built per (alpha, seed) and reused by every arm, and
the local-only reference (a function of seed, task and initial adapter only) is computed
by the first arm and copied to the others. Runs go seed by seed, so a partial run still
gives a table; `--table` only prints the table of the runs found.

    python benchmarks/personalization.py [--alphas 0.1,1] [--seeds 3] [--rounds 8]
        [--out runs/bench-personal] [--set KEY=VALUE ...] [--arms a,b] [--table]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.config import load_config
from fedlora.engine import Simulation, resolve_config
from fedlora.rundir import read_jsonl
from fedlora.tasks import build_task

ARMS = {
    "finetune_global": ["method.name=finetune_global", "method.d_up=1/4",
                        "method.finetune_steps=4"],
    "fdlora-dense": ["method.name=fdlora", "method.d_up=1", "method.fusion_examples=16"],
    "fdlora-d1_4": ["method.name=fdlora", "method.d_up=1/4", "method.fusion_examples=16"],
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
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--table", action="store_true", help="only print the table")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="comma-separated subset of the arms (to run them in parallel)")
    ap.add_argument("--out", default="runs/bench-personal")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # CPU budget (2 shared cores): 10 clients, 5 per round x 4 steps, 8 rounds.
    base = ["task.max_examples=2000", "task.test_size=200", "task.num_clients=10",
            "task.local_test_fraction=0.2", "clients_per_round=5", "client.max_steps=4",
            f"eval_every={args.rounds}", "eval.personalized=true", "eval.clients=10",
            "eval.local_steps=16", f"rounds={args.rounds}", *args.set]
    out = Path(args.out)
    for seed in range(0 if args.table else args.seeds):
        for alpha in args.alphas.split(","):
            common = [*base, f"task.alpha={alpha}", f"seed={seed}"]
            task, ref = None, None
            for arm in args.arms.split(","):
                over = ARMS[arm]
                d = out / f"a{alpha}-{arm}-s{seed}"
                refs = sorted(r for r in out.glob(f"a{alpha}-*-s{seed}/personal_reference.json")
                              if r.parent != d)  # d itself may be an unfinished run
                if refs:  # the local-only reference depends on (seed, task, init) only
                    ref = refs[0]
                if (d / "summary.json").exists():
                    continue
                if d.exists():
                    shutil.rmtree(d)  # an unfinished run: start it over
                cfg = load_config(None, [*common, *over])
                if task is None:
                    task = build_task(resolve_config(cfg))
                if ref is not None:
                    d.mkdir(parents=True)
                    shutil.copy(ref, d / ref.name)
                start = time.perf_counter()
                Simulation(cfg, d, progress=False, task=task).run()
                print(f"alpha={alpha} seed={seed} {arm}: {time.perf_counter() - start:.0f}s",
                      flush=True)
    table(out, args.alphas.split(","))


def table(out: Path, alphas: list[str]) -> None:
    """The markdown table of every finished run under `out`, mean ± std over seeds."""
    results: dict = {}
    for d in sorted(out.glob("a*-*-s*")):
        if not (d / "summary.json").exists():
            continue
        alpha, rest = d.name[1:].split("-", 1)
        arm = rest.rsplit("-s", 1)[0]
        last = read_jsonl(d / "metrics.jsonl")[-1]
        summary = json.loads((d / "summary.json").read_text())
        results.setdefault((alpha, arm), []).append((last, summary["total_upload_bytes"]))
    for alpha in alphas:
        print(f"\nalpha = {alpha} (mean ± std over seeds; n = seeds)\n")
        print("| model | n | per-client mean acc | p10 acc | beats local-only | upload MB |")
        print("|---|---|---|---|---|---|")
        for label, arm, model in ROWS:
            rs = results.get((alpha, arm), [])
            if not rs:
                continue

            def stat(key, rs=rs, model=model):
                v = np.array([r[0][f"pers/{model}/{key}"] for r in rs])
                return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"

            mb = np.mean([r[1] for r in rs]) / 1e6
            print(f"| {label} | {len(rs)} | {stat('mean')} | {stat('p10')} | "
                  f"{stat('beats_local')} | {mb:.2f} |")
        refs = [r[0] for (a, _), rs in results.items() if a == alpha for r in rs]
        if refs:
            ref = np.array([r["pers/local/mean"] for r in refs])
            print(f"\nlocal-only reference (eval.local_steps from init): mean {ref.mean():.3f}")


if __name__ == "__main__":
    main()
