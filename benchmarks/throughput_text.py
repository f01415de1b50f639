"""Training throughput of the text tasks: our engine's client loop vs a bare PyTorch loop.

    python benchmarks/throughput_text.py [--steps 2] [--repeats 2] [--warmup 1] [--batch 16]
                                         [--seq 256] [--rank 16] [--threads N] [--device cpu|cuda]

Same model on both sides: GPT-2 small's shape (`GPT2Config()`, 124M, random init: no
weights are needed to time it) with LoRA rank 16 on `c_attn`, next-token prediction
(the Reddit task) on full-length sequences (every row `--seq` tokens, the paper's cap).
* engine: `Simulation.client_round` of a one-client `CausalLM` task: download decode,
  the SGD+momentum client loop over the flat adapter vector, delta, encode/decode upload;
* bare: `model(input_ids, attention_mask, labels=...)`, `loss.backward()`,
  `torch.optim.SGD(momentum=0.9).step()`, `zero_grad()`.
The two loops alternate in timed blocks of `--steps` steps (one engine round each), so load
from other processes falls on both; the table gives the best and median block, in seconds
per step and training examples per second. Each engine round also encodes and decodes its
download and its FLASC upload (d_up = 1/4) once.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.config import load_config  # noqa: E402
from fedlora.data.federated import FederatedData, Split  # noqa: E402
from fedlora.engine import Simulation  # noqa: E402
from fedlora.model.backbone import quiet_transformers  # noqa: E402
from fedlora.model.lora import add_lora  # noqa: E402
from fedlora.tasks.lm import CausalLM  # noqa: E402


def gpt2_small(cfg, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return add_lora(GPT2LMHeadModel(GPT2Config()), cfg, ["c_attn"], None).to(device)


def random_data(n: int, seq: int, vocab: int) -> FederatedData:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=gen, dtype=torch.int32)
    split = Split({"input_ids": ids, "lengths": torch.full((n,), seq)},
                  torch.zeros(n, dtype=torch.int64))
    return FederatedData(train=split, test=split, clients=[np.arange(n)], client_names=["0"],
                         label_names=[])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class EngineLoop:
    """`Simulation.client_round` of a one-client `CausalLM` task; one round = `steps` steps."""

    def __init__(self, cfg, data: FederatedData, device: torch.device):
        self.cfg, self.device, self.round = cfg, device, 0
        self.tmp = tempfile.TemporaryDirectory()
        task = CausalLM("bench", data, gpt2_small(cfg, device))
        self.sim = Simulation(cfg, self.tmp.name, progress=False, task=task)

    def run(self, steps: int) -> float:
        self.cfg.client.max_steps = steps
        self.round += 1
        sync(self.device)
        start = time.perf_counter()
        self.sim.client_round(self.round, 0)
        sync(self.device)
        return (time.perf_counter() - start) / steps


class BareLoop:
    """The textbook loop on the same batches: HF loss, backward, torch SGD step."""

    def __init__(self, cfg, data: FederatedData, device: torch.device):
        self.model = gpt2_small(cfg, device)
        self.model.train()
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad],
                                   lr=cfg.client.lr, momentum=cfg.client.momentum)
        self.ids = data.train.inputs["input_ids"].long().to(device)
        self.b, self.device = cfg.client.batch_size, device

    def run(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for t in range(steps):
            x = self.ids[t * self.b:(t + 1) * self.b]
            loss = self.model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)
        sync(self.device)
        return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed blocks per loop, alternated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    device = torch.device(args.device)
    cfg = load_config(None, [f"model.rank={args.rank}", f"client.batch_size={args.batch}",
                             "client.lr=1e-3", "method.name=flasc", "method.d_up=0.25",
                             f"device={args.device}", "task.name=reddit"])
    data = random_data(args.batch * args.steps, args.seq, 50257)
    loops = {"engine client loop": EngineLoop(cfg, data, device),
             "bare PyTorch loop": BareLoop(cfg, data, device)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for loop in loops.values():
        loop.run(args.warmup)
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both
        for name, loop in loops.items():
            times[name].append(loop.run(args.steps))
            print(f"  {name}: {times[name][-1]:.2f} s/step", file=sys.stderr)
    rows = [(name, min(t), statistics.median(t)) for name, t in times.items()]
    print(f"\nGPT-2 small (124M, random init) + LoRA r={args.rank} on c_attn, batch {args.batch}"
          f" x {args.seq} tokens, {args.repeats} x {args.steps} timed steps after "
          f"{args.warmup} warm-up; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}\n")
    print("| loop | s/step (best) | s/step (median) | train examples/s (best) | vs bare |")
    print("| --- | --- | --- | --- | --- |")
    bare = rows[-1][1]
    for name, best, med in rows:
        print(f"| {name} | {best:.2f} | {med:.2f} | {args.batch / best:.2f} | "
              f"{bare / best:.2f}x |")


if __name__ == "__main__":
    main()
