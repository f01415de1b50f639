"""The Python API: `fedlora.run(...)` and `fedlora.load_run(dir)` (docs/api.md).

A run is a directory (see README, "A run directory"); `Run` is that directory read back:
the config as a `Config` dataclass, the per-round metrics and the byte ledger as pandas
DataFrames, the summary, and the exported model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from fedlora.config import Config


@dataclass
class Run:
    """A finished (or interrupted) run directory, read back."""

    dir: Path
    config: Config
    metrics: pd.DataFrame  # one row per round, columns as in metrics.jsonl
    summary: dict[str, Any] = field(default_factory=dict)  # empty while unfinished

    @property
    def ledger(self) -> pd.DataFrame:
        """Bytes up and down per client per round (ledger.jsonl)."""
        import pandas as pd

        from fedlora.rundir import read_jsonl

        return pd.DataFrame(read_jsonl(self.dir / "ledger.jsonl"))

    @property
    def export_dir(self) -> Path:
        """The final model as a peft adapter / HF folder (written at the end of the run)."""
        from fedlora.export import EXPORT_DIR

        return self.dir / EXPORT_DIR

    def export(self, out: str | Path | None = None, which: str = "last") -> Path:
        """Export the last or best round (`fedlora export`)."""
        from fedlora.export import export

        return export(self.dir, out, which=which)

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """Predictions of the exported model for `texts` (`fedlora predict`)."""
        from fedlora.predict import Predictor, export_folder

        return Predictor(export_folder(self.dir)).predict(list(texts), batch_size)


def _overrides(overrides: dict[str, Any] | None, kw: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys from `overrides` plus keyword arguments, `__` standing for the dot."""
    from fedlora.config import _set_dotted

    tree: dict[str, Any] = {}
    for key, value in {**(overrides or {}), **{k.replace("__", "."): v
                                                for k, v in kw.items()}}.items():
        _set_dotted(tree, key, value)
    return tree


def run(cfg_or_path: Config | str | Path | None = None, out: str | Path | None = None, *,
        overrides: dict[str, Any] | None = None, progress: bool = False,
        **kw: Any) -> Run:
    """Run one federated experiment and return it read back.

    `cfg_or_path`: a Config, a YAML file, or None (the embedded default). Overrides are
    dotted keys in `overrides` or keywords with `__` for the dot:
    `fedlora.run(rounds=3, method__d_up=0.25, task__name="text-file", task__path="d.jsonl")`.
    `out` defaults to runs/<time>-<method>.
    """
    from fedlora.config import Config, _merge, config_from_dict, load_config
    from fedlora.engine import Simulation

    over = _overrides(overrides, kw)
    if isinstance(cfg_or_path, Config):
        cfg = config_from_dict(_merge(cfg_or_path.to_dict(), over))
    else:
        cfg = load_config(cfg_or_path, over)
    if out is None:
        out = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method.name}"
    Simulation(cfg, out, progress=progress).run()
    return load_run(out)


def load_run(path: str | Path) -> Run:
    """Read a run directory: config, metrics (DataFrame), summary."""
    import pandas as pd

    from fedlora.export import run_config
    from fedlora.rundir import RunDirError, read_jsonl

    d = Path(path)
    if not (d / "config.yaml").is_file():
        raise RunDirError(f"{d} is not a run directory (no config.yaml)")
    summary_path = d / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(d, run_config(d), pd.DataFrame(read_jsonl(d / "metrics.jsonl")), summary)
