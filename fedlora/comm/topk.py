"""TopKMask: the global l1 top-k of the paper, with deterministic ties."""

from __future__ import annotations

import math

import torch


def num_kept(n: int, density: float) -> int:
    """k = floor(d * n), at least one entry when d > 0 (docs/methods.md)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(n, max(1, math.floor(density * n)))


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k largest `scores`; ties go to the lowest index.

    Callers pass |v| (the l1 criterion). O(n): one topk for the threshold, then
    ties at the threshold are filled in index order with a cumulative sum.
    """
    if scores.dim() != 1:
        raise ValueError("topk_mask expects a 1-D vector")
    n = scores.numel()
    k = num_kept(n, density)
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    mask = scores > threshold
    need = k - int(mask.sum())
    ties = scores == threshold
    mask |= ties & (torch.cumsum(ties, 0) <= need)
    return mask
