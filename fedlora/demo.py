"""`fedlora demo`: FLASC (d_up = 1/4) vs dense LoRA on wordnet-topics, side by side.

Same seed, so both runs sample the same clients in the same order; they differ
only in what crosses the wire. Prints a table and writes a PNG of accuracy vs
cumulative upload bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.report import load_run, plot_utility_vs_upload
from fedlora.report.runs import read_metrics
from fedlora.report.table import bytes_to_target

# Sized for a 2-core CPU (~0.19 s per local MiniLM step at batch 16). Dirichlet alpha = 1:
# at alpha = 0.1 both methods need far more rounds than a 10-minute demo allows
# (benchmarks/comm_efficiency.py runs that setting).
FULL = {"rounds": 24, "clients_per_round": 10, "client.max_steps": 4, "eval_every": 3,
        "task.alpha": 1.0, "task.max_examples": 20000, "task.test_size": 1000}
QUICK = {"rounds": 10, "clients_per_round": 5, "client.max_steps": 4, "eval_every": 2,
         "task.alpha": 1.0, "task.max_examples": 5000, "task.test_size": 500}
RUNS = {"flasc": {"method.name": "flasc", "method.d_up": "1/4"},
        "lora": {"method.name": "lora"}}


def demo(quick: bool = False, out: Path | None = None, progress: bool = True,
         extra: dict | None = None) -> str:
    """Run both methods into `out` and return the printed table."""
    out = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-demo"
    base = {**(QUICK if quick else FULL), **(extra or {})}
    task, dirs = None, {}
    for name, over in RUNS.items():
        cfg = load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])
        sim = Simulation(cfg, out / name, progress=progress, task=task)
        task = sim.task  # one resident model and tokenised data for both runs
        sim.run()
        dirs[name] = out / name
    table = _table(dirs)
    print(table)
    png = plot_utility_vs_upload([load_run(d) for d in dirs.values()],
                                 out / "accuracy_vs_upload.png",
                                 title="wordnet-topics: FLASC vs dense LoRA")
    (out / "demo.md").write_text(table + f"\n![accuracy vs upload]({png.name})\n")
    print(f"\nplot: {png}\nruns: {out}")
    return table


def _table(dirs: dict[str, Path]) -> str:
    metrics = {name: read_metrics(d / "metrics.jsonl") for name, d in dirs.items()}
    final = {n: float(m["accuracy"].dropna().iloc[-1]) for n, m in metrics.items()}
    target = final["lora"] - 0.01
    lines = ["| method | final accuracy | total upload (MB) | upload to reach "
             f"{target:.3f} (LoRA final - 1 pt) |", "|---|---|---|---|"]
    for name, m in metrics.items():
        total = int(m["cum_upload_bytes"].iloc[-1])
        hit = bytes_to_target(m, "accuracy", target)
        reach = "not reached" if hit is None else f"{hit / 1e6:.2f} MB"
        label = "FLASC d_up=1/4" if name == "flasc" else "dense LoRA"
        lines.append(f"| {label} (r=16) | {final[name]:.3f} | {total / 1e6:.2f} | {reach} |")
    return "\n".join(lines)
