"""Metric sinks besides metrics.jsonl: TensorBoard event files and MLflow (both optional).

Install with `pip install 'fedlora[log]'`. Every numeric field of a metrics row is logged at
step = round: byte counts under `bytes/`, everything else under `metrics/`; the task's
utility is also logged under `vs_upload_bytes/` with step = cumulative upload bytes, so
TensorBoard can draw utility against bytes. MLflow gets the same scalars (keys as in
metrics.jsonl) and the flattened config as parameters, in a local store RUN/mlflow.db.
When mlflow is not installed the run goes on without it and says so once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora")
INSTALL = "pip install 'fedlora[log]'"


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (lists, None and the round itself left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> strings (MLflow parameters are strings)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)
    return out


class TensorBoardSink:
    """SummaryWriter into RUN/tensorboard; a resumed run purges the steps it redoes."""

    def __init__(self, out: Path, utility: str, first_round: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(f"log.tensorboard: the tensorboard package is not installed "
                              f"({INSTALL})") from None
        self.utility = utility
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_round)
        self.writer.add_custom_scalars({"fedlora": {
            utility: ["Multiline", [f"metrics/{utility}"]],
            "upload vs download bytes": ["Multiline", ["bytes/cum_upload_bytes",
                                                       "bytes/cum_download_bytes"]],
            f"{utility} vs upload bytes": ["Multiline", [f"vs_upload_bytes/{utility}"]],
        }})

    def log(self, row: dict[str, Any]) -> None:
        t = int(row["round"])
        values = numeric(row)
        for k, v in values.items():
            group = "bytes" if k.endswith("_bytes") else "metrics"
            self.writer.add_scalar(f"{group}/{k}", v, t)
        if self.utility in values and "cum_upload_bytes" in values:
            self.writer.add_scalar(f"vs_upload_bytes/{self.utility}", values[self.utility],
                                   int(values["cum_upload_bytes"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tracking_uri(out: Path) -> str:
    """The run's local MLflow store: RUN/mlflow.db (SQLite, MLflow's default local backend;
    its file store is deprecated), artifacts under RUN/mlruns. `mlflow ui --backend-store-uri`
    this URI shows it."""
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


class MLflowSink:
    """An MLflow run in the local store RUN/mlflow.db (experiment `fedlora`)."""

    def __init__(self, out: Path, config: dict, resume: bool):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(out))
        if mlflow.get_experiment_by_name("fedlora") is None:
            mlflow.create_experiment("fedlora", (out / "mlruns").resolve().as_uri())
        mlflow.set_experiment("fedlora")
        id_file = out / "mlflow_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=out.name)
        id_file.write_text(self.run.info.run_id)
        if run_id is None:
            mlflow.log_params(flat_params(config))

    def log(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in numeric(row).items()},
                                step=int(row["round"]))

    def close(self) -> None:
        self.mlflow.end_run()


def mlflow_available() -> bool:
    """Whether mlflow can be imported (checked without importing it: it is slow to load)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def open_sinks(cfg, out: Path, utility: str, first_round: int) -> list:
    """The sinks `cfg.log` asks for. TensorBoard missing is an error (it was asked for);
    MLflow missing is a warning, so a config shared with a machine without it still runs."""
    sinks: list = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(out, utility, first_round))
    if cfg.log.mlflow:
        if mlflow_available():
            sinks.append(MLflowSink(out, cfg.to_dict(), resume=first_round > 1))
        else:
            log.warning("log.mlflow: mlflow is not installed, so this run is not logged to "
                        "MLflow (metrics.jsonl has every value); install it with %s", INSTALL)
    return sinks
