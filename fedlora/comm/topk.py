"""TopKMask: the global l1 top-k of the paper, with deterministic ties."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

# A product d * n that falls short of an integer by at most 1e-9 of itself is that integer:
# float densities carry representation error (0.29 is stored as 0.28999999999999998) and
# floor() must not turn it into one entry fewer. A density p/q that is meant falls short by
# at least 1/q, far more than this tolerance unless q * d * n exceeds 1e9.
_REL_TOL = 1e-9


def num_kept(n: int, density: float) -> int:
    """k = floor(d * n), at least one entry when d > 0 (docs/methods.md).

    The product is taken in exact arithmetic on the float density, and one that falls
    within a relative 1e-9 below an integer counts as that integer, so ``num_kept(100,
    0.29)`` is 29 (the plain float product 28.999... would give 28).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    exact = Fraction(density) * n  # exact: no rounding in the product itself
    k = math.floor(exact)
    if math.ceil(exact) - exact <= _REL_TOL * exact:
        k = math.ceil(exact)
    return min(n, max(1, k))


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
