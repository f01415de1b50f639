"""Robust aggregation: pure functions over decoded client updates (docs/reliability.md).

Every function takes the cohort's decoded updates as dense 1-D tensors of one length: a
sparse upload is its dense decoding, so coordinates a client did not send are zeros and
take part in every statistic as zeros (a trimmed mean or median over a coordinate few
clients sent is pulled to 0; that is the honest reading of "this client proposes no change").

* :func:`norm_bound` rejects (or clips to the bound) updates whose l2 norm exceeds a bound,
  given absolutely or as a multiple of the cohort's median norm. It is a filter: any rule,
  the method's own included, then runs on what it kept.
* :func:`trimmed_mean` and :func:`coordinate_median` replace the mean coordinate by coordinate
  (Yin et al. 2018).
* :func:`krum` / multi-Krum (Blanchard et al. 2017, as Flower's ``Krum``) select the updates
  closest to their neighbours; the selected ones are then averaged (by the method's rule in
  the engine), so the selection composes with any aggregation.

What they defend against, and what not, is in docs/reliability.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["RobustOutcome", "coordinate_median", "krum", "krum_scores", "norm_bound",
           "robust_select", "trimmed_mean", "update_norms"]


def _stack(updates: Sequence[Tensor]) -> Tensor:
    _check_shapes(updates)
    return torch.stack(list(updates))


def _check_shapes(updates: Sequence[Tensor]) -> None:
    if not updates:
        raise ValueError("no updates to aggregate")
    shapes = {tuple(u.shape) for u in updates}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"updates must be 1-D tensors of one length, got shapes {shapes}")


def update_norms(updates: Sequence[Tensor]) -> list[float]:
    """The l2 norm of every update (float64 accumulation: no overflow below 1e308)."""
    return [float(torch.linalg.vector_norm(u.to(torch.float64))) for u in updates]


def norm_bound(updates: Sequence[Tensor], *, max_norm: float = math.inf,
               x_median: float | None = None, action: str = "reject",
               ) -> tuple[list[Tensor], list[int], dict[int, str]]:
    """Bound every update's l2 norm by ``min(max_norm, x_median * median norm)``.

    Returns (updates kept, possibly clipped; their indices; {index: reason} for the rest).
    ``action="clip"`` rescales an update above the bound onto it instead of rejecting it;
    an update whose norm is not finite is always rejected. The median is over the finite
    norms, so a minority of huge updates cannot move the bound much."""
    if action not in ("reject", "clip"):
        raise ValueError(f"action must be reject or clip, got {action!r}")
    norms = update_norms(updates)
    finite = sorted(x for x in norms if math.isfinite(x))
    bound = max_norm
    if x_median is not None and finite:
        mid = len(finite) // 2
        median = finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])
        bound = min(bound, x_median * median)
    kept, idx, rejected = [], [], {}
    for i, (u, norm) in enumerate(zip(updates, norms)):
        if not math.isfinite(norm):
            rejected[i] = f"update norm is {norm}"
        elif norm <= bound:
            kept.append(u)
            idx.append(i)
        elif action == "clip":
            kept.append(u * (bound / norm))
            idx.append(i)
        else:
            rejected[i] = f"update norm {norm:.4g} > bound {bound:.4g}"
    return kept, idx, rejected


def trimmed_mean(updates: Sequence[Tensor], trim: float) -> Tensor:
    """Coordinate-wise mean after dropping the ``floor(trim * m)`` lowest and highest values.

    ``trim`` in [0, 0.5); with m updates at least one value per coordinate always remains."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    x = _stack(updates)
    m = x.shape[0]
    cut = min(math.floor(trim * m), (m - 1) // 2)
    if cut:
        x = torch.sort(x, dim=0).values[cut : m - cut]
    return x.mean(0, dtype=torch.float64).to(updates[0].dtype)


def coordinate_median(updates: Sequence[Tensor]) -> Tensor:
    """Coordinate-wise median (the mean of the two middle values when m is even)."""
    x = torch.sort(_stack(updates), dim=0).values
    m = x.shape[0]
    mid = (x[(m - 1) // 2].double() + x[m // 2].double()) / 2
    return mid.to(updates[0].dtype)


def krum_scores(updates: Sequence[Tensor], byzantine: int) -> list[float]:
    """Krum score of each update: the sum of squared distances to its ``m - f - 2`` nearest
    other updates (at least 1), as in Blanchard et al. and Flower's Krum."""
    _check_shapes(updates)
    m = len(updates)
    if m == 1:
        return [0.0]
    d = torch.full((m, m), math.inf, dtype=torch.float64)
    for i in range(m):  # pairwise in float64: m(m-1)/2 passes over n, no m x n copy
        for j in range(i + 1, m):
            d[i, j] = d[j, i] = float(
                torch.linalg.vector_norm(updates[i].double() - updates[j].double())) ** 2
    closest = max(1, min(m - 1, m - byzantine - 2))
    return torch.sort(d, dim=1).values[:, :closest].sum(1).tolist()


def krum(updates: Sequence[Tensor], byzantine: int, keep: int = 1) -> list[int]:
    """Indices of the ``keep`` updates with the lowest Krum scores (ties: lowest index).
    keep = 1 is Krum; keep > 1 is multi-Krum (the caller averages the selection)."""
    scores = krum_scores(updates, byzantine)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[: max(1, min(keep, len(scores)))])


@dataclass
class RobustOutcome:
    """What a robust rule did to one cohort.

    ``updates`` / ``kept`` are what the method's own rule should average (indices into the
    input); ``aggregate`` is set instead when the rule itself produced the pseudo-gradient
    (trimmed mean, median). ``rejected`` maps input index -> reason."""

    updates: list[Tensor]
    kept: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    aggregate: Tensor | None = None


def robust_select(updates: Sequence[Tensor], *, rule: str = "mean", max_norm: float = math.inf,
                  x_median: float | None = None, norm_action: str = "reject",
                  trim: float = 0.1, byzantine: int = 1, keep: int | None = None,
                  ) -> RobustOutcome:
    """Norm bound first, then ``rule`` on what is left (see the module docstring).

    ``mean`` leaves the averaging to the caller; ``krum``/``multi_krum`` select and leave it
    too; ``trimmed_mean``/``median`` return the aggregate. An empty cohort, or one emptied by
    the bound, yields ``kept == []`` and no aggregate."""
    ups, idx, rejected = norm_bound(updates, max_norm=max_norm, x_median=x_median,
                                    action=norm_action)
    out = RobustOutcome(ups, idx, rejected)
    if not ups or rule == "mean":
        return out
    if rule in ("krum", "multi_krum"):
        m = len(ups)
        want = 1 if rule == "krum" else (keep if keep is not None else max(1, m - byzantine))
        chosen = krum(ups, byzantine, want)
        for j in range(m):
            if j not in chosen:
                out.rejected[idx[j]] = f"not selected by {rule} (f={byzantine})"
        out.updates = [ups[j] for j in chosen]
        out.kept = [idx[j] for j in chosen]
        return out
    if rule == "trimmed_mean":
        out.aggregate = trimmed_mean(ups, trim)
    elif rule == "median":
        out.aggregate = coordinate_median(ups)
    else:
        raise ValueError(f"unknown robust rule {rule!r}")
    return out
