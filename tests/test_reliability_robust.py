"""Robust aggregation rules (fedlora/server/robust.py): exact against references, and they
hold against a scaled or sign-flipped attacker where the plain mean does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.server.robust import (
    coordinate_median,
    krum,
    krum_scores,
    norm_bound,
    robust_select,
    trimmed_mean,
    update_norms,
)


def honest_cohort(m: int = 10, n: int = 50, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(n, generator=g)
    return [center + 0.1 * torch.randn(n, generator=g) for _ in range(m)]


def mean(ups):
    return torch.stack(ups).mean(0)


matrices = st.integers(1, 9).flatmap(lambda m: st.integers(1, 6).flatmap(
    lambda n: st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=n, max_size=n),
                       min_size=m, max_size=m)))


@settings(max_examples=150, deadline=None)
@given(matrices, st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.49]))
def test_trimmed_mean_matches_a_sorted_reference(rows, trim):
    x = np.array(rows, dtype=np.float32)
    m = x.shape[0]
    cut = min(math.floor(trim * m), (m - 1) // 2)
    want = np.sort(x.astype(np.float64), axis=0)[cut:m - cut].mean(0)
    got = trimmed_mean([torch.from_numpy(r) for r in x], trim)
    np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=1e-6, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(matrices)
def test_median_matches_numpy(rows):
    x = np.array(rows, dtype=np.float32)
    got = coordinate_median([torch.from_numpy(r) for r in x])
    np.testing.assert_allclose(got.numpy(), np.median(x.astype(np.float64), axis=0)
                               .astype(np.float32), rtol=1e-6, atol=1e-6)


def test_krum_scores_match_the_definition():
    ups = honest_cohort(7, 5, seed=3)
    f = 2
    x = torch.stack(ups).double()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    want = []
    for i in range(7):
        others = sorted(float(d[i, j]) for j in range(7) if j != i)
        want.append(sum(others[: 7 - f - 2]))
    assert krum_scores(ups, f) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("attack", ["scaled", "sign_flip", "huge"])
def test_rules_resist_one_attacker_of_ten(attack):
    ups = honest_cohort()
    honest = mean(ups[1:])
    bad = {"scaled": ups[0] * 100, "sign_flip": -10 * ups[0], "huge": torch.full_like(ups[0], 3e38)}
    ups[0] = bad[attack]
    plain = mean(ups)
    spread = float((torch.stack(ups[1:]) - honest).norm(dim=1).max())
    # the plain mean is pulled far away (or overflows) ...
    assert not torch.isfinite(plain).all() or float((plain - honest).norm()) > 5 * spread
    # ... while every robust rule stays with the honest clients
    for rule, kw in [("trimmed_mean", {"trim": 0.1}), ("median", {}), ("krum", {}),
                     ("multi_krum", {}), ("mean", {"x_median": 3.0})]:
        out = robust_select(ups, rule=rule, byzantine=1, **kw)
        g = out.aggregate if out.aggregate is not None else mean(out.updates)
        assert torch.isfinite(g).all(), rule
        assert float((g - honest).norm()) < spread, (rule, attack)
        if rule in ("krum", "multi_krum", "mean"):
            assert 0 in out.rejected and 0 not in out.kept, rule


def test_norm_bound_reject_clip_absolute_and_median():
    ups = [torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8]), torch.tensor([0.0, 2.0])]
    kept, idx, rej = norm_bound(ups, max_norm=2.5)
    assert idx == [1, 2] and list(rej) == [0] and "5 > bound 2.5" in rej[0]
    kept, idx, rej = norm_bound(ups, max_norm=2.5, action="clip")
    assert idx == [0, 1, 2] and not rej
    assert update_norms(kept) == pytest.approx([2.5, 1.0, 2.0])
    assert torch.allclose(kept[0], torch.tensor([1.5, 2.0]))
    # median norm is 2 -> bound 1.5 x 2 = 3
    kept, idx, rej = norm_bound(ups, x_median=1.5)
    assert idx == [1, 2] and list(rej) == [0]
    # norms accumulate in float64: 3e38 entries have a finite norm (no false rejection) ...
    _, idx, rej = norm_bound([torch.tensor([3e38, 3e38]), ups[1]])
    assert idx == [0, 1] and not rej
    # ... and a non-finite norm is rejected even with no bound at all
    _, idx, rej = norm_bound([torch.tensor([math.nan, 0.0]), ups[1]])
    assert idx == [1] and "nan" in rej[0]


def test_multi_krum_keeps_the_honest_majority():
    ups = honest_cohort(10, 20, seed=5)
    ups[3] = ups[3] * -20
    ups[7] = ups[7] + 50
    out = robust_select(ups, rule="multi_krum", byzantine=2)
    assert out.kept == [0, 1, 2, 4, 5, 6, 8, 9]
    assert set(out.rejected) == {3, 7} and all("multi_krum" in r for r in out.rejected.values())
    assert krum(ups, 2) == [min(range(10), key=lambda i: (krum_scores(ups, 2)[i], i))]


def test_empty_and_bad_inputs():
    assert robust_select([], rule="median").kept == []
    with pytest.raises(ValueError, match="one length"):
        trimmed_mean([torch.zeros(2), torch.zeros(3)], 0.1)
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean([torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match="action"):
        norm_bound([torch.zeros(2)], action="drop")
    # a bound that rejects everybody leaves nothing to aggregate, and says why for each
    out = robust_select(honest_cohort(3), rule="trimmed_mean", max_norm=1e-9)
    assert out.kept == [] and out.aggregate is None and set(out.rejected) == {0, 1, 2}


def test_sparse_updates_missing_coordinates_are_zeros():
    # three clients sent only coordinate 0, two only coordinate 1: the median of coordinate 1
    # over five clients is the median of {0, 0, 0, 5, 5} = 0
    ups = [torch.tensor([1.0, 0.0])] * 3 + [torch.tensor([0.0, 5.0])] * 2
    assert coordinate_median(ups).tolist() == [1.0, 0.0]
