"""Where a default round's time goes: py-spy samples a `fedlora run`, stacks are bucketed.

Runs the embedded default config (wordnet-topics, FLASC d_up = 1/4, 10 clients per round,
one local epoch) for `--rounds` rounds with an evaluation every round, under `py-spy record`
(install it into the venv for this benchmark only: `pip install py-spy`). Each sampled
stack goes to the first bucket (in the order of BUCKETS) with a frame in it, so a forward
pass inside evaluation counts as evaluation, not as training forward.

    python benchmarks/profile_round.py [--rounds 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (bucket, [(function, path fragment)]): the first bucket with a matching frame in the stack.
BUCKETS = [
    ("imports (torch, transformers, peft)", [("_find_and_load", "")]),
    ("setup: read + tokenize data", [("tokenize", "fedlora/tasks"),
                                     ("load_examples", "fedlora/tasks")]),
    ("setup: load model + LoRA", [("from_pretrained", "transformers"),
                                  ("add_lora", "fedlora/model")]),
    ("evaluation", [("evaluate", "fedlora/engine"), ("evaluate", "fedlora/tasks")]),
    ("checkpoint + metrics I/O", [("checkpoint", "fedlora/engine"),
                                  ("append_jsonl", "fedlora/rundir"),
                                  ("write_summary", "fedlora/engine")]),
    ("wire codec (encode/decode)", [("encode", "fedlora/comm"), ("decode", "fedlora/comm")]),
    ("top-k masks", [("topk_mask", "fedlora/comm"), ("client_upload_mask", "fedlora/methods"),
                     ("client_download_mask", "fedlora/methods")]),
    ("server aggregate + step", [("aggregate", "fedlora/engine"), ("step", "fedlora/server")]),
    ("client: backward", [("backward", "torch")]),
    ("client: forward", [("loss", "fedlora/tasks")]),
    ("client: batch assembly", [("batch", "fedlora/tasks"), ("client_batches", "fedlora/data")]),
    ("client: SGD update on the flat vector", [("train_client", "fedlora/client")]),
    ("engine: other round work", [("client_round", "fedlora/engine"), ("run", "fedlora/engine")]),
    ("setup: other task building", [("build_task", "fedlora/tasks")]),
]


def parse(frame: str) -> tuple[str, str]:
    """py-spy's `function (path:line)` as (function, path)."""
    func, _, rest = frame.partition(" (")
    return func.strip().rsplit(".", 1)[-1], rest.rpartition(":")[0]  # Class.method -> method


def bucket_of(frames: list[str]) -> str:
    parsed = [parse(f) for f in frames]
    for name, keys in BUCKETS:
        if any(func == f and frag in path for f, path in parsed for func, frag in keys):
            return name
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--analyze", metavar="STACKS",
                    help="only bucket an existing `py-spy record --format raw` file")
    args = ap.parse_args()
    if args.analyze:
        return report(Path(args.analyze), args.rate, None)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy not found: pip install py-spy (benchmark only)")
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-profile-"))
    raw = tmp / "stacks.txt"
    cmd = [spy, "record", "--format", "raw", "--rate", str(args.rate), "--output", str(raw),
           "--", sys.executable, "-m", "fedlora.cli", "run", "--out", str(tmp / "run"),
           "--set", f"rounds={args.rounds}", "--set", "eval_every=1", "--set",
           "checkpoint_every=1000000"]
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"py-spy stacks: {raw}", flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    report(raw, args.rate, tmp / "run" / "metrics.jsonl")


def report(raw: Path, rate: int, metrics: Path | None) -> None:
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and not stack.startswith("Thread._bootstrap"):  # main thread only (not tqdm's)
            counts[bucket_of(stack.split(";"))] += int(n)
    total = sum(counts.values())
    print(f"samples: {total} at {rate}/s ({total / rate:.0f} s sampled)")
    print("\n| where | share of samples | seconds |\n|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {100 * n / total:.1f}% | {n / rate:.1f} |")
    if metrics is not None and metrics.exists():
        for row in metrics.read_text().splitlines():
            print(row)


if __name__ == "__main__":
    main()
