"""Per-client evaluation during a run (`eval.personalized`).

Every `eval.every` rounds, on a seeded sample of `eval.clients` clients, the task's utility on
each client's local test split for: the global model P, the model the method would deploy on
that client (its `deployed` answer: FDLoRA's fusion, a fine-tuned global, a personal adapter;
P itself for methods that deploy the global model), and, once per run, a local-only reference
(`eval.local_steps` of local SGD from the initial adapter on the client's own training data).
Summaries go to metrics.jsonl (pers/global/mean, pers/deployed/p10, ...); the per-client
values to personal.jsonl, which `fedlora report` plots as histograms.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedlora import rundir
from fedlora.client.personal import client_metric, finetune
from fedlora.config import Config
from fedlora.model.flat import FlatAdapter
from fedlora.personal.summary import metric_row, summarize
from fedlora.rng import np_rng, torch_seed

PER_CLIENT_FILE = "personal.jsonl"
REFERENCE_FILE = "personal_reference.json"

# A method's answer to "what would you deploy on client c, given the global vector P?"
Deployed = Callable[[int, torch.Tensor], torch.Tensor]


def sample_clients(cfg: Config, local_test: list[np.ndarray]) -> np.ndarray:
    """`eval.clients` clients with a non-empty local test split, from the eval_clients stream
    (fixed for the whole run), sorted."""
    have = np.flatnonzero(np.array([len(t) for t in local_test], dtype=np.int64) > 0)
    if len(have) == 0:
        raise ValueError("eval.personalized: no client has a local test example; raise "
                         "task.local_test_fraction")
    k = min(cfg.eval.clients, len(have))
    return np.sort(np_rng(cfg.seed, "eval_clients").choice(have, size=k, replace=False))


class PersonalEval:
    """Per-client evaluation for one run in `out`."""

    def __init__(self, cfg: Config, task, adapter: FlatAdapter, out: Path,
                 initial: torch.Tensor, device: torch.device):
        self.cfg, self.task, self.adapter, self.out = cfg, task, adapter, Path(out)
        self.initial, self.device = initial, device
        self.clients = sample_clients(cfg, task.data.local_test)
        self.higher = getattr(task, "higher_is_better", True)
        self._reference: dict[int, float] | None = None

    def due(self, t: int) -> bool:
        every = self.cfg.eval.every or self.cfg.eval_every
        return t % every == 0 or t == self.cfg.rounds

    def metric(self, vector: torch.Tensor, c: int) -> float:
        """The task's utility of `vector` on client c's local test split."""
        return client_metric(self.task, self.adapter, vector, self.task.data.local_test[c],
                             self.cfg.eval_batch_size, self.device)[self.task.utility]

    def reference(self) -> dict[int, float]:
        """Each sampled client's local-only utility: computed once (deterministically, from
        the personal stream) and kept in the run directory, so a resumed run reuses it."""
        if self._reference is None:
            path = self.out / REFERENCE_FILE
            if path.exists():
                self._reference = {int(k): float(v) for k, v in
                                   json.loads(path.read_text()).items()}
            else:
                self._reference = {int(c): self.metric(self.local_only(int(c)), int(c))
                                   for c in self.clients}
                rundir.write_json(path, {str(k): v for k, v in self._reference.items()})
        return self._reference

    def local_only(self, c: int) -> torch.Tensor:
        """The local-only reference model of client c."""
        cc = self.cfg.client
        return finetune(self.task, self.adapter, self.initial, self.task.data.clients[c],
                        self.cfg.eval.local_steps, lr=cc.lr, momentum=cc.momentum,
                        batch_size=cc.batch_size, rng=np_rng(self.cfg.seed, "personal", 0, c),
                        dropout_seed=torch_seed(self.cfg.seed, "personal", 0, c),
                        device=self.device)

    def evaluate(self, t: int, P: torch.Tensor, deployed: Deployed | None = None) -> dict:
        """Summaries for round t (metrics.jsonl keys); appends the per-client values to
        personal.jsonl. `deployed` None: the method deploys P itself."""
        ref = self.reference()
        glob = {int(c): self.metric(P, int(c)) for c in self.clients}
        dep = glob if deployed is None else {
            int(c): self.metric(deployed(int(c), P), int(c)) for c in self.clients}
        self.adapter.load_(P)
        row = {**metric_row("global", summarize(glob, ref, self.higher)),
               **metric_row("deployed", summarize(dep, ref, self.higher)),
               **metric_row("local", summarize(ref))}
        rundir.append_jsonl(self.out / PER_CLIENT_FILE, [{
            "round": t, "metric": self.task.utility, "clients": [int(c) for c in self.clients],
            "global": [glob[int(c)] for c in self.clients],
            "deployed": [dep[int(c)] for c in self.clients],
            "local": [ref[int(c)] for c in self.clients]}])
        return row

    def truncate(self, last_round: int) -> None:
        """On resume: drop per-client rows after the checkpoint's round."""
        path = self.out / PER_CLIENT_FILE
        if path.exists():
            rundir.truncate_jsonl(path, last_round)
