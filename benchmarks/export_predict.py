"""Export + peft reload of the wordnet-topics model, and predict throughput vs a plain
transformers pipeline on the same model, in one run (issue 16).

1. A short FLASC run of the embedded task (wordnet-topics, all-MiniLM-L6-v2, r = 16).
2. Export: `export_task` on the live model (what the end of a run does) and `fedlora export`
   from disk (rebuilds the task from config.yaml first).
3. Reload: a fresh interpreter that imports only transformers + peft loads the folder with
   `PeftModel.from_pretrained`; its total wall time and the load alone are reported.
4. Throughput on the same N held-out glosses, interleaved (A, B, A, B, ...) so machine
   noise hits both: `fedlora.predict.Predictor.predict` vs `transformers.pipeline(
   "text-classification")` given the very same PeftModel and tokenizer, both at batch 32,
   truncation at task.max_length. Their top labels are compared too.

    python benchmarks/export_predict.py [--rounds 2] [--n 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RELOAD = r"""
import json, sys, time
t0 = time.perf_counter()
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification
t1 = time.perf_counter()
folder = sys.argv[1]
base = AutoModelForSequenceClassification.from_pretrained(
    PeftConfig.from_pretrained(folder).base_model_name_or_path,
    config=AutoConfig.from_pretrained(folder))
model = PeftModel.from_pretrained(base, folder)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1,
                  "fedlora_imported": any(m.startswith("fedlora") for m in sys.modules)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"

    from transformers import pipeline

    from fedlora.config import load_config
    from fedlora.engine import Simulation
    from fedlora.export import export, export_task
    from fedlora.hooks import named_vector
    from fedlora.predict import Predictor

    out = Path(tempfile.mkdtemp(prefix="bench-export-")) / "run"
    cfg = load_config(None, [f"rounds={args.rounds}", "eval_every=100", "client.max_steps=4",
                             "task.test_size=500", "device=cpu"])
    sim = Simulation(cfg, out, progress=False)
    sim.run()
    n_lora = sum(e.numel for e in sim.adapter.layout)
    print(f"trained {args.rounds} rounds", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    export_task(sim.task, sim.cfg, named_vector(sim), out / "export-live", source={})
    live_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = export(out, out / "export-disk")
    disk_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.iterdir())
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RELOAD, str(folder)], env=env, check=True,
                         capture_output=True, text=True)
    reload_total = time.perf_counter() - t0
    reload = json.loads(res.stdout.strip().splitlines()[-1])

    # Throughput on held-out glosses: the same loaded model for both sides.
    from fedlora.tasks.wordnet import load_examples

    print("exported and reloaded", file=sys.stderr, flush=True)
    texts = load_examples().inputs[: args.n]
    pred = Predictor(folder)
    pipe = pipeline("text-classification", model=pred.model, tokenizer=pred.tok, device="cpu")
    kw = {"batch_size": 32, "truncation": True, "max_length": cfg.task.max_length}
    ours, theirs = [], []
    a = b = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = pred.predict(texts, batch_size=32)
        ours.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        b = pipe(texts, **kw)
        theirs.append(len(texts) / (time.perf_counter() - t0))
    same = sum(x["label"] == y["label"] for x, y in zip(a, b)) / len(texts)
    print(json.dumps({
        "rounds": args.rounds, "adapter_params": n_lora, "threads": args.threads,
        "export_live_s": round(live_s, 3), "export_from_disk_s": round(disk_s, 3),
        "export_folder_bytes": size, "adapter_model_bytes": adapter_bytes,
        "reload_fresh_interpreter_s": round(reload_total, 3),
        "reload_imports_s": round(reload["import_s"], 3),
        "reload_load_s": round(reload["load_s"], 3),
        "reload_imported_fedlora": reload["fedlora_imported"],
        "n": len(texts), "predict_ex_per_s": [round(x, 1) for x in ours],
        "pipeline_ex_per_s": [round(x, 1) for x in theirs],
        "median_ratio_predict_over_pipeline": round(statistics.median(ours)
                                                    / statistics.median(theirs), 3),
        "same_top_label": same,
    }, indent=2))


if __name__ == "__main__":
    main()
