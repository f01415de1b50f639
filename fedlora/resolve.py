"""Finish a loaded config for running: the layer that knows both registries.

`fedlora.config.load_config` checks every general field and imports nothing of fedlora's;
the task and method names, the method's own typed settings (`method.*`) and what the flat
vector holds (`model.trainable`) are checked here, against the task and method registries.
"""

from __future__ import annotations

from fedlora.config import Config
from fedlora.methods import resolve_settings
from fedlora.tasks import check_name


def resolve_config(cfg: Config) -> Config:
    """Resolve `cfg` in place (idempotent) and return it; errors name the dotted field."""
    check_name(cfg)
    resolve_settings(cfg)
    return cfg
