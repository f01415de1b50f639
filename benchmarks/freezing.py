"""Paper Fig. 5 at CPU scale: sparsity without freezing (FLASC) vs server-level freezing
(SparseAdapter) vs client-level freezing (Federated Select), LoRA r=16 on wordnet-topics.

    python benchmarks/freezing.py [--rounds R] [--quick] [--alpha A] [--densities 1/4,1/16,1/64]
                                  [--threads N] [--out DIR]

At each density d every method sends about d of LoRA's bytes both ways: FLASC with
d_down = d_up = d, SparseAdapter and Federated Select with density d (SparseAdapter's first
round is dense, as the method requires). Density 1 is dense LoRA for all three, run once.
Prints final accuracy and total upload per method and density, and writes one PNG of
accuracy vs cumulative upload per density (fedlora.report.plot_utility_vs_upload).
Default scale as benchmarks/table1.py: 10 LoRA-size runs, ~6 min each on a 2-core CPU;
--quick (densities 1/4 and 1/16): 7 runs, ~2.5 min each.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from table1 import Runner, add_common, setup  # noqa: E402

from fedlora.report import load_run, plot_utility_vs_upload  # noqa: E402

METHODS = {
    "FLASC": lambda d: {"method.name": "flasc", "method.d_down": d, "method.d_up": d},
    "SparseAdapter": lambda d: {"method.name": "sparse_adapter", "method.density": d},
    "Federated Select": lambda d: {"method.name": "federated_select", "method.density": d},
}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--densities", default=None, help="default 1/4,1/16,1/64; --quick 1/4,1/16")
    add_common(ap)
    args = ap.parse_args(argv)
    base = setup(args)
    densities = [Fraction(x) for x in
                 (args.densities or ("1/4,1/16" if args.quick else "1/4,1/16,1/64")).split(",")]
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-freezing"
    runner = Runner(base, out)
    print(f"freezing: {base} -> {out}", flush=True)
    dense = runner.run("lora", {"method.name": "lora"})
    results = {}
    for d in densities:
        for name, over in METHODS.items():
            slug = f"{name.lower().replace(' ', '_')}-d{d.denominator}"
            results[name, d] = (slug, runner.run(slug, over(float(d))))
    ref = dense["total_upload_bytes"]
    acc = f"{dense['final']['accuracy']:.3f} (1.000)"
    lines = ["| density | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|",
             "| 1 (LoRA) | " + " | ".join([acc] * len(METHODS)) + " |"]
    for d in densities:
        cells = []
        for name in METHODS:
            s = results[name, d][1]
            cells.append(f"{s['final']['accuracy']:.3f} ({s['total_upload_bytes'] / ref:.3f})")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    table = ("final accuracy (total upload / dense LoRA upload); dense LoRA uploaded "
             f"{ref / 1e6:.2f} MB; server.lr {dense['server_lr']:g}, client.lr "
             f"{dense['client_lr']:g}\n\n" + "\n".join(lines))
    print(table)
    for d in densities:
        runs = [load_run(out / "lora")]
        runs[0].label = "LoRA (d=1)"
        for name in METHODS:
            run = load_run(out / results[name, d][0])
            run.label = f"{name} d={d}"
            runs.append(run)
        png = plot_utility_vs_upload(runs, out / f"freezing_d{d.denominator}.png",
                                     title=f"wordnet-topics, density {d}: freezing vs FLASC")
        print(f"plot: {png}")
    (out / "freezing.md").write_text(f"settings: {base}\n\n{table}\n")
    return table


if __name__ == "__main__":
    main()
