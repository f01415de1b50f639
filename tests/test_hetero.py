"""Rank-heterogeneous aggregation rules (fedlora.server.hetero) and FLoRA/SLoRA init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.comm.topk import num_kept
from fedlora.rng import np_rng
from fedlora.server import hetero
from fedlora.server.svd_init import slora_mask, svd_init

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def rand_clients(ranks, out_f=5, in_f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, in_f, generator=g, dtype=F64) for r in ranks]
    Bs = [torch.randn(out_f, r, generator=g, dtype=F64) for r in ranks]
    return As, Bs


# Hand case shared by the padding tests: r_s = 2; client 0 has rank 2, clients 1-2 rank 1.
HAND_As = [t([[1, 2], [3, 4]]), t([[5, 6]]), t([[-1, 0]])]
HAND_Bs = [t([[1, 0], [0, 1]]), t([[2], [4]]), t([[0], [8]])]
HAND_W = [0.5, 0.25, 0.25]


# ------------------------------------------------------------------ truncation (rank masks)


def test_rank_mask_is_the_first_components_and_keeps_server_scaling(tiny_lora_adapter):
    """What a rank-r_c client trains and sends: rows < r_c of A, columns < r_c of B, the
    rest (head) whole; the scaling stays alpha / r_s, so the kept components are exactly
    the server's first r_c (no rescaling)."""
    from fedlora.model.layers import lora_layers, rank_mask, view

    adapter = tiny_lora_adapter
    mask = rank_mask(adapter, 2)
    layers = lora_layers(adapter)
    assert layers
    for ly in layers:
        A, B = view(mask, ly.A), view(mask, ly.B)
        assert A[:2].all() and not A[2:].any() and B[:, :2].all() and not B[:, 2:].any()
    lora = torch.zeros(adapter.n, dtype=torch.bool)
    for ly in layers:
        lora[ly.A.slice] = lora[ly.B.slice] = True
    assert mask[~lora].all()  # the head is always whole
    P = torch.randn(adapter.n, generator=torch.Generator().manual_seed(0))
    for ly in layers:  # s * B[:, :2] @ A[:2] == the server's first two components
        A, B = view(P, ly.A), view(P, ly.B)
        kept = view(P * mask, ly.B) @ view(P * mask, ly.A)
        assert torch.allclose(kept, B[:, :2] @ A[:2], atol=1e-6)


# ------------------------------------------------------------------ zero / replication padding


def test_zero_pad_hand_case_dilutes_component():
    A, B = hetero.zero_pad(HAND_As, HAND_Bs, HAND_W, r_s=2)
    # row 0: .5*[1,2] + .25*[5,6] + .25*[-1,0]; row 1: only client 0 -> .5*[3,4]
    assert torch.allclose(A, t([[1.5, 2.5], [1.5, 2.0]]), atol=1e-15)
    # col 0: .5*[1,0] + .25*[2,4] + .25*[0,8]; col 1: .5*[0,1]
    assert torch.allclose(B, t([[1.0, 0.0], [3.0, 0.5]]), atol=1e-15)


def test_replication_pad_hand_case_averages_trainers_only():
    A, B = hetero.replication_pad(HAND_As, HAND_Bs, HAND_W, r_s=2)
    # row 0 is trained by everyone (same as zero padding); row 1 only by client 0 -> its value
    assert torch.allclose(A, t([[1.5, 2.5], [3.0, 4.0]]), atol=1e-15)
    assert torch.allclose(B, t([[1.0, 0.0], [3.0, 1.0]]), atol=1e-15)


def test_zero_pad_dilution_equals_trainer_weight():
    ranks, r_s = [1, 2, 4, 4, 3], 4
    As, Bs = rand_clients(ranks)
    w = hetero.normalize_weights([3, 1, 2, 5, 4])
    Az, Bz = hetero.zero_pad(As, Bs, w, r_s)
    Ar, Br = hetero.replication_pad(As, Bs, w, r_s)
    for j in range(r_s):
        mass = sum(p for p, r in zip(w, ranks, strict=True) if r > j)
        assert torch.allclose(Az[j], mass * Ar[j], atol=1e-12)
        assert torch.allclose(Bz[:, j], mass * Br[:, j], atol=1e-12)
        expect = sum(p * A[j] for p, A, r in zip(w, As, ranks, strict=True) if r > j) / mass
        assert torch.allclose(Ar[j], expect, atol=1e-12)


def test_replication_fallback_for_untrained_component():
    As, Bs = rand_clients([1, 2])
    prev_A = torch.arange(12, dtype=F64).reshape(3, 4)
    prev_B = -torch.arange(15, dtype=F64).reshape(5, 3)
    A, B = hetero.replication_pad(As, Bs, [0.5, 0.5], 3, prev_A=prev_A, prev_B=prev_B)
    assert torch.equal(A[2], prev_A[2]) and torch.equal(B[:, 2], prev_B[:, 2])
    assert torch.equal(A[1], As[1][1]) and torch.equal(B[:, 1], Bs[1][:, 1])
    A0, B0 = hetero.replication_pad(As, Bs, [0.5, 0.5], 3)  # no fallback: zero (delta use)
    assert torch.equal(A0[2], torch.zeros(4, dtype=F64))
    assert torch.equal(B0[:, 2], torch.zeros(5, dtype=F64))
    prev_A_before = prev_A.clone()
    A[2] += 1
    assert torch.equal(prev_A, prev_A_before)  # fallback is copied, not aliased


def test_replication_on_params_equals_on_deltas():
    """Linear rule: aggregating parameters (fallback prev) == prev - aggregated deltas."""
    r_s, ranks = 4, [1, 3, 2]
    g = torch.Generator().manual_seed(1)
    prev_A = torch.randn(r_s, 4, generator=g, dtype=F64)
    prev_B = torch.randn(5, r_s, generator=g, dtype=F64)
    dA, dB = rand_clients(ranks, seed=2)
    As = [prev_A[:r] - d for r, d in zip(ranks, dA, strict=True)]
    Bs = [prev_B[:, :r] - d for r, d in zip(ranks, dB, strict=True)]
    w = [0.2, 0.3, 0.5]
    A, B = hetero.replication_pad(As, Bs, w, r_s, prev_A=prev_A, prev_B=prev_B)
    gA, gB = hetero.replication_pad(dA, dB, w, r_s)
    assert torch.allclose(A, prev_A - gA, atol=1e-12)
    assert torch.allclose(B, prev_B - gB, atol=1e-12)


def test_replication_all_full_rank_equals_zero_pad():
    As, Bs = rand_clients([3, 3, 3, 3])
    w = hetero.normalize_weights([1, 2, 3, 4])
    Az, Bz = hetero.zero_pad(As, Bs, w, 3)
    Ar, Br = hetero.replication_pad(As, Bs, w, 3)
    assert torch.allclose(Az, Ar, atol=1e-14) and torch.allclose(Bz, Br, atol=1e-14)


def test_weights_must_sum_to_one_and_shapes_checked():
    As, Bs = rand_clients([1, 2])
    with pytest.raises(ValueError, match="sum to 1"):
        hetero.zero_pad(As, Bs, [10, 20], 2)
    with pytest.raises(ValueError, match=">= 0"):
        hetero.replication_pad(As, Bs, [1.5, -0.5], 2)
    with pytest.raises(ValueError, match="server rank"):
        hetero.zero_pad(As, Bs, [0.5, 0.5], 1)
    with pytest.raises(ValueError, match="client 1"):
        hetero.stacking([As[0], As[1][:, :3]], Bs, [0.5, 0.5])
    assert hetero.normalize_weights([1, 3]) == [0.25, 0.75]
    assert hetero.normalize_weights([0, 0]) == [0.5, 0.5]


# ------------------------------------------------------------------ sparsity weights


def test_sparsity_weights_hand_case():
    As = [t([[1, 0]]), t([[0, 1]]), t([[3, 0], [0, 4]])]
    Bs = [t([[3], [0]]), t([[0], [4]]), t([[1, 0], [0, 1]])]
    # ||B_k A_k||_F = 3, 4, 5 -> weights 3/12, 4/12, 5/12; a common scaling cancels
    assert torch.allclose(hetero.product_norms(As, Bs), t([3, 4, 5]), atol=1e-14)
    for s in (1.0, 0.125):
        w = hetero.sparsity_weights(As, Bs, s)
        assert w == pytest.approx([0.25, 1 / 3, 5 / 12], abs=1e-14)
    assert torch.allclose(hetero.product_norms(As, Bs, 2.0), t([6, 8, 10]), atol=1e-14)
    # prior (e.g. dataset sizes) multiplies the norms
    assert hetero.sparsity_weights(As, Bs, prior=[4, 3, 0]) == pytest.approx([0.5, 0.5, 0.0])


def test_sparsity_weights_match_frobenius_norms():
    ranks = [1, 4, 2, 3]
    As, Bs = rand_clients(ranks, out_f=7, in_f=6, seed=3)
    norms = [torch.linalg.matrix_norm(B @ A).item() for A, B in zip(As, Bs, strict=True)]
    got = hetero.sparsity_weights(As, Bs, 0.5)
    assert got == pytest.approx([n / sum(norms) for n in norms], rel=1e-12)
    # padding does not change the weights
    padded = []
    for A, B in zip(As, Bs, strict=True):
        Ap, Bp = A.new_zeros(4, A.shape[1]), B.new_zeros(B.shape[0], 4)
        Ap[: A.shape[0]], Bp[:, : B.shape[1]] = A, B
        padded.append((Ap, Bp))
    got_p = hetero.sparsity_weights([a for a, _ in padded], [b for _, b in padded], 0.5)
    assert got_p == pytest.approx(got, rel=1e-12)
    assert hetero.sparsity_weights([torch.zeros(1, 2)] * 2, [torch.zeros(3, 1)] * 2) == [0.5, 0.5]


# ------------------------------------------------------------------ stacking


def test_separate_averaging_is_not_product_averaging_but_stacking_is():
    As, Bs, w = [t([[1, 0]]), t([[0, 1]])], [t([[1], [0]]), t([[0], [1]])], [0.5, 0.5]
    exact = t([[0.5, 0.0], [0.0, 0.5]])  # Σ p_k B_k A_k
    Az, Bz = hetero.zero_pad(As, Bs, w, 1)  # plain FedAvg of A and B
    assert torch.equal(Bz @ Az, t([[0.25, 0.25], [0.25, 0.25]]))
    A_s, B_s = hetero.stacking(As, Bs, w)
    assert torch.equal(A_s, t([[0.5, 0.0], [0.0, 0.5]])) and torch.equal(B_s, t([[1, 0], [0, 1]]))
    assert torch.equal(B_s @ A_s, exact)


def test_stacking_product_is_exact_weighted_sum():
    ranks = [1, 4, 2, 8, 3]
    As, Bs = rand_clients(ranks, out_f=9, in_f=7, seed=4)
    w = hetero.normalize_weights([5, 1, 2, 7, 3])
    A_s, B_s = hetero.stacking(As, Bs, w)
    assert A_s.shape == (sum(ranks), 7) and B_s.shape == (9, sum(ranks))
    expect = sum(p * B @ A for p, A, B in zip(w, As, Bs, strict=True))
    assert torch.allclose(B_s @ A_s, expect, rtol=0, atol=1e-12)
    dw = hetero.merge_delta(As, Bs, w, 0.25)
    assert torch.allclose(dw, 0.25 * expect, rtol=0, atol=1e-12)
    s = [0.5, 1.0, 2.0, 0.25, 4.0]
    dw_k = hetero.merge_delta(As, Bs, w, s)
    expect_k = sum(sk * p * B @ A for sk, p, A, B in zip(s, w, As, Bs, strict=True))
    assert torch.allclose(dw_k, expect_k, rtol=0, atol=1e-12)


def test_stacking_download_accounting():
    # GPT-2 attention projection 768x768, 10 clients of rank 16: stacked factors are smaller
    assert hetero.stacked_numel(768, 768, [16] * 10) == 160 * 1536
    assert hetero.stacking_download_numel(768, 768, [16] * 10) == 245_760
    # enough total rank and the dense merged update is smaller
    assert hetero.stacking_download_numel(768, 768, [16] * 30) == 768 * 768
    assert hetero.stacking_download_numel(4, 3, [1]) == 7


# ------------------------------------------------------------------ HetLoRA self-pruning


def test_self_pruning_hand_case():
    A = torch.zeros(4, 3, dtype=F64, requires_grad=True)
    B = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    with torch.no_grad():
        A[0, 0] = B[0, 0] = 7.0  # head components are not penalized
        B[:, 2:] = t([[3, 0], [0, 4]])  # ||B tail|| = 5
        A[2, 0] = 1.0  # ||A tail|| = 1
    assert hetero.tail_norm(A, B, 4, 0.5).item() == pytest.approx(5.0)
    pen = hetero.tail_penalty(A, B, 4, lam=0.1, gamma=0.5)
    assert pen.item() == pytest.approx(0.5)
    pen.backward()
    assert A.grad[:2].abs().sum() == 0 and A.grad[2:].abs().sum() > 0
    assert hetero.tail_penalty(A, B, 4, lam=0.0, gamma=0.5).item() == 0
    assert hetero.tail_penalty(A, B, 4, lam=1.0, gamma=1.0).item() == 0  # empty tail
    assert hetero.self_prune_rank(A, B, 4, 0.5, threshold=6.0) == 2
    assert hetero.self_prune_rank(A, B, 4, 0.5, threshold=5.0) == 4  # strict
    assert hetero.self_prune_rank(A, B, 4, 1.0, threshold=1e9) == 4  # gamma = 1: off
    assert hetero.self_prune_rank(A[:1], B[:, :1], 1, 0.5, threshold=1e9) == 1  # floor at 1


# ------------------------------------------------------------------ tiers and rank allocation


def test_tier_ranks_and_flasc_densities():
    assert [hetero.tier_rank(b, 4) for b in (1, 2, 3)] == [1, 4, 16]
    assert [hetero.tier_rank(b, 2) for b in range(1, 6)] == [1, 2, 4, 8, 16]
    assert [hetero.flasc_tier_density(b, 3, 4) for b in (1, 2, 3)] == [1 / 16, 1 / 4, 1.0]
    assert hetero.flasc_tier_density(1, 5, 2) == 1 / 16
    with pytest.raises(ValueError):
        hetero.flasc_tier_density(4, 3, 4)


def test_assign_tiers_deterministic_and_independent():
    base = hetero.assign_tiers(40, 3, seed=7)
    assert base.dtype == np.int64 and base.shape == (40,)
    assert set(base.tolist()) == {1, 2, 3}
    # consume every other source of randomness in between: result must not move
    np.random.seed(123)
    np.random.rand(1000)
    torch.rand(1000)
    np.random.default_rng(7).random(1000)
    for stream in ("sampling", "data_order", "dropout", "dp_noise"):
        np_rng(7, stream).random(1000)
    assert np.array_equal(
        base, np.random.default_rng([7, hetero.TIER_STREAM_ID]).integers(1, 4, size=40)
    )
    assert np.array_equal(hetero.assign_tiers(40, 3, seed=7), base)
    assert not np.array_equal(hetero.assign_tiers(40, 3, seed=8), base)
    # pinned: changing TIER_STREAM_ID would silently change every tiered experiment
    assert hetero.assign_tiers(10, 5, seed=0).tolist() == PINNED_TIERS_SEED0
    counts = np.bincount(hetero.assign_tiers(30_000, 5, seed=1), minlength=6)[1:]
    assert counts.min() > 5600 and counts.max() < 6400  # uniform


PINNED_TIERS_SEED0 = [2, 4, 5, 4, 1, 1, 5, 1, 1, 3]


def test_loss_based_ranks_hand_case():
    got = hetero.loss_based_ranks([0.5, 0.1, 0.9, 0.3], [1, 4, 16, 1])
    assert got.tolist() == [1, 16, 1, 4]
    assert sorted(got.tolist()) == [1, 1, 4, 16]  # same multiset: same bandwidth budget
    assert hetero.loss_based_ranks([0.2, 0.2], [1, 2]).tolist() == [2, 1]  # tie: lower index
    with pytest.raises(ValueError):
        hetero.loss_based_ranks([0.1, 0.2], [1])


# ------------------------------------------------------------------ SVD init / SLoRA mask


def test_svd_init_hand_case_truncates():
    dw = torch.diag(t([3.0, 2.0, 1.0]))
    A, B, err = svd_init(dw, rank=2, alpha=4.0)  # s = 2
    assert A.shape == (2, 3) and B.shape == (3, 2) and A.dtype == F64
    assert torch.allclose(2.0 * B @ A, torch.diag(t([3.0, 2.0, 0.0])), atol=1e-12)
    assert err == pytest.approx(1 / math.sqrt(14), rel=1e-12)
    # Σ^{1/2} split evenly: both factors carry the same energy, Σσ_r / s = 5 / 2
    assert torch.linalg.matrix_norm(A).item() ** 2 == pytest.approx(2.5)
    assert torch.linalg.matrix_norm(B).item() ** 2 == pytest.approx(2.5)


def test_svd_init_reproduces_delta_up_to_truncation_error():
    g = torch.Generator().manual_seed(5)
    low = torch.randn(8, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64)
    for r in (2, 3):  # rank(ΔW) <= r: exact
        A, B, err = svd_init(low, rank=r, alpha=16.0)
        assert torch.allclose((16.0 / r) * B @ A, low, atol=1e-12)
        assert err < 1e-12
    full = torch.randn(8, 6, generator=g, dtype=F64)
    A, B, err = svd_init(full, rank=3, alpha=8.0)
    resid = torch.linalg.matrix_norm(full - (8.0 / 3) * B @ A) / torch.linalg.matrix_norm(full)
    assert resid.item() == pytest.approx(err, rel=1e-10)
    assert 0 < err < 1
    # an explicit scaling (server-rank convention) is honored
    A, B, _ = svd_init(low, rank=2, alpha=16.0, scaling=0.5)
    assert torch.allclose(0.5 * B @ A, low, atol=1e-12)
    A32, B32, _ = svd_init(low.float(), rank=2, alpha=2.0)
    assert A32.dtype == torch.float32 and torch.allclose(B32 @ A32, low.float(), atol=1e-4)
    assert svd_init(torch.zeros(3, 4), 1, 1.0)[2] == 0.0
    with pytest.raises(ValueError):
        svd_init(low, rank=7, alpha=1.0)


def test_slora_mask_density_exact():
    g = torch.Generator().manual_seed(0)
    m = slora_mask((7, 11), 0.1, g)
    assert m.dtype == torch.bool and m.shape == (7, 11) and int(m.sum()) == 7
    assert int(slora_mask((10, 10), 0.25, g).sum()) == 25
    assert int(slora_mask((10, 10), 0.29, g).sum()) == num_kept(100, 0.29)  # same rule as FLASC
    assert int(slora_mask((3, 3), 1e-6, g).sum()) == 1  # at least one
    assert int(slora_mask((4, 5), 1.0, g).sum()) == 20
    m1 = slora_mask((20, 30), 0.1, torch.Generator().manual_seed(3))
    m2 = slora_mask((20, 30), 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2) and int(m1.sum()) == 60
    assert int(slora_mask((768, 768), 0.1, g).sum()) == 58_982
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            slora_mask((3, 3), bad, g)
