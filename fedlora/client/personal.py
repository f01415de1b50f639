"""Client-side operations on one client's own data: evaluate a vector on its local test split,
fine-tune a vector on its training examples, and the loss of a vector on a few of them.

Used by per-client evaluation and by the personalization methods (fine-tuning at
evaluation, FDLoRA's fusion weights); nothing here leaves the client.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlora.data.federated import client_batches, subset
from fedlora.model.flat import FlatAdapter


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
    from fedlora.client.train import train_client

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
