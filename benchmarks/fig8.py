"""Paper Fig. 8 at CPU scale: FLASC vs LoRA vs FLoRA / SLoRA under data heterogeneity.

    python benchmarks/fig8.py [--quick] [--rounds R] [--alphas 100,0.01] [--threads N] [--out DIR]

On wordnet-topics with Dirichlet alpha in {100 (about iid), 0.01 (about one label per
client)}: LoRA at ranks 1, 4, 16; FLASC (d_up = 1/4) at ranks 4, 16; FLoRA (two-stage,
full-rank Stage 1) and SLoRA (Stage 1 on a fixed random 10% of each adapted W), both rank
16 in Stage 2, Stage 1 = the first quarter of the rounds (paper: 50 of 200). Stage 1 uses
`method.stage1_lr` = 1e-3 on W (paper Appendix B.4: "SLoRA Stage 1 LR 1e-3", against a
server lr of 1e-2): a server-Adam step of 1e-2 on every pretrained weight is too large.

Writes one PNG per alpha of accuracy vs cumulative upload bytes
(`fedlora.report.plot_utility_vs_upload`) and prints final accuracy, the accuracy at the end
of Stage 1 and right after the SVD switch (the two-stage arms evaluate every round), the
SVD's relative truncation error, and total upload. Default scale (BASE in
table3.py, 30 rounds): 14 runs, ~8 min each on one busy CPU thread (Stage 1 rounds cost
more: the full-rank W of every adapted layer crosses the wire). --quick: alpha 100 only,
12 rounds (Stage 1 = 3), LoRA r1/r16, FLASC r16, FLoRA, SLoRA: 5 runs, ~3 min each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from table3 import add_common, run_arm, setup  # noqa: E402

from fedlora.report import load_run, plot_utility_vs_upload  # noqa: E402
from fedlora.rundir import read_jsonl  # noqa: E402


def arms(rounds: int, quick: bool) -> dict[str, dict]:
    s1 = max(1, rounds // 4)
    two_stage = {"method.name": "flora_two_stage", "model.rank": 16, "method.stage1_rounds": s1,
                 "method.stage1_lr": 1e-3, "eval_every": 1}  # per-round curve (paper's right)
    out = {f"LoRA r{r}": {"method.name": "lora", "model.rank": r}
           for r in ((1, 16) if quick else (1, 4, 16))}
    out |= {f"FLASC r{r} d1/4": {"method.name": "flasc", "model.rank": r, "method.d_up": 0.25}
            for r in ((16,) if quick else (4, 16))}
    out["FLoRA r16"] = {**two_stage, "method.stage1_density": 1.0}
    out["SLoRA r16"] = {**two_stage, "method.stage1_density": 0.1}
    return out


def stage_accuracy(run_dir: Path, s1: int) -> str:
    """Accuracy at the last evaluation in Stage 1 and the first one after the switch, and
    the SVD's relative truncation error (method state in the checkpoint)."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "accuracy" in r]
    before = [f"{r['accuracy']:.3f}" for r in rows if r["round"] <= s1][-1:] or ["-"]
    after = [f"{r['accuracy']:.3f}" for r in rows if r["round"] > s1][:1] or ["-"]
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    err = meta["method"].get("svd", {}).get("rel_err")
    return f"{before[0]} -> {after[0]} | {'-' if err is None else f'{err:.3f}'}"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", default=None, help="default 100,0.01; --quick 100")
    add_common(ap)
    args = ap.parse_args(argv)
    base, out = setup(args, "fig8")
    alphas = [float(a) for a in (args.alphas or ("100" if args.quick else "100,0.01")).split(",")]
    lines = ["| alpha | arm | final acc | Stage 1 end -> after SVD | SVD rel. err | upload MB "
             "| x LoRA r16 |", "|---|---|---|---|---|---|---|"]
    for a in alphas:
        runs, res = [], {}
        for label, over in arms(base["rounds"], args.quick).items():
            slug = label.lower().replace(" ", "-").replace("/", "_")
            d = out / f"a{a:g}" / slug
            res[label] = (d, over, run_arm(base, d, {**over, "task.alpha": a}))
            run = load_run(d)
            run.label = label
            runs.append(run)
        ref = res["LoRA r16"][2]["total_upload_bytes"]
        for label, (d, over, s) in res.items():
            s1 = over.get("method.stage1_rounds")
            stages = stage_accuracy(d, s1) if s1 else "- | -"
            up = s["total_upload_bytes"]
            lines.append(f"| {a:g} | {label} | {s['final']['accuracy']:.3f} | {stages} | "
                         f"{up / 1e6:.1f} | {up / ref:.2f} |")
        png = plot_utility_vs_upload(runs, out / f"fig8_alpha{a:g}.png", logx=True,
                                     title=f"wordnet-topics, alpha={a:g}")
        print(f"plot: {png}", flush=True)
    table = "\n".join(lines)
    print(table)
    (out / "fig8.md").write_text(f"settings: {base}\n\n{table}\n")
    return table


if __name__ == "__main__":
    main()
