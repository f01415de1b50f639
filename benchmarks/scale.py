"""Server memory and round time against the population size N, at a fixed cohort.

Each (N, partition, method) runs in its own subprocess, so its peak RSS (ru_maxrss) is its
own: the embedded wordnet-topics task, MiniLM with LoRA r=16, 10 clients x 4 local steps
per round, no evaluation until the last round. The Dirichlet arm uses the glosses as they
are (at N = 100,000 most clients hold one or two examples, a third none); the natural arm
writes the same glosses, cycled to a fixed number of rows, into a JSONL with a `client`
column of N distinct ids (row mod N), so every N tokenizes the same rows.

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--rounds 4] [--threads 1] [--jobs 1]

Targets (issue 14): peak RSS growth from N = 1,000 to 100,000 <= 50 MB; seconds per
round flat in N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = 200_000  # rows of the natural arm's file: two per client at N = 100,000


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from fedlora.config import load_config
    from fedlora.engine import Simulation
    from fedlora.resolve import resolve_config
    from fedlora.rundir import read_jsonl
    from fedlora.tasks import build_task

    over = [f"rounds={args.rounds}", "clients_per_round=10", "client.max_steps=4",
            "client.batch_size=16", "task.test_size=500", f"eval_every={10**6}",
            f"method.name={args.method}"]
    if args.method == "hetlora":
        over += ["het.self_prune=true", "het.prune_lambda=0.01"]
    if args.partition == "natural":
        over += ["task.name=text-file", f"task.path={args.file}", "task.partition=natural"]
    else:
        over += [f"task.num_clients={args.n}", "task.partition=dirichlet", "task.alpha=0.1"]
    cfg = load_config(None, over)
    t0 = time.perf_counter()
    task = build_task(resolve_config(cfg))
    build_s = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(prefix="fedlora-scale-"))
    sim = Simulation(cfg, out, task=task, progress=False)
    t0 = time.perf_counter()
    for t in range(1, 51):
        sim.sample(t)
    sample_ms = (time.perf_counter() - t0) / 50 * 1e3
    # Local training shrinks with N (clients hold fewer examples), so time it apart: what is
    # left of a round (instructions, codec, aggregation, server step, I/O) must stay flat.
    spent, marks = [0.0], []
    train, open_round = sim.runner.train, sim.open_round

    def timed_train(*a, **k):
        t0 = time.perf_counter()
        try:
            return train(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    def marked_open_round():
        marks.append(spent[0])
        return open_round()

    sim.runner.train, sim.open_round = timed_train, marked_open_round
    sim.run()
    marks.append(spent[0])
    rows = read_jsonl(out / "metrics.jsonl")
    trained = [b - a for a, b in zip(marks, marks[1:])]
    walls = [r["wall_s"] for r in rows[1:]]  # round 1 warms up
    rest = [r["wall_s"] - s for r, s in zip(rows[1:], trained[1:])]
    sizes = task.data.sizes
    print(json.dumps({
        "n": args.n, "partition": args.partition, "method": args.method,
        "clients": len(task.data.clients), "empty": int((sizes == 0).sum()),
        "median_size": float(np.median(sizes)), "train": len(task.data.train),
        "partition_mb": getattr(task.data.clients, "nbytes", 0) / 1e6,
        "build_s": build_s, "sample_ms": sample_ms,
        "round_s": float(np.median(walls)), "rounds": len(rows),
        "train_s": float(np.median(trained[1:])), "rest_s": float(np.median(rest)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def partition_child(args: argparse.Namespace) -> None:
    """The data side alone: build the N-client partition over the embedded glosses and
    report the RSS it added, its size and the time it took (no model, no training)."""
    import numpy as np

    from fedlora.data import partition
    from fedlora.rng import np_rng
    from fedlora.tasks.base import label_map
    from fedlora.tasks.wordnet import load_examples

    ex = load_examples()
    labels, _ = label_map(ex.labels)
    ids = [f"u{i % args.n}" for i in range(ROWS)] if args.partition == "natural" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if ids is not None:
        parts, _names = partition.natural(ids)
    else:
        parts = partition.dirichlet(labels, args.n, 0.1, np_rng(0, "partition"))
    seconds = time.perf_counter() - t0
    sizes = parts.sizes
    print(json.dumps({
        "n": args.n, "partition": args.partition, "clients": len(parts),
        "empty": int((sizes == 0).sum()), "median_size": float(np.median(sizes)),
        "partition_mb": parts.nbytes / 1e6, "build_s": seconds,
        "peak_rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
    }))


def natural_file(path: Path, n: int) -> None:
    """The wordnet glosses cycled to ROWS rows, client id = row mod n."""
    from fedlora.tasks.wordnet import load_examples

    ex = load_examples()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ROWS):
            j = i % len(ex.labels)
            f.write(json.dumps({"text": ex.inputs[j], "label": ex.labels[j],
                                "client": f"u{i % n}"}) + "\n")


def partitions_only(args: argparse.Namespace) -> None:
    procs = []
    for part in ("dirichlet", "natural"):
        for n in (int(x) for x in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--child", "--partition-only", "--n", str(n),
                   "--partition", part]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(err[-3000:])
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| partition | N | clients (empty) | median examples | partition MB | "
          "peak RSS growth MB | build s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['partition']} | {r['n']:,} | {r['clients']:,} ({r['empty']:,}) | "
              f"{r['median_size']:g} | {r['partition_mb']:.2f} | "
              f"{r['peak_rss_growth_mb']:.1f} | {r['build_s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="dirichlet:flasc,dirichlet:hetlora,natural:flasc",
                    help="partition:method pairs")
    ap.add_argument("--jobs", type=int, default=1, help="children run at once")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--partition", default="dirichlet", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="flasc", help=argparse.SUPPRESS)
    ap.add_argument("--file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--partition-only", action="store_true",
                    help="measure only building the partitions (no model, no rounds)")
    args = ap.parse_args()
    if args.child:
        return partition_child(args) if args.partition_only else child(args)
    if args.partition_only:
        return partitions_only(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-scale-data-"))
    runs = []
    for arm in args.arms.split(","):
        part, method = arm.split(":")
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--partition", part,
                   "--method", method, "--rounds", str(args.rounds),
                   "--threads", str(args.threads)]
            if part == "natural":
                f = tmp / f"natural-{n}.jsonl"
                natural_file(f, n)
                cmd += ["--file", str(f)]
            runs.append((f"{arm} N={n}", cmd))
    results = []
    # Each child is its own process (its own peak RSS); --jobs > 1 runs several at once,
    # which leaves RSS unchanged and adds noise to the round times.
    for i in range(0, len(runs), args.jobs):
        batch = [(name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)) for name, cmd in runs[i:i + args.jobs]]
        for name, proc in batch:
            out, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{err[-3000:]}")
            r = json.loads(out.strip().splitlines()[-1])
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| partition | method | N | clients (empty) | median examples | partition MB | "
          "peak RSS MB | s / round | of which local training | rest of the round s | sample ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['partition']} | {r['method']} | {r['n']:,} | {r['clients']:,} "
              f"({r['empty']:,}) | {r['median_size']:g} | {r['partition_mb']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['round_s']:.2f} | {r['train_s']:.2f} | "
              f"{r['rest_s']:.3f} | {r['sample_ms']:.2f} |")
    for arm in args.arms.split(","):
        rows = [r for r in results if f"{r['partition']}:{r['method']}" == arm]
        lo, hi = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
        print(f"{arm}: peak RSS {hi['n']:,} - {lo['n']:,} = "
              f"{hi['peak_rss_mb'] - lo['peak_rss_mb']:+.1f} MB; s/round "
              f"{lo['round_s']:.2f} -> {hi['round_s']:.2f}; outside local training "
              f"{lo['rest_s']:.3f} -> {hi['rest_s']:.3f}")


if __name__ == "__main__":
    main()
