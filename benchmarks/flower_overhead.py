"""What Flower costs per round: the same 10-client FLASC round in-process, on Flower's
simulation engine (Ray) and on a Flower deployment (SuperLink + 10 SuperNode processes on
loopback), as ratios to the bare client halves; and fedlora payload bytes vs Flower
message bytes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/flower_overhead.py --rounds 3

"bare" is the sum over the cohort of `ClientRunner.run` (decode the download, the local
training steps, encode the upload), timed in-process: the work a round cannot avoid.
Every arm runs the same config and seed; the script checks that all three end with the
same server vector. Round 1 of the Flower arms also starts the ClientApps (and Ray), so
it is reported separately from the steady rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_tiny_bert, tiny_overrides  # noqa: E402
from flower_harness import BIN, Federation  # noqa: E402
from test_flower import users_file  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import ClientRunner, RoundServer, Simulation  # noqa: E402
from fedlora.rundir import read_jsonl  # noqa: E402


def sha(out: Path) -> str:
    from safetensors.torch import load_file

    P = load_file(str(out / "checkpoint.safetensors"))["P"].contiguous()
    return hashlib.sha256(P.numpy().tobytes()).hexdigest()


def bare(ovr: list[str], out: Path) -> tuple[list[float], list[float]]:
    """Per round, from one in-process run: seconds in the client halves only, and the
    whole round (server half included), so the in-process ratio is measured side by side."""
    server = RoundServer(load_config(None, ovr), out, progress=False)
    runner = ClientRunner(server.task)
    halves, rounds = [], []
    while not server.finished:
        r0 = time.perf_counter()
        t, tasks = server.open_round()
        t0 = time.perf_counter()
        results = [runner.run(ct) for ct in tasks]
        halves.append(time.perf_counter() - t0)
        server.close_round(t, tasks, results)
        rounds.append(time.perf_counter() - r0)
    return halves, rounds


def cold_client_start(ovr: list[str]) -> float:
    """Seconds a fresh process needs to import fedlora and build the task (what every
    deployment ClientApp process pays before it trains)."""
    code = ("import time; t=time.perf_counter(); import sys; "
            "from fedlora.config import load_config; from fedlora.engine import ClientRunner; "
            "from fedlora.tasks import build_task; from fedlora.resolve import resolve_config; "
            f"ClientRunner(build_task(resolve_config(load_config(None, {ovr!r})))); "
            "print(time.perf_counter()-t)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
    return float(r.stdout.strip().splitlines()[-1]) if r.stdout else time.perf_counter() - t0


def flower(ovr: list[str], out: Path, root: Path, clients: int, simulation: bool) -> None:
    cfg = {"overrides": " ".join(shlex.quote(o) for o in ovr), "out": str(out),
           "poll-interval": 0.05, "min-nodes": clients}
    with Federation(root, simulation=simulation) as fed:
        fed.start_superlink()
        if simulation:
            fed.run(cfg, federation_config=f"num-supernodes={clients} init-args-num-cpus=2 "
                                           "client-resources-num-cpus=1")
        else:
            for c in range(clients):
                fed.start_node(c, clients)
            fed.run(cfg)
        fed.wait_file(out / "summary.json", 1800)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--out", default="runs/flower-overhead")
    ap.add_argument("--report-only", action="store_true",
                    help="print the table from an earlier run's directories")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny_bert(out / "tiny-bert")
    data = users_file(out / "data.jsonl", a.clients)
    ovr = tiny_overrides(model, data, **{"method.name": "flasc", "method.d_up": "1/4",
                                         "clients_per_round": a.clients, "rounds": a.rounds,
                                         "eval_every": a.rounds,
                                         "client.max_steps": a.max_steps})
    if a.report_only:
        saved = out / "flower_overhead.json"
        res = json.loads(saved.read_text()) if saved.exists() else {}
        if "bare_s" not in res:  # an interrupted run: time the client halves again
            import shutil

            shutil.rmtree(out / "bare", ignore_errors=True)
            res["bare_s"], res["inprocess_round_s"] = bare(ovr, out / "bare")
        res.setdefault("cold_client_start_s", cold_client_start(ovr))
    else:
        import shutil

        for arm in ("bare", "inprocess", "simulation", "deployment"):
            shutil.rmtree(out / arm, ignore_errors=True)
        halves, rounds = bare(ovr, out / "bare")
        res = {"bare_s": halves, "inprocess_round_s": rounds}
        Simulation(load_config(None, ovr), out / "inprocess", progress=False).run()
        (out / "flower_overhead.json").write_text(json.dumps(res))
        flower(ovr, out / "simulation", out / "fed-sim", a.clients, simulation=True)
        flower(ovr, out / "deployment", out / "fed-dep", a.clients, simulation=False)
        res["cold_client_start_s"] = cold_client_start(ovr)
        (out / "flower_overhead.json").write_text(json.dumps(res))
    shas = {arm: sha(out / arm) for arm in ("bare", "inprocess", "simulation", "deployment")}
    for arm in ("simulation", "deployment"):
        drops = [r.get("dropped_reasons") for r in read_jsonl(out / arm / "metrics.jsonl")
                 if r.get("dropped")]
        same = "same" if shas[arm] == shas["inprocess"] else "DIFFERENT"
        print(f"{arm}: server vector {same} as in-process" + (f"; drops {drops}" if drops
                                                              else ""))
    steady = slice(1, None)
    b = statistics.median(res["bare_s"][steady])
    print(f"bare client halves per round: {b:.3f}s (median of rounds 2..{a.rounds}); "
          f"cold ClientApp start {res['cold_client_start_s']:.2f}s")
    print("| arm | round 1 s | steady round s | steady / bare | payload B/round | "
          "Flower msg B/round |")
    print("|---|---|---|---|---|---|")
    for arm in ("inprocess", "simulation", "deployment"):
        rows = read_jsonl(out / arm / "metrics.jsonl")
        walls = [r["wall_s"] for r in rows]
        if arm == "inprocess":  # the run that timed the client halves, side by side
            walls = res["inprocess_round_s"]
        s = statistics.median(walls[steady])
        pay = statistics.mean(r["upload_bytes"] + r["download_bytes"] for r in rows)
        fl = statistics.mean(r.get("flower_up_bytes", 0) + r.get("flower_down_bytes", 0)
                             for r in rows)
        res[arm] = {"wall_s": walls, "payload_bytes": pay, "flower_bytes": fl}
        print(f"| {arm} | {walls[0]:.2f} | {s:.2f} | {s / b:.1f}x | {pay:.0f} | "
              f"{fl:.0f} |" if fl else f"| {arm} | {walls[0]:.2f} | {s:.2f} | {s / b:.1f}x | "
              f"{pay:.0f} | - |")
    res["sha256"] = shas
    (out / "flower_overhead.json").write_text(json.dumps(res, indent=1))
    print(f"in-process server vector {shas['inprocess'][:16]}; flwr from {BIN}")


if __name__ == "__main__":
    main()
