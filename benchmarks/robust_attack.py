"""Accuracy under 0-3 malicious clients of 10, for each robust aggregation rule.

    python benchmarks/robust_attack.py [--rounds 10] [--attack sign_flip|scaled] [--seeds 1]

A tiny random BERT (2 layers, 32 wide, the MiniLM tokenizer) on a synthetic 3-class text
file (600 rows, 300 held out, 10 IID clients, all 10 sampled every round; dense LoRA r=4,
5 local steps at lr 0.5, FedAdam lr 0.05, 5 rounds). Attackers are clients 0..a-1:
through the engine's `tamper` hook their real upload is decoded, then multiplied by -10
(sign_flip) or +100 (scaled) and re-encoded, so the server sees a well-formed payload.
Prints a markdown table of final accuracy per rule and attacker count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fedlora.comm import codec  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.engine import Simulation  # noqa: E402

RULES = {
    "mean (none)": {},
    "norm bound 3x median": {"server.robust.max_norm_x_median": 3},
    "trimmed mean 0.3": {"server.robust.rule": "trimmed_mean", "server.robust.trim": 0.3},
    "median": {"server.robust.rule": "median"},
    "krum f=3": {"server.robust.rule": "krum", "server.robust.byzantine": 3},
    "multi-krum f=3": {"server.robust.rule": "multi_krum", "server.robust.byzantine": 3},
}
FACTOR = {"sign_flip": -10.0, "scaled": 100.0}


def make_data(path: Path, rows: int = 600) -> Path:
    words = {"animal": ["dog", "cat", "horse", "wolf", "bird", "fish"],
             "food": ["apple", "bread", "soup", "salad", "cheese", "rice"],
             "tool": ["knife", "hammer", "screwdriver", "saw", "drill", "wrench"]}
    out = []
    for i in range(rows):
        label = list(words)[i % 3]
        w = words[label]
        out.append({"text": f"the {w[i % 6]} and the {w[(i // 3) % 6]} number {i % 17}",
                    "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def overrides(model_dir: Path, data: Path, rounds: int, seed: int, **extra) -> list[str]:
    base = {"task.name": "text-file", "task.path": str(data), "task.partition": "iid",
            "task.num_clients": 10, "task.test_size": 300, "model.name": str(model_dir),
            "model.rank": 4, "method.name": "lora", "rounds": rounds, "clients_per_round": 10,
            "eval_every": rounds, "client.max_steps": 5, "client.batch_size": 16,
            "client.lr": 0.5, "server.optimizer": "fedadam", "server.lr": 0.05, "seed": seed}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def attacker(n_bad: int, factor: float):
    def tamper(t: int, c: int, payload: bytes) -> bytes:
        if c >= n_bad:
            return payload
        pos, vals = codec.decode_sparse(payload, codec.header(payload)["n"])
        dense = torch.zeros(codec.header(payload)["n"])
        dense[pos] = vals * factor
        mask = torch.zeros_like(dense, dtype=torch.bool)
        mask[pos] = True
        return codec.encode(dense, None if bool(mask.all()) else mask)
    return tamper


def run_one(model_dir: Path, data: Path, out: Path, rounds: int, seed: int, rule: dict,
            n_bad: int, factor: float) -> dict:
    cfg = load_config(None, overrides(model_dir, data, rounds, seed, **rule))
    sim = Simulation(cfg, out, progress=False)
    if n_bad:
        sim.tamper = attacker(n_bad, factor)
    summary = sim.run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rejected = sum(len(r.get("rejected", {})) for r in rows)
    return {"accuracy": summary["final"]["accuracy"], "rejected": rejected}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--attack", choices=sorted(FACTOR), default="sign_flip")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--attackers", default="0,1,2,3")
    args = ap.parse_args()
    from conftest import make_tiny_bert

    torch.set_num_threads(1)
    logging.getLogger("fedlora").setLevel(logging.ERROR)  # one warning per rejection otherwise
    counts = [int(a) for a in args.attackers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_bert(tmp / "tiny-bert")
        data = make_data(tmp / "data.jsonl")
        start = time.perf_counter()
        table = {}
        for name, rule in RULES.items():
            for a in counts:
                accs = [run_one(model_dir, data, tmp / f"{len(table)}-{s}", args.rounds, s,
                                rule, a, FACTOR[args.attack]) for s in range(args.seeds)]
                table[name, a] = (sum(x["accuracy"] for x in accs) / len(accs),
                                  sum(x["rejected"] for x in accs))
                print(name, a, table[name, a], flush=True)
    print(f"\n{args.attack}, {args.rounds} rounds, {args.seeds} seed(s), "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| rule | " + " | ".join(f"{a} malicious" for a in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in RULES:
        print(f"| {name} | " + " | ".join(f"{table[name, a][0]:.3f}" for a in counts) + " |")


if __name__ == "__main__":
    main()
