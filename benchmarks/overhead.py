"""Engine overhead: wall time of FL rounds vs a bare loop doing the same training steps.

Both sides run the same clients, the same minibatches, on the same resident model in
one process, interleaved round by round so machine noise hits both alike. The FL side
is the real engine (download encode/decode, flat-vector swaps, TopK, upload
encode/decode, aggregation, server step, metrics/ledger writes); evaluation and
checkpoints are excluded on both sides. Prints the ratio; target <= 1.05.

    python benchmarks/overhead.py [--rounds 8] [--d-up 1/4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fedlora.config import load_config
from fedlora.data.federated import client_batches
from fedlora.engine import Simulation
from fedlora.rng import np_rng, torch_seed
from fedlora.rundir import read_jsonl


def bare_round(sim: Simulation, t: int, start: dict[str, torch.Tensor]) -> float:
    """Plain PyTorch: reset trainable params, torch.optim.SGD steps, nothing else."""
    cfg, task = sim.cfg, sim.task
    params = [p for p in task.model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for c in sim.sample(t):
        with torch.no_grad():
            for p, s in zip(params, start.values()):
                p.copy_(s)
        opt = torch.optim.SGD(params, lr=cfg.client.lr, momentum=cfg.client.momentum)
        torch.manual_seed(torch_seed(cfg.seed, "dropout", t, int(c)))
        task.model.train()
        for idx in client_batches(task.data.clients[c], cfg.client.batch_size, cfg.client.epochs,
                                  cfg.client.max_steps, np_rng(cfg.seed, "data_order", t, int(c))):
            batch = task.batch(task.data.train, idx, sim.device, train=True)
            opt.zero_grad(set_to_none=False)
            task.loss(task.model, batch).backward()
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--d-up", default="1/4")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    over = ["task.max_examples=20000", "task.test_size=64", "client.max_steps=4",
            f"method.d_up={args.d_up}", "eval_every=1000000", *args.set]
    cfg = load_config(None, over + [f"rounds={args.rounds}"])
    sim = Simulation(cfg, tempfile.mkdtemp(prefix="fedlora-overhead-"), progress=False)
    ratios, fl_total, bare_total = [], 0.0, 0.0
    for t in range(1, args.rounds + 1):
        start = {e.name: sim.P[e.slice].view(e.shape).clone() for e in sim.adapter.layout}
        bare = bare_round(sim, t, start)
        sim.cfg.rounds = t  # run exactly one more engine round
        sim.run()
        fl = read_jsonl(sim.out / "metrics.jsonl")[-1]["wall_s"]
        ratios.append(fl / bare)
        fl_total += fl
        bare_total += bare
        print(f"round {t}: engine {fl:.2f}s  bare {bare:.2f}s  ratio {fl / bare:.3f}", flush=True)
    print("\n| rounds | engine s | bare s | total ratio | median round ratio |")
    print("|---|---|---|---|---|")
    print(f"| {args.rounds} | {fl_total:.1f} | {bare_total:.1f} | {fl_total / bare_total:.3f} | "
          f"{statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
