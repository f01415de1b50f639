"""FLoRA / SLoRA (Babakniya et al. 2023) two-stage helpers.

Stage 1 trains a full-rank update ``ΔW`` (FLoRA) or a fixed random subset of its entries
(SLoRA, ``slora_mask``). Stage 2 resets ``W`` to the pretrained weights and starts LoRA from
the truncated SVD of ``ΔW`` (``svd_init``), so the model keeps (the rank-r part of) what
Stage 1 learned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.comm.topk import num_kept

__all__ = ["slora_mask", "svd_init"]


def svd_init(
    delta_w: Tensor, rank: int, alpha: float, scaling: float | None = None
) -> tuple[Tensor, Tensor, float]:
    """LoRA factors whose scaled product is the rank-``rank`` truncation of ``delta_w``.

    ``ΔW ≈ U_r Σ_r V_rᵀ``; ``B = U_r Σ_r^{1/2} / sqrt(s)``, ``A = Σ_r^{1/2} V_rᵀ / sqrt(s)``
    with ``s = alpha / rank`` (or ``scaling`` if given, e.g. the server-rank convention), so
    ``s · B @ A == U_r Σ_r V_rᵀ``. Splitting ``Σ^{1/2}`` evenly keeps A and B on the same scale,
    which keeps their gradients balanced when training resumes.

    Returns ``(A, B, rel_err)`` with ``rel_err = ||ΔW - s·BA||_F / ||ΔW||_F`` (0 for ΔW = 0),
    computed from the discarded singular values. ``A`` and ``B`` have ``delta_w``'s dtype;
    the SVD runs in float64 for float64 input and in float32 otherwise (half types upcast).

    Note: components with a zero singular value get ``A[j] = 0`` and ``B[:, j] = 0``, and such
    a component receives no gradient; this only happens when ``rank(ΔW) < rank``.
    """
    if delta_w.dim() != 2:
        raise ValueError(f"delta_w must be 2-D (out x in), got shape {tuple(delta_w.shape)}")
    out_f, in_f = delta_w.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(
            f"rank must be in [1, {min(out_f, in_f)}] for a {out_f}x{in_f} ΔW, got {rank}"
        )
    s = alpha / rank if scaling is None else float(scaling)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"LoRA scaling must be finite and > 0, got {s}")
    if not torch.isfinite(delta_w).all():
        raise ValueError("delta_w contains NaN or inf")

    work = delta_w.detach()
    work = work.double() if work.dtype == torch.float64 else work.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    root = S[:rank].sqrt()
    inv_sqrt_s = 1.0 / math.sqrt(s)
    B = (U[:, :rank] * root) * inv_sqrt_s
    A = (root[:, None] * Vh[:rank]) * inv_sqrt_s

    total = float(S.double().square().sum())
    tail = float(S[rank:].double().square().sum())
    rel_err = math.sqrt(tail / total) if total > 0 else 0.0
    return A.to(delta_w.dtype).contiguous(), B.to(delta_w.dtype).contiguous(), rel_err


def slora_mask(
    shape: tuple[int, ...] | torch.Size, density: float, generator: torch.Generator
) -> Tensor:
    """SLoRA Stage-1 mask: a fixed random subset of exactly ``k`` entries (bool).

    ``k = max(1, floor(density · numel))``, the project's count rule (``comm.topk.num_kept``),
    so an SLoRA density means the same as a FLASC density.

    Drawn once per weight from the caller's seeded ``generator`` (its own stream) and kept
    for all of Stage 1: only these entries of ``W`` train and cross the wire.
    """
    numel = math.prod(int(d) for d in shape)
    if numel < 1:
        raise ValueError(f"cannot mask an empty shape {tuple(shape)}")
    if not math.isfinite(density):
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = num_kept(numel, density)
    idx = torch.randperm(numel, generator=generator, device=generator.device)[:k]
    mask = torch.zeros(numel, dtype=torch.bool, device=generator.device)
    mask[idx] = True
    return mask.reshape(tuple(shape))
