"""The demo's FLASC run, exported and scored by peft alone (issue 16's "done means").

Runs the demo's FLASC configuration (wordnet-topics, MiniLM, d_up = 1/4; shortened by
default), then scores RUN/export in a fresh interpreter that imports only transformers and
peft (the scorer of tests/test_export.py) on the run's own held-out examples, and prints
both evaluations side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_export_check.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_export import PEFT_ONLY  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import Simulation  # noqa: E402
from fedlora.tasks.base import label_map, train_test  # noqa: E402
from fedlora.tasks.wordnet import load_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--test-size", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = load_config(None, ["method.name=flasc", "method.d_up=1/4", "task.alpha=1",
                                 "server.lr=0.005", f"rounds={args.rounds}",
                                 f"clients_per_round={args.clients}", "client.max_steps=4",
                                 f"task.test_size={args.test_size}",
                                 f"eval_every={args.rounds}"])
        summary = Simulation(cfg, out, progress=False).run()
        ex = load_examples(None)
        labels, _ = label_map(ex.labels)
        _, test_idx = train_test(cfg, len(labels), labels, ex.is_test)
        rows = out / "test.jsonl"
        rows.write_text("".join(json.dumps({"text": ex.inputs[i], "label": str(ex.labels[i])})
                                + "\n" for i in test_idx))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        r = subprocess.run([sys.executable, "-c", PEFT_ONLY, str(out / "export"), str(rows)],
                           env=env, capture_output=True, text=True, cwd=tmp, check=True)
        peft = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps({"fedlora": {k: summary["final"][k] for k in ("accuracy", "loss")},
                      "peft_only": peft["scores"][0],
                      "fedlora_imported_by_scorer": peft["fedlora_imported"]}, indent=1))


if __name__ == "__main__":
    main()
