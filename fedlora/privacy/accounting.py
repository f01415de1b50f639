"""Privacy accounting for DP-FedAdam with Google's ``dp-accounting``.

One round is one sampled Gaussian mechanism on the sum of clipped client updates (noise std
sigma*C, see ``mechanism.py``); ``rounds`` of them are self-composed. The accountant follows the
sampling that the run actually used:

* ``sampling="poisson"`` -- each client joins a round independently with q = cohort/population.
  PLD accountant, add/remove-one neighbours (one client's whole dataset present or absent), the
  tightest accounting dp-accounting offers here. PLD memory grows like 1/sigma^2 (about 0.5 GB
  at sigma = 0.3, 2.5-5 GB at sigma = 0.1, killed by the OOM killer at 0.013), so below
  ``PLD_MIN_NOISE_MULTIPLIER`` the RDP accountant (same event, a valid but looser bound) is
  used and the report says so (such sigma give large epsilon anyway: 22 at q = 0.01, 200
  rounds, delta = 1e-3).
* ``sampling="fixed"`` -- exactly ``cohort_size`` distinct clients per round, uniformly without
  replacement. Only the RDP accountant supports this (``SampledWithoutReplacementDpEvent``,
  Wang-Balle-Kasiviswanathan 2019), and only under replace-one neighbours (the population size
  is public). Replacing one client moves the sum by up to 2C, so the Gaussian event is built
  with noise multiplier sigma/2 (noise std over the replace-one sensitivity). dp-accounting does
  *not* do this for you: its RDP accountant ignores the neighbouring relation for a Gaussian
  event, while its PLD accountant doubles the sensitivity for REPLACE_ONE by itself.

Epsilons under the two relations are not directly comparable: a replacement is a removal plus
an addition, so add/remove (eps, delta) implies only replace-one (2 eps, (1 + e^eps) delta).

Default delta is 1/population, the convention this project reports with; the usual advice is
delta well below 1/population, so pass a smaller one when the guarantee matters.

Cohort simulation (paper, Appendix A): with ``noise_cohort_size`` M > m the noise is calibrated
for a round of M clients, and epsilon is computed for that simulated run (q = M/population,
sigma as given). The run that was trained sampled only m clients with noise sigma*C*m/M on their
sum, i.e. noise multiplier sigma*m/M at q = m/population -- far less private than reported. The
report flags this (``simulated_cohort`` and ``note``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from scipy import optimize

__all__ = [
    "PLD_MIN_NOISE_MULTIPLIER",
    "SAMPLINGS",
    "EpsilonReport",
    "build_event",
    "calibrate_noise",
    "default_delta",
    "epsilon",
    "validate_privacy_config",
]

SAMPLINGS = ("poisson", "fixed")
# Accountants dp-accounting supports per sampling; the first is fedlora's default.
_ACCOUNTANTS = {"poisson": ("pld", "rdp"), "fixed": ("rdp",)}
_RELATIONS = {"poisson": "add_or_remove_one", "fixed": "replace_one"}
_RELATION_ENUM = {
    "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}
PLD_MIN_NOISE_MULTIPLIER = 0.3  # below: PLD needs GBs of memory, fall back to RDP
_COARSE_PLD_GRID = 1e-3  # PLD value_discretization_interval while searching (default 1e-4)


@dataclass(frozen=True)
class EpsilonReport:
    """The (epsilon, delta) guarantee of a run and everything needed to reproduce it."""

    epsilon: float
    delta: float
    accountant: str  # "pld" | "rdp"
    sampling: str  # "poisson" | "fixed"
    neighboring_relation: str  # "add_or_remove_one" | "replace_one"
    sampling_probability: float  # q of the accounted (possibly simulated) cohort
    rounds: int
    noise_multiplier: float  # sigma: noise std on the sum / C
    event_noise_multiplier: float  # what the Gaussian event got (sigma/2 for replace-one)
    population: int
    cohort_size: float  # m actually sampled per round (expected size for Poisson)
    noise_cohort_size: float  # M the noise and epsilon are computed for
    simulated_cohort: bool  # True: the trained model is LESS private than `epsilon`
    note: str

    def to_dict(self) -> dict:
        """Plain dict for metrics; an infinite epsilon stays ``float('inf')``."""
        return asdict(self)


def default_delta(population: int) -> float:
    """delta = 1/population: the project's reporting default (see module doc)."""
    return 1.0 / population


def validate_privacy_config(
    *,
    sampling: str,
    population: int,
    cohort_size: float,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    rounds: int | None = None,
    noise_cohort_size: float | None = None,
    target_epsilon: float | None = None,
    clip_norm: float | None = None,
    accountant: str | None = None,
    neighboring_relation: str | None = None,
    prefix: str = "",
) -> None:
    """Raise a ValueError naming the offending field when a DP config cannot be accounted.

    ``accountant`` / ``neighboring_relation`` are optional overrides from a config; they must
    be what dp-accounting supports for ``sampling`` (poisson: pld or rdp, add_or_remove_one;
    fixed: rdp, replace_one). ``prefix`` is prepended to field names (e.g. ``"privacy."``).
    """

    def bad(field: str, msg: str) -> ValueError:
        return ValueError(f"{prefix}{field}: {msg}")

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if sampling not in SAMPLINGS:
        raise bad("sampling", f"must be one of {SAMPLINGS}, got {sampling!r}")
    if not (isinstance(population, int) and not isinstance(population, bool)) or population < 1:
        raise bad("population", f"must be an integer >= 1, got {population!r}")
    if not (number(cohort_size) and 0 < cohort_size <= population):
        raise bad("cohort_size", f"must be in (0, population={population}], got {cohort_size!r}")
    if sampling == "fixed" and not float(cohort_size).is_integer():
        raise bad("cohort_size", f"must be an integer for sampling 'fixed', got {cohort_size}")
    if noise_cohort_size is not None:
        if not (number(noise_cohort_size) and cohort_size <= noise_cohort_size <= population):
            raise bad(
                "noise_cohort_size",
                f"must be in [cohort_size={cohort_size}, population={population}] (the"
                f" simulated cohort is sampled from the population), got {noise_cohort_size!r}",
            )
        if sampling == "fixed" and not float(noise_cohort_size).is_integer():
            raise bad("noise_cohort_size", "must be an integer for sampling 'fixed'")
    if noise_multiplier is not None and not (
        number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise bad("noise_multiplier", f"must be finite and >= 0, got {noise_multiplier!r}")
    if delta is not None and not (number(delta) and 0 < delta < 1):
        raise bad("delta", f"must be in the open interval (0, 1), got {delta!r}")
    if delta is None and population < 2:
        raise bad("delta", "the default 1/population is 1 for population 1; set delta")
    if rounds is not None and not (
        isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0
    ):
        raise bad("rounds", f"must be an integer >= 0, got {rounds!r}")
    if target_epsilon is not None:
        if not (number(target_epsilon) and target_epsilon > 0):
            raise bad("target_epsilon", f"must be > 0, got {target_epsilon!r}")
        if (
            math.isfinite(target_epsilon)
            and noise_multiplier is not None
            and (noise_multiplier <= 0)
        ):
            raise bad(
                "noise_multiplier",
                f"is {noise_multiplier} but a finite target_epsilon={target_epsilon} was"
                " requested; without noise epsilon is infinite",
            )
    if clip_norm is not None:
        if not (number(clip_norm) and clip_norm > 0):
            raise bad("clip_norm", f"must be > 0 (inf disables clipping), got {clip_norm!r}")
        if math.isinf(clip_norm) and (noise_multiplier or 0) > 0:
            raise bad("clip_norm", "must be finite when noise_multiplier > 0 (std is sigma*C)")
    if accountant is not None and accountant not in _ACCOUNTANTS[sampling]:
        raise bad(
            "accountant",
            f"{accountant!r} cannot account sampling {sampling!r}; use one of"
            f" {_ACCOUNTANTS[sampling]} (dp-accounting handles sampling without replacement"
            " only with RDP)",
        )
    if neighboring_relation is not None and neighboring_relation != _RELATIONS[sampling]:
        why = (
            "replace-one needs fixed-size sampling without replacement"
            if sampling == "poisson"
            else "dp-accounting supports sampling without replacement only under replace-one"
        )
        raise bad(
            "neighboring_relation",
            f"{neighboring_relation!r} does not match sampling {sampling!r}, which is accounted"
            f" under {_RELATIONS[sampling]!r} ({why})",
        )


def build_event(
    *,
    noise_multiplier: float,
    rounds: int,
    sampling: str,
    population: int,
    sample_size: float,
) -> dp_accounting.DpEvent:
    """The dp-accounting event of ``rounds`` sampled Gaussian rounds (sigma/2 for fixed)."""
    if sampling == "poisson":
        once = dp_accounting.PoissonSampledDpEvent(
            sample_size / population, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    else:
        once = dp_accounting.SampledWithoutReplacementDpEvent(
            population, int(sample_size), dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        )
    return dp_accounting.SelfComposedDpEvent(once, rounds)


def _pick_accountant(sampling: str, sigma: float, requested: str | None) -> str:
    if requested is not None:
        return requested
    if sampling == "poisson" and sigma >= PLD_MIN_NOISE_MULTIPLIER:
        return "pld"
    return "rdp"


def _new_accountant(
    kind: str, sampling: str, coarse: bool = False
) -> dp_accounting.PrivacyAccountant:
    """dp-accounting's defaults, or a 10x coarser PLD grid for searching.

    A coarser PLD grid is still a pessimistic (valid) upper bound, about 10x faster, and
    within ~1e-5 relative of the default one in epsilon.
    """
    relation = _RELATION_ENUM[_RELATIONS[sampling]]
    if kind == "pld":
        if coarse:
            return PLDAccountant(relation, value_discretization_interval=_COARSE_PLD_GRID)
        return PLDAccountant(relation)
    return RdpAccountant(neighboring_relation=relation)


def _epsilon_value(
    sigma: float,
    rounds: int,
    sampling: str,
    population: int,
    size: float,
    delta: float,
    requested: str | None,
    coarse: bool = False,
) -> float:
    if rounds == 0:
        return 0.0
    if sigma == 0:
        return math.inf  # RDP's without-replacement bound would divide by zero
    event = build_event(
        noise_multiplier=sigma,
        rounds=rounds,
        sampling=sampling,
        population=population,
        sample_size=size,
    )
    kind = _pick_accountant(sampling, sigma, requested)
    return float(_new_accountant(kind, sampling, coarse).compose(event).get_epsilon(delta))


def epsilon(
    *,
    noise_multiplier: float,
    rounds: int,
    sampling: str,
    population: int,
    cohort_size: float,
    delta: float | None = None,
    noise_cohort_size: float | None = None,
    accountant: str | None = None,
) -> EpsilonReport:
    """epsilon at ``delta`` (default 1/population) after ``rounds`` DP-FedAdam rounds.

    ``accountant`` forces "pld"/"rdp" (must suit ``sampling``); by default see module doc.
    With ``noise_cohort_size`` M > ``cohort_size`` the epsilon is that of the simulated
    M-client run and the report is flagged: the trained model is less private.
    """
    validate_privacy_config(
        sampling=sampling,
        population=population,
        cohort_size=cohort_size,
        noise_multiplier=noise_multiplier,
        delta=delta,
        rounds=rounds,
        noise_cohort_size=noise_cohort_size,
        accountant=accountant,
    )
    delta = default_delta(population) if delta is None else float(delta)
    m = cohort_size
    big_m = m if noise_cohort_size is None else noise_cohort_size
    kind = _pick_accountant(sampling, noise_multiplier, accountant)
    eps = _epsilon_value(noise_multiplier, rounds, sampling, population, big_m, delta, kind)
    relation = _RELATIONS[sampling]
    notes = [f"{sampling} sampling, {kind} accountant, {relation} neighbours"]
    if sampling == "fixed":
        notes.append("Gaussian event uses sigma/2: replace-one moves the sum by up to 2C")
    if sampling == "poisson" and kind == "rdp" and accountant is None and noise_multiplier > 0:
        notes.append(
            f"RDP instead of PLD: sigma < {PLD_MIN_NOISE_MULTIPLIER} would need GBs for PLD;"
            " RDP is a valid, looser upper bound"
        )
    if noise_multiplier == 0 and rounds > 0:
        notes.append("no noise: not differentially private")
    simulated = big_m > m
    if simulated:
        notes.append(
            f"SIMULATED COHORT: noise and epsilon are for {big_m} clients per round but the"
            f" model was trained with {m}; the trained model is less private than this"
            f" epsilon (its own mechanism: noise multiplier {noise_multiplier * m / big_m:.4g}"
            f" at q={m / population:.4g})"
        )
    return EpsilonReport(
        epsilon=eps,
        delta=delta,
        accountant=kind,
        sampling=sampling,
        neighboring_relation=relation,
        sampling_probability=big_m / population,
        rounds=rounds,
        noise_multiplier=float(noise_multiplier),
        event_noise_multiplier=float(
            noise_multiplier / 2 if sampling == "fixed" else noise_multiplier
        ),
        population=population,
        cohort_size=m,
        noise_cohort_size=big_m,
        simulated_cohort=simulated,
        note="; ".join(notes),
    )


def calibrate_noise(
    target_epsilon: float,
    *,
    rounds: int,
    sampling: str,
    population: int,
    cohort_size: float,
    delta: float | None = None,
    noise_cohort_size: float | None = None,
    accountant: str | None = None,
    rtol: float = 1e-4,
    max_sigma: float = 1e4,
) -> float:
    """Smallest sigma (to ``rtol`` relative, erring high) with ``epsilon(...) <= target``.

    Calibrates against exactly what :func:`epsilon` reports for the same arguments: a geometric
    search brackets sigma, Brent's method refines it, and the result is moved up until it meets
    the target. PLD searches run on a 10x coarser grid, then the result is certified with the
    reporting accountant -- epsilon(sigma) <= target < epsilon(sigma / (1 + rtol)) -- or the
    search is redone on the fine grid.
    """
    validate_privacy_config(
        sampling=sampling,
        population=population,
        cohort_size=cohort_size,
        delta=delta,
        rounds=rounds,
        noise_cohort_size=noise_cohort_size,
        target_epsilon=target_epsilon,
        accountant=accountant,
    )
    if not math.isfinite(target_epsilon) or rounds == 0:
        return 0.0
    delta = default_delta(population) if delta is None else float(delta)
    size = cohort_size if noise_cohort_size is None else noise_cohort_size
    args = (rounds, sampling, population, size, delta, accountant)

    def eps_fine(sigma: float) -> float:
        return _epsilon_value(sigma, *args)

    def eps_coarse(sigma: float) -> float:
        return _epsilon_value(sigma, *args, coarse=True)

    if sampling == "fixed" or accountant == "rdp":  # RDP is fast; no coarse grid
        return _search_sigma(eps_fine, target_epsilon, rtol, max_sigma)
    sigma = _search_sigma(eps_coarse, target_epsilon, rtol / 4, max_sigma)
    if eps_fine(sigma) <= target_epsilon < eps_fine(sigma / (1 + rtol)):
        return sigma
    return _search_sigma(eps_fine, target_epsilon, rtol, max_sigma)


def _search_sigma(eps, target: float, rtol: float, max_sigma: float) -> float:
    """Bracket sigma geometrically from 1, Brent inside, then step up to meet the target."""
    lo = hi = 1.0
    if eps(hi) <= target:
        while True:  # halve until the target is violated
            lo = hi / 2
            if eps(lo) > target:
                break
            hi = lo
            if hi < 1e-3:
                return hi  # hardly any noise needed (tiny q or huge target): good enough
    else:
        while True:
            lo, hi = hi, hi * 2
            if hi > max_sigma:
                raise ValueError(f"target_epsilon: {target} needs noise_multiplier > {max_sigma}")
            if eps(hi) <= target:
                break
    tol = rtol * lo / 4  # room for the step-up below
    sigma = optimize.brentq(lambda s: eps(s) - target, lo, hi, xtol=tol)
    for _ in range(4):  # Brent is within tol of the crossing, maybe on its wrong side
        if eps(sigma) <= target:
            return float(sigma)
        sigma = min(sigma + tol, hi)
    return hi
