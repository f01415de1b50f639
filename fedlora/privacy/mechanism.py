"""Server-side Gaussian mechanism for DP-FedAdam (user-level DP).

The server receives the decoded (already sparsified) client updates and turns them into one
pseudo-gradient for the server optimizer::

    Delta = ( sum_i w_i * clip(u_i, C)  +  N(0, (sigma * C * m / M)^2 I) ) / m

* ``C`` -- ``clip_norm``: every update is scaled to l2 norm <= C, so one client moves the sum
  by at most C (add/remove-one) or 2C (replace-one); that bound is what the accountant uses.
* ``sigma`` -- ``noise_multiplier``; ``m`` -- ``cohort_size``, the denominator; ``M`` --
  ``noise_cohort_size`` (defaults to ``m``).
* The noise std is therefore ``sigma*C*m/M`` on the sum and ``sigma*C/M`` on the mean. With
  ``M == m`` this is the textbook ``N(0, sigma^2 C^2)`` on the sum. With ``M > m`` it is the
  paper's cohort simulation (Appendix A): the mean carries exactly the noise that a real cohort
  of M clients would carry, so the accuracy is a lower bound for a real M-client run, while the
  model actually trained is *less* private than the epsilon computed for M (see accounting).

The noise is added to every coordinate, so the aggregate is dense even when every upload was
sparse. ``m`` must be the configured cohort size (for Poisson sampling the *expected* size
q*N), never ``len(updates)``: dividing by the realized size makes the output depend on how many
clients were sampled, which the add/remove analysis does not cover.

Non-private path: ``privatize`` sums with :func:`sequential_sum` -- ``zeros_like`` then
``add_`` each update in list order (``add_(u, alpha=w)`` with weights), then one ``div_(m)``.
That is the arithmetic of ``fedlora.server.aggregate.weighted_mean(updates)``, so with
``sigma = 0, C = inf`` and ``m == len(updates)`` the two are bit-identical (``mean_update``
is the same thing here). ``torch.stack(us).sum(0)`` is *not* equivalent: torch reduces the
stacked dim in another order (CPU, torch 2.13: results differ from 5 updates on), so never
use it for either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["clip", "mean_update", "privatize", "sequential_sum"]


def sequential_sum(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """``zeros`` then ``add_`` each tensor in list order (``add_(t, alpha=w)`` with weights).

    A fixed, documented order makes the private and non-private paths bit-identical (it is the
    arithmetic of ``fedlora.server.aggregate.weighted_mean``) and deterministic on every
    device; the inputs are not modified.
    """
    if len(tensors) == 0:
        raise ValueError("updates: need at least one update to aggregate")
    total = torch.zeros_like(tensors[0])
    if weights is None:
        for t in tensors:
            total.add_(t)
    else:
        for t, w in zip(tensors, weights, strict=True):
            total.add_(t, alpha=float(w))
    return total


def mean_update(updates: Sequence[Tensor], cohort_size: float) -> Tensor:
    """Non-private aggregate ``sequential_sum(updates) / cohort_size``.

    The engine should use this for its non-private path: it equals ``privatize`` with
    ``noise_multiplier=0, clip_norm=inf`` exactly (``torch.equal``).
    """
    _check_positive("cohort_size", cohort_size)
    return sequential_sum(updates).div_(cohort_size)


def clip(update: Tensor, clip_norm: float) -> tuple[Tensor, float]:
    """Scale ``update`` to l2 norm at most ``clip_norm``; return it and its original norm.

    The norm is computed in float64 so the clipped norm is <= C up to one rounding of the
    scaling. An update already inside the ball (always, for ``clip_norm = inf``) is returned
    as is -- the same tensor object, no copy -- so the non-private path stays bit-exact.
    """
    if not clip_norm > 0:  # also rejects NaN
        raise ValueError(f"clip_norm must be > 0 (inf disables clipping), got {clip_norm}")
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
    if not math.isfinite(norm):
        raise ValueError(f"update has a non-finite l2 norm ({norm}); cannot clip it")
    if norm <= clip_norm:
        return update, norm
    return update * (clip_norm / norm), norm


def privatize(
    updates: Sequence[Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    cohort_size: float,
    noise_cohort_size: float | None = None,
    weights: Sequence[float] | None = None,
    template: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clip each update, sum in list order, add dense Gaussian noise, divide by ``cohort_size``.

    Args:
        updates: decoded client updates, dense tensors of one shape, dtype and device.
        clip_norm: l2 bound C per client; ``inf`` disables clipping (then sigma must be 0).
        noise_multiplier: sigma; the noise on the sum has std ``sigma*C*m/M``.
        generator: the DP-noise stream, on the updates' device. Exactly one ``torch.randn`` of
            the update's shape is drawn from it per call (none when sigma = 0), so the noise
            depends only on this generator's state, never on the updates or other streams.
        cohort_size: m, the denominator: the configured cohort size (for Poisson sampling the
            expected size q*N), not the realized number of updates.
        noise_cohort_size: M >= m, the simulated cohort the noise is calibrated for
            (default m: no simulation).
        weights: optional per-client factors in [0, 1] applied after clipping, so each client
            still moves the sum by at most C; the denominator stays m (fixed-denominator
            estimator).
        template: a tensor with the aggregate's shape, dtype and device. Needed only when no
            update arrived: Poisson sampling can pick nobody, and that round must still
            release noise/m (skipping it would reveal the empty cohort).

    Returns:
        The privatized mean and a report with ``norms`` (pre-clipping l2 norms, list order),
        ``clipped_fraction``, ``noise_std_sum`` (sigma*C*m/M), ``noise_std`` (sigma*C/M, the
        std per coordinate of the returned mean), ``cohort_size``, ``noise_cohort_size`` and
        ``num_updates``.
    """
    if len(updates) == 0 and template is None:
        raise ValueError("updates: empty; pass template= to privatize an empty cohort")
    _check_positive("cohort_size", cohort_size)
    if noise_cohort_size is None:
        noise_cohort_size = cohort_size
    _check_positive("noise_cohort_size", noise_cohort_size)
    if noise_cohort_size < cohort_size:
        raise ValueError(
            f"noise_cohort_size ({noise_cohort_size}) must be >= cohort_size ({cohort_size}):"
            " the simulated noise cohort is the larger one"
        )
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (inf disables clipping), got {clip_norm}")
    if noise_multiplier > 0 and math.isinf(clip_norm):
        raise ValueError(
            "clip_norm must be finite when noise_multiplier > 0: the noise std is sigma*C"
        )
    if weights is not None:
        if len(weights) != len(updates):
            raise ValueError(f"weights: got {len(weights)} weights for {len(updates)} updates")
        for i, w in enumerate(weights):
            if not 0.0 <= w <= 1.0:
                raise ValueError(
                    f"weights[{i}] = {w} is outside [0, 1]; it would raise the"
                    " sensitivity above clip_norm"
                )
    ref, ref_name = (template, "template") if template is not None else (updates[0], "updates[0]")
    for i, u in enumerate(updates):
        if u.layout != torch.strided:
            raise ValueError(f"updates[{i}] is {u.layout}; decode it to a dense tensor first")
        if u.shape != ref.shape or u.dtype != ref.dtype or u.device != ref.device:
            raise ValueError(
                f"updates[{i}] has shape/dtype/device {tuple(u.shape)}/{u.dtype}/{u.device},"
                f" expected {tuple(ref.shape)}/{ref.dtype}/{ref.device} like {ref_name}"
            )

    clipped, norms = [], []
    for i, u in enumerate(updates):
        try:
            c, n = clip(u, clip_norm)
        except ValueError as err:
            raise ValueError(f"updates[{i}]: {err}") from None
        clipped.append(c)
        norms.append(n)

    total = sequential_sum(clipped, weights) if clipped else torch.zeros_like(ref)
    noise_std_sum = (
        noise_multiplier * clip_norm * cohort_size / noise_cohort_size if noise_multiplier else 0.0
    )
    if noise_multiplier > 0:
        if torch.device(generator.device) != total.device:
            raise ValueError(
                f"generator is on {generator.device} but the updates are on {total.device};"
                " create the DP-noise generator on the updates' device"
            )
        noise = torch.randn(
            total.shape, generator=generator, dtype=total.dtype, device=total.device
        )
        total.add_(noise, alpha=noise_std_sum)
    total.div_(cohort_size)

    info = {
        "norms": norms,
        "clipped_fraction": sum(n > clip_norm for n in norms) / max(len(norms), 1),
        "noise_std_sum": noise_std_sum,
        "noise_std": noise_std_sum / cohort_size,
        "cohort_size": cohort_size,
        "noise_cohort_size": noise_cohort_size,
        "num_updates": len(updates),
    }
    return total, info


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
