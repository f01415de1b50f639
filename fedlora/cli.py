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
    from fedlora.engine import Simulation

    cfg = load_config(args.config, args.set)
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
