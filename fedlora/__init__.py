"""fedlora: communication-efficient federated fine-tuning with LoRA (FLASC and baselines).

Public entry points: `fedlora.engine.Simulation`, `fedlora.config.load_config`,
`fedlora.sweep.sweep`, `fedlora.sweep.search` (FLASC-S on real runs), `fedlora.search`
(the search logic), `fedlora.report.report`. Submodules are imported on use so that
`import fedlora` stays cheap.
"""

__version__ = "0.1.0"
