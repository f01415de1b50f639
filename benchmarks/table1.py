"""Paper Table 1 at CPU scale: sparse LoRA vs sparse backbone on wordnet-topics (MiniLM).

    python benchmarks/table1.py [--rounds R] [--quick] [--alpha A] [--budgets 0.75,0.5|none]
                                [--threads N] [--out DIR]

Every method runs the same rounds, seed and clients; what differs is what crosses the wire.
Budgets are matched on *upload* density averaged over the run (the table reports the bytes
actually sent, positions included, so the match can be checked):

* LoRA r=16 (reference for the LoRA rows); FLASC d_up=1/4; Adapter LTH with the prune ratio
  whose mean density over R rounds is 1/4 (paper: 0.98 per round over 200 rounds is the
  same budget); SparseAdapter with density d such that (1 + (R - 1) d) / R = 1/4 (its first
  round is dense).
* Full fine-tuning of every MiniLM weight (reference for the backbone rows); Federated
  Select, FedSparsify and SPDST at 3/4 and 1/2 of its bytes, matched the same way. The
  backbone rows use server.lr 5e-4 (LoRA rows: the default 5e-3).

Pruning methods upload values only (the server dictated the mask); FLASC's client-chosen
top-k carries its positions, so at equal density it sends somewhat more bytes.

Runs sharing a model reuse one resident task; its weights are reset to the seeded
initialization before each run. Default scale (demo): 20k training examples, 1k test,
10 clients x 4 local steps, 30 rounds. On a 2-core CPU a LoRA run takes ~6 min and a
backbone run (22.7M-entry vector, ~0.6 s per local step, ~1 s of codec per client) ~15 min,
so the full table takes about two hours. --quick (12 rounds, 5k examples, LoRA rows only)
takes ~15 min; `--quick --budgets 0.5` adds the backbone rows at 1/2 (~8 min per row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import (
    Simulation,  # noqa: E402
    resolve_config,  # noqa: E402
)
from fedlora.model.lora import trains_backbone  # noqa: E402
from fedlora.tasks import build_task  # noqa: E402

FULL = {"task.max_examples": 20000, "task.test_size": 1000, "client.max_steps": 4,
        "rounds": 30, "clients_per_round": 10, "eval_every": 5}
# Full-model FedAdam wants a smaller server step than LoRA: a 5-round check on the quick
# scale gave 0.134 / 0.170 / 0.144 accuracy at server.lr 5e-3 / 5e-4 / 5e-5 (client.lr 0.1).
BACKBONE = {"server.lr": 5e-4}
# Fewer clients or rounds than this and LoRA has not left the majority class yet.
QUICK = {"task.max_examples": 5000, "task.test_size": 500, "client.max_steps": 4,
         "rounds": 12, "clients_per_round": 10, "eval_every": 4}


def imp_prune_ratio(budget: float, rounds: int, prune_every: int = 1) -> float:
    """Prune ratio p whose mean density over `rounds` (Adapter LTH schedule) is `budget`."""
    def mean_density(p: float) -> float:
        return sum((1 - p) ** ((t - 1) // prune_every) for t in range(1, rounds + 1)) / rounds

    lo, hi = 0.0, 0.999
    if mean_density(hi) > budget:
        raise ValueError(f"a mean density of {budget} is out of reach in {rounds} rounds")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_density(mid) > budget else (lo, mid)
    return (lo + hi) / 2


def pai_density(budget: float, rounds: int) -> float:
    """Density d with one dense round first: (1 + (rounds - 1) d) / rounds = budget."""
    if rounds < 2 or budget * rounds <= 1:
        raise ValueError(f"budget {budget} is below one dense round out of {rounds}")
    return (budget * rounds - 1) / (rounds - 1)


class Runner:
    """Runs configs into `out/<name>`, reusing one resident task per model shape."""

    def __init__(self, base: dict, out: Path, progress: bool = True):
        self.base, self.out, self.progress = base, out, progress
        self.tasks: dict[tuple, tuple] = {}

    def run(self, name: str, overrides: dict) -> dict:
        done = self.out / name / "summary.json"
        if done.exists() and json.loads(done.read_text()).get("finished"):
            summary = json.loads(done.read_text())  # a rerun into the same --out skips it
            print(f"  {name}: finished earlier, reused", flush=True)
            return summary
        cfg = resolve_config(load_config(None, [f"{k}={v}" for k, v in
                                                {**self.base, **overrides}.items()]))
        key = (trains_backbone(cfg), cfg.model.rank)
        if key not in self.tasks:
            task = build_task(cfg)
            init = {n: p.detach().clone() for n, p in task.model.named_parameters()}
            self.tasks[key] = (task, init)
        task, init = self.tasks[key]
        with torch.no_grad():  # a previous run left its final weights in the model
            for n, p in task.model.named_parameters():
                p.copy_(init[n])
        start = time.perf_counter()
        summary = Simulation(cfg, self.out / name, progress=self.progress, task=task).run()
        summary["wall_min"] = (time.perf_counter() - start) / 60
        summary["server_lr"], summary["client_lr"] = cfg.server.lr, cfg.client.lr
        done.write_text(json.dumps(summary, indent=2))
        print(f"  {name}: acc {summary['final'].get('accuracy', float('nan')):.3f}, "
              f"upload {summary['total_upload_bytes'] / 1e6:.1f} MB, "
              f"{summary['wall_min']:.1f} min", flush=True)
        return summary


def specs(rounds: int, budgets: list[float]) -> list[tuple[str, str, float, dict]]:
    """(row name, reference row, budget fraction of the reference, overrides)."""
    lora = "LoRA r=16"
    rows = [
        (lora, lora, 1.0, {"method.name": "lora"}),
        ("FLASC d_up=1/4", lora, 0.25, {"method.name": "flasc", "method.d_up": 0.25}),
        ("Adapter LTH", lora, 0.25, {"method.name": "adapter_lth",
                                     "method.prune_ratio": imp_prune_ratio(0.25, rounds)}),
        ("SparseAdapter", lora, 0.25, {"method.name": "sparse_adapter",
                                       "method.density": pai_density(0.25, rounds)}),
    ]
    if budgets:
        full = "Full finetune"
        rows.append((full, full, 1.0, {**BACKBONE, "method.name": "full_finetune"}))
        for f in budgets:
            rows += [
                (f"Federated Select {f:g}", full, f, {
                    **BACKBONE, "method.name": "federated_select_backbone", "method.density": f}),
                (f"FedSparsify {f:g}", full, f, {
                    **BACKBONE, "method.name": "fedsparsify",
                    "method.prune_ratio": imp_prune_ratio(f, rounds)}),
                (f"SPDST {f:g}", full, f, {
                    **BACKBONE, "method.name": "spdst",
                    "method.density": pai_density(f, rounds)}),
            ]
    return rows


def knob(over: dict) -> str:
    for k in ("method.d_up", "method.density", "method.prune_ratio"):
        if k in over:
            return f"{k.split('.')[1]}={over[k]:.4g}"
    return ""


def add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--alpha", type=float, default=None,
                    help="Dirichlet label skew (task default 0.1; at --quick scale 0.1 is still "
                         "at the noise floor after 12 rounds, 1.0 learns)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy box)")
    ap.add_argument("--out", type=Path, default=None)


def setup(args: argparse.Namespace) -> dict:
    """Base overrides from --quick/--rounds/--alpha; --threads caps torch's intra-op threads
    (oversubscribed threads on a shared 2-core CPU make a step 4x slower)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(QUICK if args.quick else FULL)
    if args.rounds:
        base["rounds"] = args.rounds
    if args.alpha:
        base["task.alpha"] = args.alpha
    return base


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default=None,
                    help="backbone budgets, fractions of full fine-tuning's upload "
                         "(default 0.75,0.5; --quick: none); 'none' skips the backbone rows")
    ap.add_argument("--rows", choices=["all", "lora", "backbone"], default="all",
                    help="run only the LoRA rows or only the backbone rows")
    add_common(ap)
    args = ap.parse_args(argv)
    base = setup(args)
    budgets = args.budgets or ("none" if args.quick else "0.75,0.5")
    budgets = [] if budgets == "none" else [float(b) for b in budgets.split(",")]
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-table1"
    runner = Runner(base, out)
    print(f"table1: {base} -> {out}", flush=True)
    results = {}
    for name, ref, budget, over in specs(base["rounds"], budgets):
        backbone = ref == "Full finetune"
        if (args.rows == "lora" and backbone) or (args.rows == "backbone" and not backbone):
            continue
        slug = name.lower().replace(" ", "-").replace("=", "").replace("/", "_")
        results[name] = (ref, budget, over, runner.run(slug, over))
    lines = ["| method | setting | server lr | budget | upload (MB) | upload / ref "
             "| download (MB) | final accuracy | wall (min) |", "|---" * 9 + "|"]
    for name, (ref, budget, over, s) in results.items():
        up, ref_up = s["total_upload_bytes"], results[ref][3]["total_upload_bytes"]
        lines.append(f"| {name} | {knob(over)} | {s['server_lr']:g} | {budget:g} | {up / 1e6:.2f} "
                     f"| {up / ref_up:.3f} "
                     f"| {s['total_download_bytes'] / 1e6:.2f} "
                     f"| {s['final'].get('accuracy', float('nan')):.3f} | {s['wall_min']:.1f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table1.md").write_text(f"settings: {base}\n\n{table}\n")
    return table


if __name__ == "__main__":
    main()
