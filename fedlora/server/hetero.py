"""Rank-heterogeneous LoRA aggregation rules (HetLoRA, replication padding, FLoRA stacking).

Every function here works on ONE LoRA pair at a time; the engine loops over layers.

Conventions (see ``docs/heterogeneity.md``):

* A LoRA pair for a weight ``W`` (out x in) is ``A`` (r x in) and ``B`` (out x r) with
  ``ΔW = s · B @ A``. The scaling ``s = alpha / r_s`` uses the *server* rank ``r_s`` and is
  the same for every client, so truncating to ``r_c`` components never rescales anything.
* A rank-``r_c`` client holds the first ``r_c`` rows of ``A`` and the first ``r_c``
  columns of ``B``; "component j" means row ``j`` of ``A`` together with column ``j`` of ``B``.
* Client weights ``p_k`` are non-negative and sum to 1 (``normalize_weights`` makes them).

The padding rules are linear in the client factors, so they apply equally to parameters and
to deltas (pseudo-gradients). They differ in what "not trained" means: for parameters pass the
previous server factors as the replication fallback; for deltas the natural fallback is zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fedlora.rng import STREAMS, np_rng

__all__ = [
    "TIER_STREAM_ID",
    "assign_tiers",
    "flasc_tier_density",
    "loss_based_ranks",
    "merge_delta",
    "normalize_weights",
    "padded_pseudo_gradient",
    "product_norms",
    "pruned_rank",
    "replication_pad",
    "self_prune_rank",
    "sparsity_weights",
    "stacked_numel",
    "stacking",
    "stacking_download_numel",
    "tail_norm",
    "tail_penalty",
    "tier_rank",
    "zero_pad",
]

#: Stream id of tier assignment (``fedlora.rng.STREAMS["tiers"]``): tiers are drawn from
#: ``default_rng([seed, TIER_STREAM_ID])`` and never share a stream with sampling, data order,
#: dropout or DP noise.
TIER_STREAM_ID = STREAMS["tiers"]

WeightsLike = Sequence[float] | Tensor | np.ndarray


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _rank_of(A: Tensor, B: Tensor, who: str = "") -> int:
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"{who}A and B must be 2-D, got A{tuple(A.shape)} B{tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{who}rank mismatch: A has {A.shape[0]} rows but B has {B.shape[1]} columns"
        )
    return int(A.shape[0])


def _check_clients(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> list[int]:
    """Ranks of the clients' pairs; all pairs must adapt the same (out x in) weight."""
    if len(As) == 0 or len(As) != len(Bs):
        raise ValueError(f"need the same non-zero number of A and B, got {len(As)} and {len(Bs)}")
    ranks = [_rank_of(A, B, f"client {k}: ") for k, (A, B) in enumerate(zip(As, Bs, strict=True))]
    in_f, out_f = As[0].shape[1], Bs[0].shape[0]
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        if A.shape[1] != in_f or B.shape[0] != out_f:
            raise ValueError(
                f"client {k}: shapes A{tuple(A.shape)} B{tuple(B.shape)} do not adapt the same "
                f"({out_f} x {in_f}) weight as client 0"
            )
    return ranks


def _check_weights(weights: WeightsLike, n: int) -> list[float]:
    """Weights as Python floats; they must be finite, non-negative and sum to 1.

    Requiring the sum to be 1 (rather than silently normalizing) keeps ``zero_pad`` and
    ``stacking`` from quietly scaling the update when a caller passes raw dataset sizes.
    """
    w = [float(x) for x in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} clients")
    for k, x in enumerate(w):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"weight of client {k} must be finite and >= 0, got {x}")
    total = math.fsum(w)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1 (got {total}); use normalize_weights()")
    return w


def normalize_weights(values: WeightsLike) -> list[float]:
    """``p_k = v_k / Σ v``: turns dataset sizes or norms into aggregation weights.

    All-zero input gives uniform weights (nothing distinguishes the clients then).
    """
    v = [float(x) for x in (values.tolist() if hasattr(values, "tolist") else values)]
    if not v:
        raise ValueError("no values to normalize")
    for k, x in enumerate(v):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"value of client {k} must be finite and >= 0, got {x}")
    total = math.fsum(v)
    if total == 0:
        return [1.0 / len(v)] * len(v)
    return [x / total for x in v]


# --------------------------------------------------------------------------------------------
# download / upload shapes
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# padding-based aggregation (HetLoRA / Byun & Lee 2024)
# --------------------------------------------------------------------------------------------


def padded_pseudo_gradient(rule: str, updates: Sequence[Tensor], masks: Sequence[Tensor],
                           weights: Sequence[float], P: Tensor) -> Tensor:
    """The padding rules on flat vectors, as the pseudo-gradient HetLoRA steps with.

    ``updates[k]`` is client k's decoded delta (zero outside ``masks[k]``, the entries its
    rank trained), ``weights`` are unnormalized ``p_k``. ``zero_pad``: an untrained entry
    counts as the client voting for 0, i.e. its delta is ``P`` there, so with FedAvg at lr 1
    the new P is ``Σ_k p_k pad0(P'_k)``. ``replication_pad``: an entry is averaged over the
    clients that trained it; an entry nobody trained gets 0 (keeps its server value). Any
    server optimizer applies to the result. The per-layer rules below are this function on
    one layer.
    """
    g = torch.zeros_like(P)
    if rule == "replication_pad":
        cover = torch.zeros_like(P)
        for u, m, w in zip(updates, masks, weights):
            g.add_(u, alpha=w)
            cover.add_(m.to(P.dtype), alpha=w)
        return torch.where(cover > 0, g / cover.clamp_min(1e-30), torch.zeros_like(g))
    if rule != "zero_pad":
        raise ValueError(f"unknown padding rule {rule!r}")
    total = sum(weights)
    for u, m, w in zip(updates, masks, weights):  # the untrained share pulls toward 0
        g.add_(u, alpha=w / total)
        g.add_(P * (~m), alpha=w / total)
    return g


def _layer_rule(rule: str, As: Sequence[Tensor], Bs: Sequence[Tensor], weights: WeightsLike,
                r_s: int) -> tuple[Tensor, Tensor, Tensor]:
    """One layer through `padded_pseudo_gradient` on parameters (P = 0, delta = -client):
    the padded (A, B) and which of their entries any client trained."""
    ranks = _check_clients(As, Bs)
    w = _check_weights(weights, len(As))
    if max(ranks) > r_s:
        raise ValueError(f"a client has rank {max(ranks)} > server rank {r_s}")
    in_f, out_f = As[0].shape[1], Bs[0].shape[0]
    na = r_s * in_f
    xs, masks = [], []
    for A_k, B_k, r_k in zip(As, Bs, ranks, strict=True):
        x = A_k.new_zeros(na + out_f * r_s)
        m = torch.zeros(na + out_f * r_s, dtype=torch.bool)
        x[:na].view(r_s, in_f)[:r_k] = A_k
        x[na:].view(out_f, r_s)[:, :r_k] = B_k
        m[:na].view(r_s, in_f)[:r_k] = True
        m[na:].view(out_f, r_s)[:, :r_k] = True
        xs.append(-x)
        masks.append(m)
    flat = -padded_pseudo_gradient(rule, xs, masks, w, xs[0].new_zeros(xs[0].shape))
    trained = torch.stack(masks).any(0)
    return (flat[:na].view(r_s, in_f), flat[na:].view(out_f, r_s),
            trained)


def zero_pad(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: WeightsLike, r_s: int
) -> tuple[Tensor, Tensor]:
    """HetLoRA zero-padding: ``A = Σ_k p_k pad0(A_k)``, ``B = Σ_k p_k pad0(B_k)``.

    Component ``j`` is scaled down by ``Σ_{k: r_k > j} p_k``: clients with ``r_k <= j``
    vote zero for it. This dilution is what replication padding removes.
    """
    A, B, _ = _layer_rule("zero_pad", As, Bs, weights, r_s)
    return A, B


def replication_pad(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: WeightsLike,
    r_s: int,
    prev_A: Tensor | None = None,
    prev_B: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Replication padding (Byun & Lee 2024): average component ``j`` over its trainers only.

    ``A[j] = Σ_{k: r_k > j} p_k A_k[j] / Σ_{k: r_k > j} p_k`` (same for column ``j`` of ``B``).
    Equivalent to each low-rank client copying, for the components it did not train, the
    weighted average of the clients that did. A component no client trained this round keeps
    ``prev_A[j]`` / ``prev_B[:, j]`` (the previous server value when aggregating parameters);
    left as ``None`` it is zero, which is the right fallback when aggregating deltas.
    """
    A, B, trained = _layer_rule("replication_pad", As, Bs, weights, r_s)
    na = A.numel()
    for prev, out, t, name in ((prev_A, A, trained[:na].view(A.shape), "prev_A"),
                               (prev_B, B, trained[na:].view(B.shape), "prev_B")):
        if prev is None:
            continue
        if tuple(prev.shape) != tuple(out.shape):
            raise ValueError(f"{name} must have shape {tuple(out.shape)}, "
                             f"got {tuple(prev.shape)}")
        out[~t] = prev.detach().to(out.dtype)[~t]
    return A, B


def product_norms(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scaling: float | Sequence[float] = 1.0
) -> Tensor:
    """``||s_k B_k A_k||_F`` per client (one layer). For a whole-model HetLoRA weight,
    combine layers as ``sqrt(Σ_layers norms²)`` (HetLoRA does) and normalize."""
    _check_clients(As, Bs)
    s = [float(scaling)] * len(As) if isinstance(scaling, (int, float)) else list(scaling)
    if len(s) != len(As):
        raise ValueError(f"got {len(s)} scalings for {len(As)} clients")
    return torch.stack([torch.linalg.matrix_norm(s_k * (B_k @ A_k))
                        for A_k, B_k, s_k in zip(As, Bs, s, strict=True)])


def sparsity_weights(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scaling: float | Sequence[float] = 1.0,
    prior: WeightsLike | None = None,
) -> list[float]:
    """HetLoRA sparsity-weighted aggregation: ``p_k ∝ ||s B_k A_k||_F``, normalized.

    Clients whose update is larger (less "sparse") count more. Zero-padding does not change
    ``B_k A_k``, so the weights are the same before or after padding and work with either
    padding rule. With the common scaling ``alpha / r_s`` the scaling cancels. ``prior``
    (e.g. dataset sizes) optionally multiplies the norms before normalizing; HetLoRA itself
    uses norms only. All-zero norms give uniform (or prior) weights.
    """
    norms = product_norms(As, Bs, scaling).tolist()
    if prior is not None:
        pr = [float(x) for x in (prior.tolist() if hasattr(prior, "tolist") else prior)]
        if len(pr) != len(norms):
            raise ValueError(f"got {len(pr)} prior weights for {len(norms)} clients")
        if math.fsum(norms) == 0:
            return normalize_weights(pr)
        norms = [n * p for n, p in zip(norms, pr, strict=True)]
    return normalize_weights(norms)


# --------------------------------------------------------------------------------------------
# stacking (FLoRA, Wang et al. 2024)
# --------------------------------------------------------------------------------------------


def stacking(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: WeightsLike
) -> tuple[Tensor, Tensor]:
    """FLoRA stacking: ``A_stack = [p_1 A_1; ...; p_N A_N]``, ``B_stack = [B_1 ... B_N]``.

    ``B_stack @ A_stack == Σ_k p_k B_k A_k`` exactly (it is the same sum, written as one
    matrix product), unlike averaging A and B separately. Ranks may differ; the stacked rank
    is ``Σ_k r_k``.
    """
    _check_clients(As, Bs)
    w = _check_weights(weights, len(As))
    A_stack = torch.cat([p_k * A_k for A_k, p_k in zip(As, w, strict=True)], dim=0)
    B_stack = torch.cat(list(Bs), dim=1)
    return A_stack, B_stack


def merge_delta(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: WeightsLike,
    scaling: float | Sequence[float],
) -> Tensor:
    """The round's update to merge into ``W``: ``ΔW = Σ_k s_k p_k B_k A_k`` (out x in).

    After adding it to ``W`` the caller re-initializes the LoRA pair (A from its seeded
    stream, B = 0) so the next round starts from ``ΔW = 0``. ``scaling`` may be per client.
    """
    s = [float(scaling)] * len(As) if isinstance(scaling, (int, float)) else list(scaling)
    if len(s) != len(As):
        raise ValueError(f"got {len(s)} scalings for {len(As)} clients")
    A_stack, B_stack = stacking(As, Bs, weights)
    if len(set(s)) == 1:
        return s[0] * (B_stack @ A_stack)
    row_scale = torch.cat(
        [A_stack.new_full((A_k.shape[0], 1), s_k) for A_k, s_k in zip(As, s, strict=True)], dim=0
    )
    return B_stack @ (row_scale * A_stack)


def stacked_numel(out_features: int, in_features: int, ranks: Sequence[int]) -> int:
    """Elements of the stacked factors: ``Σ_k r_k · (out + in)``."""
    return sum(int(r) for r in ranks) * (out_features + in_features)


def stacking_download_numel(out_features: int, in_features: int, ranks: Sequence[int]) -> int:
    """Per-layer download after a stacking round: the smaller of ``ΔW`` and the stacked factors.

    The server can send either the merged update (``out · in`` elements, dense) or the stacked
    factors (``Σ r_k · (out + in)``) from which the client forms ``B_stack @ A_stack`` itself;
    a sensible implementation sends whichever is smaller. This covers one round for a client
    that is in sync; a client that missed rounds needs every missed update (or their dense
    sum, ``out · in``). Positions are implicit (both forms are dense).
    """
    return min(out_features * in_features, stacked_numel(out_features, in_features, ranks))


# --------------------------------------------------------------------------------------------
# HetLoRA local rank self-pruning (optional; the FLASC comparison uses gamma=1, lambda=0)
# --------------------------------------------------------------------------------------------


def pruned_rank(r_c: int, gamma: float, r_min: int = 1) -> int:
    """The rank a shrink by ``gamma`` leaves: ``max(r_min, floor(gamma · r_c))``.

    ``r_min`` is the lowest tier's rank (1 for ``r_base ** 0``): a client never prunes below
    what the weakest tier trains. A client already at or below ``r_min`` keeps its rank.
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if r_min < 1:
        raise ValueError(f"r_min must be >= 1, got {r_min}")
    if r_c <= r_min:
        return r_c
    return max(r_min, math.floor(gamma * r_c))


def tail_norm(A: Tensor, B: Tensor, r_c: int, gamma: float, r_min: int = 1) -> Tensor:
    """``||B[:, r':r_c]||_F · ||A[r':r_c]||_F`` with ``r' = pruned_rank(r_c, gamma, r_min)``.

    The "tail" is the components that a shrink by ``gamma`` would remove. Empty (0) when
    ``r' = r_c``, e.g. for ``gamma = 1``. Differentiable (used as the penalty); its gradient
    is 0 where a factor is 0 (torch's norm backward masks 0/0), e.g. while ``B = 0``.
    """
    if not 1 <= r_c <= min(A.shape[0], B.shape[1]):
        raise ValueError(f"r_c must be in [1, {min(A.shape[0], B.shape[1])}], got {r_c}")
    r_new = pruned_rank(r_c, gamma, r_min)
    return torch.linalg.vector_norm(B[:, r_new:r_c]) * torch.linalg.vector_norm(A[r_new:r_c])


def tail_penalty(A: Tensor, B: Tensor, r_c: int, lam: float, gamma: float,
                 r_min: int = 1) -> Tensor:
    """HetLoRA local regularizer ``lam · tail_norm``: pushes the tail components to zero.

    Added to the client's local loss so that, if the data does not need them, the last
    components shrink and can be pruned. ``lam = 0`` (the default setting) disables it.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return lam * tail_norm(A, B, r_c, gamma, r_min)


def self_prune_rank(A: Tensor, B: Tensor, r_c: int, gamma: float, threshold: float,
                    r_min: int = 1) -> int:
    """New local rank after training: ``pruned_rank(r_c, gamma, r_min)`` if the tail is small.

    "Small" means ``tail_norm < threshold``. To follow HetLoRA's rule (prune when the tail
    norm went down during the round), pass the tail norm measured at the start of the round
    as ``threshold``. ``gamma = 1`` never prunes. One layer; the method sums the layers.
    """
    r_new = pruned_rank(r_c, gamma, r_min)
    if r_new == r_c:
        return r_c
    with torch.no_grad():
        small = float(tail_norm(A.detach(), B.detach(), r_c, gamma, r_min)) < threshold
    return r_new if small else r_c


# --------------------------------------------------------------------------------------------
# budget tiers (FLASC paper Sec. 4.4) and loss-based rank allocation
# --------------------------------------------------------------------------------------------


def assign_tiers(num_clients: int, tiers: int, seed: int) -> np.ndarray:
    """Tier ``b_c`` uniform in ``{1..tiers}`` per client, from its own seeded stream.

    The stream is ``default_rng([seed, TIER_STREAM_ID])`` and is created here, so the tiers
    depend only on ``(num_clients, tiers, seed)``: not on the method, the density, or any
    other random draw made before.
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    if tiers < 1:
        raise ValueError(f"tiers must be >= 1, got {tiers}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np_rng(seed, "tiers")  # == np.random.default_rng([seed, TIER_STREAM_ID])
    return rng.integers(1, tiers + 1, size=num_clients, dtype=np.int64)


def tier_rank(tier: int, r_base: int) -> int:
    """HetLoRA rank of a tier: ``r_base ** (tier - 1)`` (tier 1 -> rank 1)."""
    if tier < 1 or r_base < 1:
        raise ValueError(f"need tier >= 1 and r_base >= 1, got tier={tier}, r_base={r_base}")
    return int(r_base) ** (int(tier) - 1)


def flasc_tier_density(tier: int, tiers: int, r_base: int) -> float:
    """FLASC upload density of a tier: ``r_c / r_s = r_base ** (tier - tiers)``.

    FLASC trains the full rank ``r_s = tier_rank(tiers)`` and matches the tier's upload
    budget with this density.
    """
    if not 1 <= tier <= tiers:
        raise ValueError(f"tier must be in [1, {tiers}], got {tier}")
    return tier_rank(tier, r_base) / tier_rank(tiers, r_base)


def loss_based_ranks(
    losses: Sequence[float] | np.ndarray,
    ranks_available: Sequence[int],
    tiebreak: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Give the highest ranks to the clients with the lowest local loss.

    ``ranks_available`` is the multiset of ranks to hand out (one per client), so the total
    bandwidth budget is unchanged; only who gets which rank changes. A loss of ``+inf`` means
    "unknown" (a client that never reported one) and ranks after every known loss. Ties,
    unknowns included, go to the larger ``tiebreak`` value (e.g. the client's tier rank, so
    a cohort with no known losses gets exactly its tier ranks), then to the lower client
    index (stable sort). Returns ``ranks[k]`` for client ``k``.
    """
    loss = np.asarray(losses, dtype=np.float64)
    avail = np.asarray(ranks_available, dtype=np.int64)
    if loss.ndim != 1 or avail.ndim != 1 or loss.shape != avail.shape:
        raise ValueError(f"need one rank per client: {loss.shape} losses, {avail.shape} ranks")
    bad = np.isnan(loss) | (loss == -np.inf)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"loss of client {k} must be a number or +inf (unknown), got {loss[k]}")
    if tiebreak is None:
        order = np.argsort(loss, kind="stable")  # lowest loss first
    else:
        tb = np.asarray(tiebreak, dtype=np.float64)
        if tb.shape != loss.shape:
            raise ValueError(f"need one tiebreak per client: {tb.shape} for {loss.shape}")
        order = np.lexsort((np.arange(len(loss)), -tb, loss))  # last key is the primary one
    out = np.empty_like(avail)
    out[order] = np.sort(avail, kind="stable")[::-1]  # highest rank first
    return out
