"""Client partitions. Each returns a `Partition`: one index array per client, every example once.

A partition is stored as one flat index array plus offsets (CSR), not as a list of arrays:
a population of 100,000 clients costs two integer arrays, not 100,000 Python objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class Partition(Sequence):
    """Training indices per client: client k holds `indices[offsets[k]:offsets[k + 1]]`,
    ascending. Indexing returns a read-only view; `sizes` and `empty` are computed once."""

    def __init__(self, indices: np.ndarray, offsets: np.ndarray):
        self.indices = np.ascontiguousarray(indices, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.indices) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("Partition: offsets must start at 0, never decrease and end at "
                             f"len(indices) = {len(self.indices)}")
        self.indices.flags.writeable = False
        self.sizes = np.diff(self.offsets)
        self.sizes.flags.writeable = False

    @classmethod
    def from_owner(cls, owner: np.ndarray, num_clients: int) -> Partition:
        """From each example's client id (-1: unassigned); indices ascend within a client."""
        owner = np.asarray(owner, dtype=np.int64)
        keep = np.flatnonzero(owner >= 0)
        order = keep[np.argsort(owner[keep], kind="stable")]
        counts = np.bincount(owner[keep], minlength=num_clients)
        return cls(order, np.concatenate([[0], np.cumsum(counts)]))

    @classmethod
    def from_arrays(cls, parts: Sequence[np.ndarray]) -> Partition:
        """From one index array per client (each sorted here)."""
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        flat = (np.concatenate([np.sort(np.asarray(p, dtype=np.int64)) for p in parts])
                if len(parts) else np.zeros(0, np.int64))
        return cls(flat, np.concatenate([[0], np.cumsum(sizes)]))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"client {k} out of range (population {len(self)})")
        return self.indices[self.offsets[k]:self.offsets[k + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(len(self)):
            yield self.indices[self.offsets[k]:self.offsets[k + 1]]

    @property
    def empty(self) -> np.ndarray:
        """Ids of the clients that hold no example."""
        return np.flatnonzero(self.sizes == 0)

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.offsets.nbytes + self.sizes.nbytes)


def empty_clients(parts: Sequence[np.ndarray]) -> list[int]:
    """Ids of the clients that hold no example (what a run's summary reports)."""
    if isinstance(parts, Partition):
        return parts.empty.tolist()
    return [i for i, p in enumerate(parts) if len(p) == 0]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum exactly to `total`."""
    raw = weights * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        # Largest fractional parts first; stable order breaks ties by client index.
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
              rng: np.random.Generator) -> Partition:
    """Dirichlet label skew (paper 4.3, docs/engine.md).

    Each client k draws p_k ~ Dir(alpha * 1_C); each class column is normalised
    across clients, q_kc = p_kc / sum_k' p_k'c, and client k receives round(q_kc N_c)
    examples of class c. Rounding uses largest remainders per class, so every
    example is assigned exactly once. Clients may end up empty; the caller reports
    them and never samples them.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    q = rng.dirichlet(np.full(len(classes), float(alpha)), size=num_clients)  # (K, C)
    col = q.sum(axis=0, keepdims=True)
    np.divide(q, col, out=q, where=col > 0)  # in place: (K, C) float64 is 21 MB at K = 1e5
    q[:, (col == 0)[0]] = 1.0 / num_clients
    owner = np.full(len(labels), -1, dtype=np.int64)
    clients = np.arange(num_clients)
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        owner[idx] = np.repeat(clients, _largest_remainder(q[:, ci], len(idx)))
    return Partition.from_owner(owner, num_clients)


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> Partition:
    perm = rng.permutation(num_examples)
    # np.array_split's sizes: the first (n mod K) clients get one more.
    base, extra = divmod(num_examples, num_clients)
    sizes = np.full(num_clients, base, dtype=np.int64)
    sizes[:extra] += 1
    owner = np.empty(num_examples, dtype=np.int64)
    owner[perm] = np.repeat(np.arange(num_clients), sizes)
    return Partition.from_owner(owner, num_clients)


def natural(client_ids: Sequence) -> tuple[Partition, np.ndarray]:
    """One client per distinct id, ordered by the id's string form (deterministic). The
    names come back as one numpy string array, not one Python object per client."""
    keys = np.asarray([str(c) for c in client_ids])
    names, inverse = np.unique(keys, return_inverse=True)
    return Partition.from_owner(inverse.reshape(-1), len(names)), names


def iid_mix(parts: Sequence[np.ndarray], mix: float, rng: np.random.Generator) -> Partition:
    """Keep (1 - mix) of each client's data, pool the rest and deal it out uniformly."""
    kept, pool = [], []
    for idx in parts:
        idx = idx[rng.permutation(len(idx))]
        n_pool = int(round(mix * len(idx)))
        pool.append(idx[:n_pool])
        kept.append(idx[n_pool:])
    pooled = np.concatenate(pool) if pool else np.zeros(0, np.int64)
    pooled = pooled[rng.permutation(len(pooled))]
    shares = np.array_split(pooled, len(parts))
    return Partition.from_arrays([np.concatenate([k, s]) for k, s in zip(kept, shares)])


def hold_out(parts: Sequence[np.ndarray], labels: np.ndarray | None, fraction: float,
             rng_for) -> tuple[Partition, Partition]:
    """Carve a local test split out of each client's indices: (train parts, test parts).

    Client k holds out round(fraction * n_k) of its n_k examples, capped so that it keeps at
    least one training example (a client of one example holds out nothing). With labels the
    hold-out is stratified within the client (classes in proportion, largest remainder);
    `rng_for(k)` gives client k's own generator, so one client's split never depends on
    another's size.
    """
    train, test = [], []
    for k, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        n = len(idx)
        size = min(int(round(fraction * n)), max(n - 1, 0))
        if size <= 0:
            train.append(idx)
            test.append(np.zeros(0, np.int64))
            continue
        rng = rng_for(k)
        chosen = np.zeros(n, dtype=bool)
        if labels is None:
            chosen[rng.permutation(n)[:size]] = True
        else:
            own = np.asarray(labels)[idx]
            classes, counts = np.unique(own, return_counts=True)
            quota = _largest_remainder(counts / n, size)
            for c, q in zip(classes, quota):
                where = np.flatnonzero(own == c)
                chosen[where[rng.permutation(len(where))[:q]]] = True
        train.append(idx[~chosen])
        test.append(idx[chosen])
    return Partition.from_arrays(train), Partition.from_arrays(test)
