"""Summaries of per-client utility: pure functions over {client: value} maps.

FL users care about how each client does, not only the global model's pooled accuracy: the
mean hides the clients a global model serves poorly, the 10th percentile shows them, and the
fraction of clients better off than with a model trained on their own data alone says
whether federating was worth it for them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PREFIX = "pers"  # metrics.jsonl keys: pers/<model>/<statistic>


def summarize(values: Mapping[int, float], reference: Mapping[int, float] | None = None,
              higher_is_better: bool = True) -> dict[str, float]:
    """mean, median, p10 (10th percentile, linear interpolation) of the per-client values and,
    given each client's local-only `reference`, `beats_local`: the fraction of the clients
    that have a reference whose value is strictly better than it (ties are not better)."""
    if not values:
        raise ValueError("summarize: no per-client values (no client has a local test split)")
    v = np.array([float(values[c]) for c in sorted(values)], dtype=np.float64)
    out = {"mean": float(v.mean()), "median": float(np.median(v)),
           "p10": float(np.percentile(v, 10)), "clients": len(v)}
    if reference is not None:
        both = [c for c in sorted(values) if c in reference]
        if both:
            sign = 1.0 if higher_is_better else -1.0
            better = sum(sign * (values[c] - reference[c]) > 0 for c in both)
            out["beats_local"] = better / len(both)
    return out


def metric_row(model: str, summary: Mapping[str, float]) -> dict[str, float]:
    """`summarize`'s statistics as metrics.jsonl keys, e.g. pers/global/p10."""
    return {f"{PREFIX}/{model}/{k}": v for k, v in summary.items()}
