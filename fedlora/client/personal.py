"""Client-side operations on one client's own data: evaluate a vector on its local test split,
fine-tune a vector on its training examples, and the loss of a vector on a few of them.

Used by per-client evaluation and by the personalization methods (fine-tuning at
evaluation, FDLoRA's fusion weights); nothing here leaves the client.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlora.client.train import train_client
from fedlora.data.federated import client_batches, subset
from fedlora.model.flat import FlatAdapter
from fedlora.rng import np_rng, torch_seed


def client_metric(task, adapter: FlatAdapter, vector: torch.Tensor, indices: np.ndarray,
                  batch_size: int, device: torch.device) -> dict[str, float]:
    """The task's metrics of `vector` on the training-split rows `indices` (a local test)."""
    if len(indices) == 0:
        raise ValueError("client_metric: the client has no local test examples")
    adapter.load_(vector)
    return task.evaluate(task.model, subset(task.data.train, indices), batch_size, device)


def finetune(task, adapter: FlatAdapter, start: torch.Tensor, indices: np.ndarray, steps: int, *,
             lr: float, momentum: float, batch_size: int, rng: np.random.Generator,
             dropout_seed: int, device: torch.device) -> torch.Tensor:
    """`steps` local SGD steps from `start` on the examples `indices` (as many passes as
    needed); returns the trained vector (a copy). Dropout draws from `dropout_seed` without
    disturbing the caller's global RNG."""
    adapter.load_(start)
    if steps <= 0 or len(indices) == 0:
        return adapter.vector.detach().clone()
    per_epoch = -(-len(indices) // batch_size)
    batches = client_batches(indices, batch_size, -(-steps // per_epoch), steps, rng)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dropout_seed)
        train_client(task, adapter, batches, lr=lr, momentum=momentum, device=device)
    return adapter.vector.detach().clone()


@torch.inference_mode()
def mean_loss(task, adapter: FlatAdapter, vector: torch.Tensor, indices: np.ndarray,
              device: torch.device) -> float:
    """The task loss of `vector` averaged over the examples `indices` (one batch, eval mode)."""
    adapter.load_(vector)
    task.model.eval()
    batch = task.batch(task.data.train, np.asarray(indices), device, train=False)
    return float(task.loss(task.model, batch))


# FDLoRA's fusion weights are searched on this grid (docs/personalization.md: a deterministic
# stand-in for LoraHub's gradient-free optimizer).
FUSION_GRID = (0.0, 0.5, 1.0, 1.5)


def fuse(personal: torch.Tensor, global_: torch.Tensor, weights: tuple[float, float]
         ) -> torch.Tensor:
    """w_p * personal + w_g * global, element-wise over the flat adapter (LoraHub's
    composition of LoRA modules: A and B, and the head, each a weighted sum)."""
    return weights[0] * personal + weights[1] * global_


def fusion_weights(loss_of, personal: torch.Tensor, global_: torch.Tensor, l1: float,
                   grid: tuple[float, ...] = FUSION_GRID) -> tuple[tuple[float, float], float]:
    """The (w_p, w_g) on `grid` x `grid` minimising loss_of(fused) + l1 (|w_p| + |w_g|), and
    that score; ties go to the first candidate in grid order. `loss_of` scores a vector on
    the client's own examples."""
    best, best_score = (0.0, 0.0), float("inf")
    for wp in grid:
        for wg in grid:
            score = loss_of(fuse(personal, global_, (wp, wg))) + l1 * (abs(wp) + abs(wg))
            if score < best_score:
                best, best_score = (wp, wg), score
    return best, best_score


class ClientContext:
    """What a client half may use besides its instruction: its own data (through the task),
    the resident model's flat adapter and the run's initial adapter. Personalization
    methods train and score client-held vectors with it; nothing here leaves the client.

    Streams: `personal` with keys (kind, round, client) for data order and dropout, kinds
    0 = the local-only reference, 1 = fine-tuning at evaluation, 2 = a personal module's
    local training; `fusion` (client) for the examples FDLoRA's weights are fitted on.
    """

    def __init__(self, task, adapter: FlatAdapter, client: int, seed: int, train: dict,
                 init: torch.Tensor, round_: int):
        self.task, self.adapter, self.client, self.seed = task, adapter, client, seed
        self.train_settings, self.init, self.round = train, init, round_
        self.device = init.device

    @property
    def examples(self) -> np.ndarray:
        """This client's training examples (its local test split excluded)."""
        return self.task.data.clients[self.client]

    def train(self, start: torch.Tensor, kind: int) -> tuple[torch.Tensor, dict]:
        """One round of the client's local SGD (its `train` settings) from `start`; returns
        the trained vector (a copy) and the training statistics. The adapter is left
        holding the trained vector; the caller's global RNG is untouched."""
        tr, round_ = self.train_settings, self.round
        self.adapter.load_(start)
        batches = client_batches(self.examples, tr["batch_size"], tr["epochs"], tr["max_steps"],
                                 np_rng(self.seed, "personal", kind, round_, self.client))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(self.seed, "personal", kind, round_, self.client))
            stats = train_client(self.task, self.adapter, batches, lr=tr["lr"],
                                 momentum=tr["momentum"], device=self.device)
        return self.adapter.vector.detach().clone(), stats

    def finetune(self, start: torch.Tensor, steps: int) -> torch.Tensor:
        """`steps` local steps from `start` (as many passes over the data as needed)."""
        tr, round_ = self.train_settings, self.round
        return finetune(self.task, self.adapter, start, self.examples, steps, lr=tr["lr"],
                        momentum=tr["momentum"], batch_size=tr["batch_size"],
                        rng=np_rng(self.seed, "personal", 1, round_, self.client),
                        dropout_seed=torch_seed(self.seed, "personal", 1, round_, self.client),
                        device=self.device)

    def fusion_examples(self, count: int) -> np.ndarray:
        """Up to `count` of the client's training examples, fixed per client (fusion stream)."""
        ex = self.examples
        if len(ex) <= count:
            return ex
        return np.sort(np_rng(self.seed, "fusion", self.client).choice(ex, count, replace=False))

    def loss(self, vector: torch.Tensor, indices: np.ndarray) -> float:
        """The task loss of `vector` on the client's examples `indices`."""
        return mean_loss(self.task, self.adapter, vector, indices, self.device)
