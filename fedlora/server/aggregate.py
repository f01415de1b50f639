"""Averaging decoded client updates into the pseudo-gradient."""

from __future__ import annotations

import torch


def weighted_mean(updates: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Sequential sum in list order, then one division: the same arithmetic the DP path uses,
    so a run with sigma = 0 and no clipping is bit-identical to a non-private one."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    total = torch.zeros_like(updates[0])
    if weights is None:
        for u in updates:
            total.add_(u)
        return total.div_(len(updates))
    for u, w in zip(updates, weights):
        total.add_(u, alpha=float(w))
    return total.div_(float(sum(weights)))
