"""`text-file`: bring your own JSONL, CSV or Parquet with `text`, `label` [, `client`]."""

from __future__ import annotations

from pathlib import Path

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, minilm_dir, resolve
from fedlora.tasks.base import Examples, resolve_device
from fedlora.tasks.text import TextClassification

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_table(path: str | None, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """A pandas DataFrame with the required columns checked, naming the file and column."""
    import pandas as pd

    if not path:
        raise MissingResource("task.path: this task reads a local file; set task.path=FILE")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingResource(f"task.path: file not found: {p}")
    kind = READERS.get(p.suffix.lower())
    if kind is None:
        raise ValueError(f"task.path: unsupported file type '{p.suffix}' "
                         f"(valid: {', '.join(READERS)})")
    if kind == "json":
        df = pd.read_json(p, lines=p.suffix.lower() == ".jsonl")
    elif kind == "csv":
        df = pd.read_csv(p)
    else:
        df = pd.read_parquet(p)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"task.path: {p} lacks column(s) {missing} "
                         f"(has: {list(df.columns)})")
    bad = df[list(required)].isna().any(axis=1)
    if bad.any():
        raise ValueError(f"task.path: {p} row {int(bad.idxmax())} has an empty "
                         f"{[c for c in required if df[c].isna().any()][0]!r}")
    keep = [c for c in (*required, *optional) if c in df.columns]
    return df[keep]


def load_examples(path: str | None) -> Examples:
    df = read_table(path, ("text", "label"), ("client",))
    clients = df["client"].astype(str).tolist() if "client" in df.columns else None
    return Examples(df["text"].astype(str).tolist(), df["label"].tolist(), clients)


def build(cfg: Config) -> TextClassification:
    examples = load_examples(cfg.task.path)
    backbone = resolve(cfg.model.name, minilm_dir() if cfg.model.name is None else None)
    return TextClassification(cfg, examples, backbone, resolve_device(cfg.device))
