"""Client partitions. Each returns one index array per client; every example once."""

from __future__ import annotations

import numpy as np


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
              rng: np.random.Generator) -> list[np.ndarray]:
    """Dirichlet label skew (paper 4.3, docs/engine.md).

    Each client k draws p_k ~ Dir(alpha * 1_C); each class column is normalised
    across clients, q_kc = p_kc / sum_k' p_k'c, and client k receives round(q_kc N_c)
    examples of class c. Rounding uses largest remainders per class, so every
    example is assigned exactly once. Clients may end up empty; the caller reports
    them and never samples them.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    p = rng.dirichlet(np.full(len(classes), float(alpha)), size=num_clients)  # (K, C)
    col = p.sum(axis=0, keepdims=True)
    q = np.divide(p, col, out=np.full_like(p, 1.0 / num_clients), where=col > 0)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        counts = _largest_remainder(q[:, ci], len(idx))
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(c)) if c else np.zeros(0, np.int64) for c in parts]


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(num_examples)
    return [np.sort(c) for c in np.array_split(perm, num_clients)]


def natural(client_ids: list) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct id, ordered by the id's string form (deterministic)."""
    keys = np.asarray([str(c) for c in client_ids])
    names, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1]
    return [np.sort(c) for c in np.split(order, bounds)], [str(n) for n in names]


def iid_mix(parts: list[np.ndarray], mix: float, rng: np.random.Generator) -> list[np.ndarray]:
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
    return [np.sort(np.concatenate([k, s])) for k, s in zip(kept, shares)]
