"""Load run directories and group them into seed groups.

A run directory (written by the engine) holds ``config.yaml``, ``metrics.jsonl``
(one JSON object per round) and ``summary.json``. Runs crash, get resumed and
get copied around, so loading is forgiving: a missing summary is rebuilt from
the metrics, a truncated last line is ignored, and a resumed run that repeated
rounds keeps the last record of each round.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

# Utility metrics in order of preference, with their direction (True = higher is better).
UTILITY_METRICS: dict[str, bool] = {
    "accuracy": True,
    "perplexity": False,
    "micro_f1": True,
    "macro_f1": True,
    "loss": False,
}
BYTE_COLUMNS = ("upload_bytes", "download_bytes", "cum_upload_bytes", "cum_download_bytes")
# Top-level config keys that never make two runs "different experiments".
IGNORED_KEYS = (
    "seed",
    "device",
    "checkpoint_every",
    "eval_batch_size",
    "out_dir",
    "output_dir",
    "run_dir",
    "run_name",
    "resume",
)
# The method settings each method actually uses. The resolved config carries every field
# (a LoRA run still says d_up: 0.25), so labels and densities read only these.
METHOD_KEYS: dict[str, tuple[str, ...]] = {  # the settings each method actually uses
    "lora": (),
    "flasc": ("d_down", "d_up"),
    "sparse_adapter": ("density",),
    "federated_select": ("density",),
    "adapter_lth": ("prune_ratio", "prune_every"),
    "ffa_lora": (),
    "full_finetune": (),
    "fedsparsify": ("prune_ratio", "prune_every"),
    "spdst": ("density",),
    "federated_select_backbone": ("density",),
    "flora_two_stage": ("stage1_rounds", "stage1_density"),
}
UPLOAD_DENSITY_KEY = {"flasc": "d_up", "sparse_adapter": "density", "federated_select": "density",
                      "spdst": "density", "federated_select_backbone": "density"}
DENSITY_KEYS = ("d_down", "d_up", "density")


@dataclass
class Run:
    """One run directory, loaded."""

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    summary: dict[str, Any]
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = run_label(self.config) or self.path.name

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def method(self) -> str:
        return str(_get(self.config, "method.name", "?"))

    @property
    def rank(self) -> int | None:
        return _get(self.config, "model.rank")

    @property
    def density(self) -> float:
        """Upload density: what FLASC-S and the Pareto view vary (1.0 for dense methods)."""
        method = self.config.get("method") or {}
        key = UPLOAD_DENSITY_KEY.get(str(method.get("name")))
        return float(method[key]) if key and method.get(key) is not None else 1.0

    @property
    def finished(self) -> bool:
        return bool(self.summary.get("finished", False))

    @property
    def total_upload_bytes(self) -> int:
        fallback = _last(self.metrics, "cum_upload_bytes", 0)
        return int(self.summary.get("total_upload_bytes", fallback))

    @property
    def total_download_bytes(self) -> int:
        fallback = _last(self.metrics, "cum_download_bytes", 0)
        return int(self.summary.get("total_download_bytes", fallback))

    @property
    def rounds(self) -> int:
        return int(self.summary.get("rounds", _last(self.metrics, "round", 0)))

    def final(self, metric: str) -> float:
        """Final value of ``metric``: the summary's, else the last evaluated round's."""
        value = (self.summary.get("final") or {}).get(metric)
        if value is None:
            value = _last(self.metrics, metric, math.nan)
        return float(value)

    def curve(self, metric: str) -> pd.DataFrame:
        """Evaluated rounds only: columns round, cum_upload_bytes, <metric>."""
        if metric not in self.metrics:
            return pd.DataFrame(columns=["round", "cum_upload_bytes", metric])
        df = self.metrics[["round", "cum_upload_bytes", metric]]
        return df[df[metric].notna()].reset_index(drop=True)


@dataclass
class SeedGroup:
    """Runs whose configs are identical except for the seed."""

    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    @property
    def rank(self) -> int | None:
        return self.runs[0].rank

    @property
    def density(self) -> float:
        return self.runs[0].density


# ---------------------------------------------------------------------------- loading


def read_per_client(path: str | Path) -> dict[str, Any] | None:
    """The last per-client evaluation of a run (personal.jsonl, `eval.personalized`): its
    round, metric, clients and per-client values of the global, deployed and local-only
    models; None when the run did not evaluate per client."""
    f = Path(path) / "personal.jsonl"
    if not f.exists():
        return None
    last = None
    for line in f.read_text().splitlines():
        try:
            last = json.loads(line)
        except json.JSONDecodeError:
            break  # a trailing partial line (a crash mid-write)
    return last


def load_run(path: str | Path) -> Run:
    """Load one run directory; raises FileNotFoundError if it has no metrics and no summary."""
    path = Path(path)
    if not (path / "metrics.jsonl").exists() and not (path / "summary.json").exists():
        raise FileNotFoundError(f"{path} is not a run directory (no metrics.jsonl/summary.json)")
    config = _read_yaml(path / "config.yaml")
    metrics = read_metrics(path / "metrics.jsonl")
    summary = _read_summary(path / "summary.json", metrics)
    return Run(path=path, config=config, metrics=metrics, summary=summary)


def load_runs(paths: Iterable[str | Path | Run]) -> list[Run]:
    """Load runs; a directory that is not itself a run is searched (recursively) for runs."""
    runs: list[Run] = []
    for p in paths:
        if isinstance(p, Run):
            runs.append(p)
        elif _is_run_dir(Path(p)):
            runs.append(load_run(p))
        else:
            found = sorted(d.parent for d in Path(p).rglob("metrics.jsonl"))
            if not found:
                raise FileNotFoundError(f"no run directories under {p}")
            runs.extend(load_run(d) for d in found)
    return runs


def read_metrics(path: str | Path) -> pd.DataFrame:
    """Parse metrics.jsonl into a DataFrame sorted by round (one row per round)."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A crash mid-write leaves a partial last line: expected, so stay quiet.
            if k != len(lines) - 1:
                warnings.warn(f"{path}:{lineno}: skipping malformed line", stacklevel=2)
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return pd.DataFrame(columns=["round", *BYTE_COLUMNS, "wall_s"])
    # A resumed run may re-log rounds; the last record of a round wins.
    df = df.drop_duplicates("round", keep="last").sort_values("round").reset_index(drop=True)
    for col in ("round", *BYTE_COLUMNS):
        if col in df:
            df[col] = df[col].astype("int64")
    return df


def _read_summary(path: Path, metrics: pd.DataFrame) -> dict[str, Any]:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            warnings.warn(f"{path}: unreadable summary, rebuilding from metrics", stacklevel=3)
    return summary_from_metrics(metrics)


def summary_from_metrics(metrics: pd.DataFrame) -> dict[str, Any]:
    """What summary.json would say, for a run that crashed before writing it."""
    final = {m: _last(metrics, m, None) for m in (*UTILITY_METRICS, "epsilon") if m in metrics}
    return {
        "final": {k: v for k, v in final.items() if v is not None},
        "total_upload_bytes": int(_last(metrics, "cum_upload_bytes", 0)),
        "total_download_bytes": int(_last(metrics, "cum_download_bytes", 0)),
        "rounds": int(_last(metrics, "round", 0)),
        "finished": False,
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "summary.json").exists()


# ---------------------------------------------------------------------------- labels, groups


def fmt_density(d: float) -> str:
    """0.25 -> '1/4', 0.0625 -> '1/16', 0.3 -> '0.3': densities are usually 1/2^k."""
    frac = Fraction(d).limit_denominator(1024)
    if frac.numerator == 1 and abs(float(frac) - d) < 1e-9:
        return f"1/{frac.denominator}" if frac.denominator != 1 else "1"
    return f"{d:g}"


def run_label(config: dict[str, Any]) -> str:
    """Short human label from method, rank and the method's own knobs: 'flasc r16 d_up=1/4'.

    Densities of 1 and ``prune_every=1`` are left out; unknown methods show only the rank
    (:func:`group_by_seed` appends whatever tells two groups apart).
    """
    method = config.get("method") or {}
    name = str(method.get("name", ""))
    parts = [name]
    rank = _get(config, "model.rank")
    if rank is not None:
        parts.append(f"r{rank}")
    for key in METHOD_KEYS.get(name, ()):
        value = method.get(key)
        if value is None or (float(value) == 1.0 and (key in DENSITY_KEYS or key == "prune_every")):
            continue
        shown = fmt_density(float(value)) if key in DENSITY_KEYS else f"{value:g}"
        parts.append(f"{key}={shown}")
    return " ".join(p for p in parts if p)


def group_key(config: dict[str, Any], ignore: Sequence[str] = IGNORED_KEYS) -> str:
    """Canonical JSON of the config minus seed-like keys: equal keys = same experiment."""
    stripped = {k: v for k, v in config.items() if k not in ignore}
    return json.dumps(stripped, sort_keys=True, default=str)


def group_by_seed(runs: Sequence[Run], ignore: Sequence[str] = IGNORED_KEYS) -> list[SeedGroup]:
    """Group runs differing only by seed; groups keep first-seen order, labels made unique."""
    groups: dict[str, SeedGroup] = {}
    for run in runs:
        key = group_key(run.config, ignore)
        groups.setdefault(key, SeedGroup(label=run.label)).runs.append(run)
    out = list(groups.values())
    _disambiguate(out, ignore)
    for g in out:
        g.runs.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
    return out


def _disambiguate(groups: list[SeedGroup], ignore: Sequence[str]) -> None:
    """Groups sharing a label get the config entries that tell them apart appended."""
    by_label: dict[str, list[SeedGroup]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for label, same in by_label.items():
        if len(same) < 2:
            continue
        flats = [_flatten({k: v for k, v in g.config.items() if k not in ignore}) for g in same]
        keys = sorted(set().union(*flats))
        differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        for g, flat in zip(same, flats, strict=True):
            extra = " ".join(f"{k.split('.')[-1]}={flat.get(k)}" for k in differing)
            g.label = f"{label} {extra}".strip() if extra else label
        if len({g.label for g in same}) < len(same):  # still ambiguous: number them
            for i, g in enumerate(same):
                g.label = f"{g.label} #{i + 1}"


# ---------------------------------------------------------------------------- metrics


def metric_direction(metric: str) -> bool:
    """True if higher is better; unknown metrics are 'higher is better' unless loss-like."""
    if metric in UTILITY_METRICS:
        return UTILITY_METRICS[metric]
    return not any(s in metric for s in ("loss", "perplexity", "ppl", "error", "epsilon"))


def choose_metric(runs: Sequence[Run], metric: str | None = None) -> tuple[str, bool]:
    """The utility metric to report and whether higher is better.

    Auto-choice takes the ``utility`` the runs' summaries declare (if they agree), else the
    first of accuracy, perplexity, micro_f1, macro_f1, loss that every run logs (else any).
    """
    if metric is not None:
        return metric, metric_direction(metric)
    declared = {r.summary.get("utility") for r in runs}  # the engine names the task's metric
    if len(declared) == 1 and None not in declared:
        metric = declared.pop()
        return metric, metric_direction(metric)
    logged = [set(r.metrics.columns) | set(r.summary.get("final") or {}) for r in runs]
    for pick in (set.intersection, set.union):
        available = pick(*logged) if logged else set()
        for m, higher in UTILITY_METRICS.items():
            if m in available:
                return m, higher
    raise ValueError("no utility metric (accuracy/perplexity/micro_f1/...) found in the runs")


# ---------------------------------------------------------------------------- helpers


def _get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _last(df: pd.DataFrame, col: str, default: Any) -> Any:
    if col not in df:
        return default
    s = df[col].dropna()
    if not len(s):
        return default
    value = s.iloc[-1]
    return value.item() if hasattr(value, "item") else value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
