"""What every task provides: federated data, a model with LoRA, a loss and an evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fedlora.data import partition
from fedlora.data.federated import FederatedData, Split
from fedlora.rng import np_rng

if TYPE_CHECKING:
    from fedlora.config import Config


class Task(Protocol):
    name: str
    data: FederatedData
    model: torch.nn.Module
    utility: str  # the headline metric, e.g. "accuracy"

    def batch(self, split: Split, idx: np.ndarray, device: torch.device,
              train: bool) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, split: Split, batch_size: int,
                 device: torch.device) -> dict[str, float]: ...


@dataclass
class Examples:
    """Raw labelled examples as a loader returns them, before splitting and tokenising."""

    inputs: list  # texts (or image arrays)
    labels: list  # label names or ids, any hashable
    clients: list | None = None  # natural partition key per example
    is_test: np.ndarray | None = None  # a fixed official split, when the data has one


def label_map(labels: list) -> tuple[np.ndarray, list[str]]:
    """Integer labels from a label list, the map sorted by name (numbers numerically)."""
    names = sorted({str(x) for x in labels},
                   key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(x)] for x in labels], dtype=np.int64), names


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def stratified_test_split(labels: np.ndarray, test_size: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Boolean is_test with `test_size` examples, classes in proportion (largest remainder)."""
    n = len(labels)
    if test_size >= n:
        raise ValueError(f"task.test_size: {test_size} leaves no training data ({n} examples)")
    classes, counts = np.unique(labels, return_counts=True)
    quota = partition._largest_remainder(counts / n, test_size)
    is_test = np.zeros(n, dtype=bool)
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        is_test[idx[rng.permutation(len(idx))[:q]]] = True
    return is_test


def train_test(cfg: Config, n: int, labels: np.ndarray | None,
               is_test: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices: the data's own split if it has one, else `task.test_size` held out
    (stratified by label when there are labels), then `task.max_examples` of the rest."""
    t = cfg.task
    if is_test is None:
        rng = np_rng(cfg.seed, "split")
        if labels is not None:
            is_test = stratified_test_split(labels, t.test_size, rng)
        else:
            if t.test_size >= n:
                raise ValueError(f"task.test_size: {t.test_size} leaves no training data "
                                 f"({n} examples)")
            is_test = np.zeros(n, dtype=bool)
            is_test[rng.permutation(n)[:t.test_size]] = True
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"task '{t.name}': the split has {len(train_idx)} training and "
                         f"{len(test_idx)} test examples; both must be non-empty")
    if t.max_examples is not None and t.max_examples < len(train_idx):
        pick = np_rng(cfg.seed, "subsample").choice(len(train_idx), t.max_examples,
                                                    replace=False)
        train_idx = np.sort(train_idx[pick])
    return train_idx, test_idx


def default_partition(cfg: Config, has_clients: bool, has_labels: bool = True) -> str:
    """`task.partition` when the config leaves it to the task (null): data with users
    (a client column) is split by user, labelled data by Dirichlet label skew, the rest iid.
    The choice is written back into `cfg`, so the run's config.yaml records it."""
    t = cfg.task
    if t.partition is None:
        t.partition = "natural" if has_clients else "dirichlet" if has_labels else "iid"
    return t.partition


def partition_clients(cfg, labels: np.ndarray, clients: list | None,
                      seed: int) -> tuple[partition.Partition, np.ndarray]:
    """Apply `task.partition` to the training examples."""
    t = cfg.task
    default_partition(cfg, clients is not None)
    rng = np_rng(seed, "partition")
    if t.partition in ("natural", "iid_mix"):
        if clients is None:
            raise ValueError(f"task.partition: '{t.partition}' needs a client column; "
                             f"task '{t.name}' has none (use dirichlet or iid)")
        parts, names = partition.natural(clients)
        if t.partition == "iid_mix":
            parts = partition.iid_mix(parts, t.mix, rng)
        return parts, names
    if t.partition == "iid":
        parts = partition.iid(len(labels), t.num_clients, rng)
    else:
        parts = partition.dirichlet(labels, t.num_clients, t.alpha, rng)
    return parts, np.arange(len(parts)).astype(str)  # one string array, not N objects


def hold_out_local_test(cfg: Config, data: FederatedData) -> FederatedData:
    """Carve `task.local_test_fraction` of each client's training examples into its local
    test split (`data.local_test`), stratified by label for single-label tasks, each client
    from its own seeded stream. A fraction of 0 (the default) leaves `data` untouched."""
    fraction = cfg.task.local_test_fraction
    if fraction <= 0:
        return data
    labels = data.train.labels
    strat = labels.cpu().numpy() if labels.dim() == 1 and len(labels) == len(data.train) else None
    train, test = partition.hold_out(data.clients, strat, fraction,
                                     lambda k: np_rng(cfg.seed, "local_test", k))
    data.clients, data.local_test = train, test
    return data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: '{name}' requested but CUDA is not available here")
    return torch.device(name)
