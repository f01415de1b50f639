"""fedlora: communication-efficient federated fine-tuning with LoRA (FLASC and baselines).

Public entry points: `fedlora.run` and `fedlora.load_run` (the Python API, docs/api.md),
`fedlora.engine.Simulation`, `fedlora.config.load_config`, `fedlora.sweep.sweep`,
`fedlora.sweep.search` (FLASC-S on real runs), `fedlora.search` (the search logic),
`fedlora.report.report`, `fedlora.export.export`. Submodules are imported on use so that
`import fedlora` stays cheap (no torch, no transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Run", "load_run", "run"]

if TYPE_CHECKING:
    from fedlora.api import Run, load_run, run


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
