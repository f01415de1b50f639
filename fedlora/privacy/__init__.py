"""Differential privacy for DP-FedAdam: the server-side Gaussian mechanism and its accounting.

See ``docs/privacy.md`` for the mechanism, the accounting choices and the cohort-simulation
caveat.
"""

from fedlora.privacy.accounting import (
    EpsilonReport,
    build_event,
    calibrate_noise,
    default_delta,
    epsilon,
    validate_privacy_config,
)
from fedlora.privacy.mechanism import clip, mean_update, privatize, sequential_sum

__all__ = [
    "EpsilonReport",
    "build_event",
    "calibrate_noise",
    "clip",
    "default_delta",
    "epsilon",
    "mean_update",
    "privatize",
    "sequential_sum",
    "validate_privacy_config",
]
