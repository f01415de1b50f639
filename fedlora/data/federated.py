"""Pre-tokenised examples plus a client partition: everything a round needs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Split:
    """Model inputs as dense tensors (one row per example) and integer labels."""

    inputs: dict[str, torch.Tensor]  # e.g. input_ids (N, L) int32 + lengths (N,)
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FederatedData:
    """Train/test splits and the clients' train indices (a `Partition` for the built-in
    partitions: O(examples + clients) memory, no per-client objects)."""

    train: Split
    test: Split
    clients: Sequence[np.ndarray]  # train indices per client
    client_names: Sequence[str]
    label_names: list[str]
    empty_clients: list[int] = field(default_factory=list)
    # Per-client held-out indices into `train` (task.local_test_fraction); empty when off.
    local_test: list[np.ndarray] = field(default_factory=list)

    @property
    def sizes(self) -> np.ndarray:
        """Examples per client."""
        sizes = getattr(self.clients, "sizes", None)  # a Partition has them precomputed
        if sizes is not None:
            return sizes
        return np.fromiter((len(c) for c in self.clients), dtype=np.int64,
                           count=len(self.clients))

    @property
    def eligible(self) -> np.ndarray:
        """Clients that can be sampled (non-empty)."""
        return np.flatnonzero(self.sizes > 0)


def subset(split: Split, idx: np.ndarray) -> Split:
    """The rows `idx` of a split, e.g. one client's local test examples."""
    rows = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return Split({k: v[rows] for k, v in split.inputs.items()}, split.labels[rows])


def client_batches(indices: np.ndarray, batch_size: int, epochs: int, max_steps: int | None,
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled minibatches for `epochs` passes, stopping after `max_steps`.

    The last partial batch of an epoch is kept: clients are small and dropping it
    would waste a large share of their data.
    """
    steps = 0
    for _ in range(epochs):
        order = indices[rng.permutation(len(indices))]
        for start in range(0, len(order), batch_size):
            if max_steps is not None and steps >= max_steps:
                return
            yield order[start:start + batch_size]
            steps += 1


def num_steps(n: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    steps = epochs * -(-n // batch_size)
    return steps if max_steps is None else min(steps, max_steps)
