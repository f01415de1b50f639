"""`fedlora run | resume | demo | ...` — thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.config import load_config
    from fedlora.engine import Simulation, resolve_config

    cfg = resolve_config(load_config(args.config, args.set))
    out = Path(args.out) if args.out else _default_out(cfg.method.name)
    summary = Simulation(cfg, out, progress=not args.no_progress).run()
    print(json.dumps({"run_dir": str(out), **summary["final"],
                      "total_upload_bytes": summary["total_upload_bytes"]}, indent=2))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from fedlora.engine import Simulation

    sim = Simulation.resume(args.dir, rounds=args.rounds, progress=not args.no_progress)
    summary = sim.run()
    print(json.dumps({"run_dir": str(args.dir), **summary["final"]}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedlora.demo import demo

    demo(quick=args.quick, out=Path(args.out) if args.out else None,
         progress=not args.no_progress)
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from fedlora.config import load_config
    from fedlora.privacy import calibrate_noise, epsilon

    cfg = load_config(args.config, args.set)
    population = args.population
    if population is None:  # the real number of non-empty clients of this partition
        from fedlora.engine import resolve_config
        from fedlora.tasks import build_task

        population = len(build_task(resolve_config(cfg)).data.eligible)
    cohort = min(cfg.clients_per_round, population)
    kw = dict(rounds=cfg.rounds, sampling=cfg.sampling, population=population,
              cohort_size=cohort, delta=args.delta if args.delta is not None else cfg.dp.delta,
              noise_cohort_size=cfg.dp.noise_cohort_size,
              accountant=None if cfg.dp.accountant == "auto" else cfg.dp.accountant)
    sigma = calibrate_noise(args.target_epsilon, **kw)
    report = epsilon(noise_multiplier=sigma, **kw)
    print(f"noise_multiplier (sigma) = {sigma:.6g} for epsilon <= {args.target_epsilon} at "
          f"delta = {report.delta:.3g}")
    print(f"  {cfg.rounds} rounds, sampling={cfg.sampling} (q = {report.sampling_probability:.4g}"
          f"), population={population}, accountant={report.accountant}, "
          f"neighbours={report.neighboring_relation}")
    if report.note:
        print(f"  note: {report.note}")
    print(f"use: --set dp.enabled=true --set dp.noise_multiplier={sigma:.6g} --set dp.clip=C")
    return 0


def _floats(text: str) -> list[float]:
    from fractions import Fraction

    return [float(Fraction(x.strip())) for x in text.split(",") if x.strip()]


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedlora.sweep import parse_grid, sweep

    table = sweep(args.config, parse_grid(args.grid), args.out, seeds=args.seeds,
                  overrides=args.set)
    print(table.to_string(index=False))
    print(f"\nresults: {Path(args.out) / 'results.csv'}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from fedlora.report import report
    from fedlora.sweep import search

    results = search(args.config, [int(r) for r in _floats(args.ranks)],
                     _floats(args.densities), args.out, overrides=args.set, metric=args.metric,
                     target=args.target)
    best = "best utility" if args.target is None else f"best: MB to reach {args.target:g}"
    print(f"| strategy | trials | tuning upload (MB) | {best} | best (rank, d_up) |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        b = res.best
        if b is None:
            print(f"| {name} | 0 |")
            continue
        # with a target, utility is minus the bytes to reach it (-inf: never reached)
        shown = f"{b.utility:.4g}" if args.target is None else f"{-b.utility / 1e6:.2f}"
        print(f"| {name} | {len(res.trials)} | {res.total_upload_bytes / 1e6:.1f} | {shown} "
              f"| ({b.rank}, {b.d_up:.4g}) |")
    md = report([Path(args.out) / "trials"], Path(args.out) / "report", metric=args.metric,
                target=args.target, ledgers={n: r for n, r in results.items()},
                search_target=args.target)
    print(f"\nreport: {md}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora.report import report

    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    md = report(args.dirs, out, metric=args.metric, target=args.target)
    print(md.read_text())
    print(f"written: {md.parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one federated experiment")
    r.add_argument("config", nargs="?", help="YAML config (default: the embedded FLASC demo)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key, e.g. --set method.d_up=1/16")
    r.add_argument("--out", help="run directory (default: runs/<time>-<method>)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("resume", help="continue a run from its last checkpoint")
    s.add_argument("dir")
    s.add_argument("--rounds", type=int, help="extend the run to this many rounds")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_resume)

    d = sub.add_parser("demo", help="FLASC vs dense LoRA on wordnet-topics, table + plot")
    d.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes)")
    d.add_argument("--out", help="output directory (default: runs/<time>-demo)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("sweep", help="run a grid of experiments (resumable)")
    w.add_argument("config", nargs="?")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...")
    w.add_argument("--seeds", type=int, default=1)
    w.add_argument("--out", required=True)
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    w.set_defaults(func=cmd_sweep)

    f = sub.add_parser("search", help="FLASC-S vs LoRA-rank grid vs full grid (tuning bytes)")
    f.add_argument("config", nargs="?")
    f.add_argument("--ranks", default="1,4,16,64")
    f.add_argument("--densities", default="1/16,1/8,1/4,1/2,1")
    f.add_argument("--out", required=True)
    f.add_argument("--metric", help="trial utility metric (default: the task's)")
    f.add_argument("--target", type=float,
                   help="score trials by upload bytes to reach this metric value instead")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    f.set_defaults(func=cmd_search)

    g = sub.add_parser("report", help="plots and a markdown table from run directories")
    g.add_argument("dirs", nargs="+")
    g.add_argument("--out")
    g.add_argument("--metric")
    g.add_argument("--target", type=float)
    g.set_defaults(func=cmd_report)

    v = sub.add_parser("privacy", help="calibrate the DP noise multiplier for a target epsilon")
    v.add_argument("config", nargs="?")
    v.add_argument("--target-epsilon", type=float, required=True)
    v.add_argument("--delta", type=float, help="default: dp.delta, else 1/population")
    v.add_argument("--population", type=int, help="skip loading the data: number of clients")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=cmd_privacy)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="fedlora: %(message)s")
    args = build_parser().parse_args(argv)
    from fedlora.config import ConfigError
    from fedlora.model.backbone import MissingResource
    from fedlora.rundir import RunDirError

    try:
        return args.func(args)
    except (ConfigError, MissingResource, RunDirError, ValueError, FloatingPointError) as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; `fedlora resume DIR` continues from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
