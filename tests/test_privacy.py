"""DP-FedAdam: Gaussian mechanism (fedlora.privacy.mechanism) and accounting (.accounting)."""

import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedlora.privacy import (
    calibrate_noise,
    clip,
    epsilon,
    mean_update,
    privatize,
    sequential_sum,
    validate_privacy_config,
)
from fedlora.privacy.accounting import PLD_MIN_NOISE_MULTIPLIER
from fedlora.server.aggregate import weighted_mean

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _updates(m: int, d: int, seed: int = 1, scale: float = 1.0) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(d, generator=g) * scale * 10 ** (i % 3 - 1) for i in range(m)]


# ----------------------------------------------------------------------------- clipping


def test_clip_bounds_norm_and_reports_original_norm():
    for i, u in enumerate(_updates(50, 1000, scale=3.0)):
        c = 0.5 + i / 7
        out, norm = clip(u, c)
        assert norm == pytest.approx(float(u.double().norm()), rel=1e-12)
        assert float(out.double().norm()) <= c * (1 + 1e-6)
        if norm > c:
            assert float(out.double().norm()) == pytest.approx(c, rel=1e-6)
            assert torch.allclose(out / out.norm(), u / u.norm(), atol=1e-6)
        else:
            assert out is u


def test_clip_inf_returns_input_unchanged():
    u = torch.randn(100, generator=_gen()) * 1e30
    out, norm = clip(u, math.inf)
    assert out is u and torch.equal(out, u) and norm > 0


def test_clip_rejects_bad_norm_and_nonfinite_update():
    with pytest.raises(ValueError, match="clip_norm"):
        clip(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip(torch.tensor([1.0, float("nan")]), 1.0)


# ----------------------------------------------------------------------------- privatize


def test_no_noise_no_clip_equals_nonprivate_mean_exactly():
    ups = _updates(13, 10_001)
    out, info = privatize(
        ups, clip_norm=math.inf, noise_multiplier=0.0, generator=_gen(), cohort_size=13
    )
    manual = torch.zeros(10_001)
    for u in ups:
        manual = manual + u
    assert torch.equal(out, manual / 13)
    assert torch.equal(out, weighted_mean(ups))  # the engine's non-private aggregation
    assert torch.equal(out, mean_update(ups, 13))
    assert torch.equal(out, sequential_sum(ups) / 13)
    assert info["clipped_fraction"] == 0.0 and info["noise_std"] == 0.0
    # inputs untouched
    assert torch.equal(ups[0], _updates(13, 10_001)[0])


def test_every_contribution_is_clipped_to_c():
    ups = _updates(20, 500, scale=5.0)
    c = 20.0
    out, info = privatize(ups, clip_norm=c, noise_multiplier=0.0, generator=_gen(), cohort_size=20)
    expected = sequential_sum([clip(u, c)[0] for u in ups]) / 20
    assert torch.equal(out, expected)
    assert info["norms"] == pytest.approx([float(u.double().norm()) for u in ups])
    assert info["clipped_fraction"] == sum(float(u.norm()) > c for u in ups) / 20
    assert 0 < info["clipped_fraction"] < 1
    assert float((out * 20).norm()) <= 20 * c * (1 + 1e-6)


@pytest.mark.parametrize("noise_cohort", [None, 1000])
def test_empirical_noise_std_matches_formula(noise_cohort):
    d, m, sigma, c = 1_000_000, 10, 1.3, 0.5
    ups = [torch.zeros(d) for _ in range(m)]
    out, info = privatize(
        ups,
        clip_norm=c,
        noise_multiplier=sigma,
        generator=_gen(7),
        cohort_size=m,
        noise_cohort_size=noise_cohort,
    )
    expected = sigma * c / (noise_cohort or m)
    assert info["noise_std"] == pytest.approx(expected)
    assert info["noise_std_sum"] == pytest.approx(sigma * c * m / (noise_cohort or m))
    assert float(out.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(out.mean())) < 5 * expected / math.sqrt(d)


def test_noise_makes_sparse_updates_dense():
    ups = [torch.zeros(1000) for _ in range(4)]
    for i, u in enumerate(ups):
        u[i * 10 : i * 10 + 5] = 1.0
    out, _ = privatize(ups, clip_norm=1.0, noise_multiplier=0.5, generator=_gen(), cohort_size=4)
    assert int((out != 0).sum()) == 1000


def test_noise_depends_only_on_generator_seed():
    d, m, sigma, c = 5000, 6, 0.8, 1.0
    a, b = _updates(m, d, seed=1), _updates(m + 3, d, seed=2, scale=9.0)

    def noise_of(ups, seed, **kw):
        out, info = privatize(
            ups,
            clip_norm=c,
            noise_multiplier=sigma,
            generator=_gen(seed),
            cohort_size=kw.get("cohort", m),
            **kw.get("extra", {}),
        )
        clipped = mean_update([clip(u, c)[0] for u in ups], kw.get("cohort", m))
        return (out - clipped) / info["noise_std"]

    z1 = noise_of(a, 3)
    assert torch.equal(
        privatize(a, clip_norm=c, noise_multiplier=sigma, generator=_gen(3), cohort_size=m)[0],
        privatize(a, clip_norm=c, noise_multiplier=sigma, generator=_gen(3), cohort_size=m)[0],
    )
    z2 = noise_of(b, 3, cohort=m + 3, extra={"noise_cohort_size": 50})
    reference = torch.randn(d, generator=_gen(3))
    assert torch.allclose(z1, reference, atol=1e-3)
    assert torch.allclose(z2, reference, atol=1e-3)
    assert not torch.allclose(noise_of(a, 4), reference, atol=1e-1)


def test_generator_is_consumed_once_per_noisy_call_and_not_without_noise():
    ups = _updates(3, 100)
    g = _gen(5)
    privatize(ups, clip_norm=1.0, noise_multiplier=1.0, generator=g, cohort_size=3)
    ref = _gen(5)
    torch.randn(100, generator=ref)
    assert torch.equal(torch.randn(10, generator=g), torch.randn(10, generator=ref))
    g0 = _gen(5)
    privatize(ups, clip_norm=1.0, noise_multiplier=0.0, generator=g0, cohort_size=3)
    assert torch.equal(torch.randn(10, generator=g0), torch.randn(10, generator=_gen(5)))


def test_privatize_weights_and_denominator():
    ups = _updates(4, 50)
    w = [1.0, 0.5, 0.0, 0.25]
    out, info = privatize(
        ups, clip_norm=math.inf, noise_multiplier=0.0, generator=_gen(), cohort_size=8.5, weights=w
    )
    assert torch.allclose(out, sum(wi * u for wi, u in zip(w, ups, strict=True)) / 8.5)
    total = torch.zeros(50)
    for wi, u in zip(w, ups, strict=True):
        total.add_(u, alpha=wi)
    assert torch.equal(out, total / 8.5)
    assert info["num_updates"] == 4 and info["cohort_size"] == 8.5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clip_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"cohort_size": 0}, "cohort_size"),
        ({"noise_cohort_size": 2}, "noise_cohort_size"),
        ({"weights": [1.0, 1.5, 0.0]}, r"weights\[1\]"),
        ({"weights": [1.0]}, "weights"),
    ],
)
def test_privatize_errors_name_the_field(kwargs, field):
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "generator": _gen(), "cohort_size": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        privatize(_updates(3, 10), **args)


def test_privatize_errors_name_the_update():
    ups = _updates(3, 10)
    ups[2] = ups[2].clone()
    ups[2][0] = float("inf")
    with pytest.raises(ValueError, match=r"updates\[2\]"):
        privatize(ups, clip_norm=1.0, noise_multiplier=1.0, generator=_gen(), cohort_size=3)
    with pytest.raises(ValueError, match=r"updates\[1\]"):
        privatize(
            [torch.zeros(3), torch.zeros(4)],
            clip_norm=1.0,
            noise_multiplier=0.0,
            generator=_gen(),
            cohort_size=2,
        )
    with pytest.raises(ValueError, match="updates"):
        privatize([], clip_norm=1.0, noise_multiplier=0.0, generator=_gen(), cohort_size=2)


def test_empty_poisson_cohort_still_releases_noise():
    out, info = privatize(
        [],
        clip_norm=2.0,
        noise_multiplier=1.0,
        generator=_gen(9),
        cohort_size=4,
        template=torch.zeros(1000),
    )
    assert torch.allclose(out, torch.randn(1000, generator=_gen(9)) * 2.0 / 4, atol=1e-6)
    assert info["num_updates"] == 0 and info["clipped_fraction"] == 0.0
    with pytest.raises(ValueError, match="template"):
        privatize(
            [torch.zeros(3)],
            clip_norm=1.0,
            noise_multiplier=0.0,
            generator=_gen(),
            cohort_size=1,
            template=torch.zeros(4),
        )


# ----------------------------------------------------------------------------- accounting


def test_epsilon_poisson_matches_dp_accounting():
    for sigma, noise_cohort in [(1.0, None), (0.7, 50)]:
        rep = epsilon(
            noise_multiplier=sigma,
            rounds=200,
            sampling="poisson",
            population=1000,
            cohort_size=10,
            noise_cohort_size=noise_cohort,
        )
        q = (noise_cohort or 10) / 1000
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 200
        )
        direct = PLDAccountant(ADD_REMOVE).compose(event).get_epsilon(1e-3)
        assert rep.epsilon == pytest.approx(direct, abs=1e-6)
        assert (rep.accountant, rep.neighboring_relation) == ("pld", "add_or_remove_one")
        assert rep.sampling_probability == q and rep.delta == 1e-3 and rep.rounds == 200
        assert rep.simulated_cohort == (noise_cohort is not None)
        assert ("less private" in rep.note) == (noise_cohort is not None)


def test_epsilon_fixed_matches_dp_accounting_with_replace_one_sensitivity():
    for sigma, noise_cohort in [(1.0, None), (2.0, 100)]:
        rep = epsilon(
            noise_multiplier=sigma,
            rounds=200,
            sampling="fixed",
            population=1000,
            cohort_size=10,
            delta=1e-5,
            noise_cohort_size=noise_cohort,
        )
        # Replace-one moves the sum of C-clipped updates by up to 2C: event sigma is sigma/2.
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                1000, noise_cohort or 10, dp_accounting.GaussianDpEvent(sigma / 2)
            ),
            200,
        )
        direct = RdpAccountant(neighboring_relation=REPLACE_ONE).compose(event).get_epsilon(1e-5)
        assert rep.epsilon == pytest.approx(direct, abs=1e-6)
        assert (rep.accountant, rep.neighboring_relation) == ("rdp", "replace_one")
        assert rep.event_noise_multiplier == sigma / 2
        assert rep.simulated_cohort == (noise_cohort is not None)


def test_fixed_full_participation_is_gaussian_with_doubled_sensitivity():
    # q = 1: no amplification, so this must be the plain Gaussian mechanism with sensitivity
    # 2C, which dp-accounting's PLD models itself under REPLACE_ONE.
    rep = epsilon(
        noise_multiplier=4.0, rounds=5, sampling="fixed", population=20, cohort_size=20, delta=1e-5
    )
    rdp = RdpAccountant().compose(dp_accounting.GaussianDpEvent(2.0), 5).get_epsilon(1e-5)
    pld = PLDAccountant(REPLACE_ONE).compose(dp_accounting.GaussianDpEvent(4.0), 5)
    assert rep.epsilon == pytest.approx(rdp, rel=1e-9)
    assert pld.get_epsilon(1e-5) <= rep.epsilon <= 1.3 * pld.get_epsilon(1e-5)


def test_epsilon_edge_cases():
    kw = {"sampling": "poisson", "population": 1000, "cohort_size": 10}
    assert epsilon(noise_multiplier=1.0, rounds=0, **kw).epsilon == 0.0
    rep = epsilon(noise_multiplier=0.0, rounds=3, **kw)
    assert rep.epsilon == math.inf and "not differentially private" in rep.note
    low = PLD_MIN_NOISE_MULTIPLIER / 2
    rep = epsilon(noise_multiplier=low, rounds=10, **kw)  # PLD would need GBs here
    direct = RdpAccountant().compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(low)), 10
        )
    )
    assert rep.accountant == "rdp" and "RDP instead of PLD" in rep.note
    assert rep.epsilon == pytest.approx(direct.get_epsilon(1e-3), abs=1e-6)
    forced = epsilon(noise_multiplier=1.0, rounds=10, accountant="rdp", **kw)
    assert forced.accountant == "rdp"
    assert rep.to_dict()["sampling"] == "poisson"


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_calibrate_noise_hits_target(sampling):
    kw = {"rounds": 200, "sampling": sampling, "population": 1000, "cohort_size": 10}
    sigma = calibrate_noise(8.0, **kw)
    assert epsilon(noise_multiplier=sigma, **kw).epsilon <= 8.0
    assert epsilon(noise_multiplier=sigma / (1 + 1e-4), **kw).epsilon > 8.0


def test_calibrate_noise_with_noise_cohort_and_infinite_target():
    kw = {
        "rounds": 50,
        "sampling": "fixed",
        "population": 1000,
        "cohort_size": 10,
        "noise_cohort_size": 100,
        "delta": 1e-5,
    }
    sigma = calibrate_noise(2.0, **kw)
    assert epsilon(noise_multiplier=sigma, **kw).epsilon <= 2.0
    assert epsilon(noise_multiplier=sigma / (1 + 1e-4), **kw).epsilon > 2.0
    assert calibrate_noise(math.inf, **kw) == 0.0


_BASE = {"sampling": "poisson", "population": 100, "cohort_size": 10}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"sampling": "uniform"}, "sampling"),
        ({"population": 0}, "population"),
        ({"cohort_size": 101}, "cohort_size"),
        ({"sampling": "fixed", "cohort_size": 2.5}, "cohort_size"),
        ({"noise_cohort_size": 5}, "noise_cohort_size"),
        ({"noise_cohort_size": 1000}, "noise_cohort_size"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"population": 1, "cohort_size": 1}, "delta"),
        ({"rounds": -1}, "rounds"),
        ({"noise_multiplier": 0.0, "target_epsilon": 8.0}, "noise_multiplier"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clip_norm"),
        ({"neighboring_relation": "replace_one"}, "neighboring_relation"),
        (
            {"sampling": "fixed", "neighboring_relation": "add_or_remove_one"},
            "neighboring_relation",
        ),
        ({"sampling": "fixed", "accountant": "pld"}, "accountant"),
    ],
)
def test_validation_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=rf"^privacy\.{field}:"):
        validate_privacy_config(**{**_BASE, **override}, prefix="privacy.")


def test_validation_accepts_supported_configs_and_accounting_validates():
    validate_privacy_config(
        **_BASE,
        noise_multiplier=0.0,
        clip_norm=math.inf,
        rounds=5,
        delta=1e-3,
        accountant="pld",
        neighboring_relation="add_or_remove_one",
    )
    validate_privacy_config(
        sampling="fixed",
        population=100,
        cohort_size=10,
        noise_cohort_size=100,
        accountant="rdp",
        neighboring_relation="replace_one",
        target_epsilon=math.inf,
        noise_multiplier=0.0,
    )
    with pytest.raises(ValueError, match="^cohort_size"):
        epsilon(noise_multiplier=1.0, rounds=1, sampling="fixed", population=5, cohort_size=6)
    with pytest.raises(ValueError, match="^accountant"):
        calibrate_noise(
            1.0, rounds=1, sampling="fixed", population=5, cohort_size=2, accountant="pld"
        )
