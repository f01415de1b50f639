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


def load_task_examples(cfg: Config) -> Examples:
    """`task.path` as a file or a `datasets` folder, with the configured column names."""
    from fedlora.tasks.hf_datasets import (
        FILE_SUFFIXES,
        check_columns,
        hub_name_error,
        is_dataset_folder,
        read_dataset_folder,
    )

    t = cfg.task
    text, label, client = t.text_column, t.label_column, t.client_column
    if t.path and is_dataset_folder(t.path):
        df, is_test = read_dataset_folder(t.path, t.split)
        check_columns(df, str(t.path), [text, label],
                      {text: "task.text_column", label: "task.label_column"})
    else:
        if t.path and not Path(t.path).expanduser().exists() \
                and Path(t.path).suffix.lower() not in FILE_SUFFIXES:
            raise hub_name_error(t.path)
        if t.split is not None:
            raise ValueError("task.split: only a datasets folder (save_to_disk) has splits; "
                             f"{t.path} is a file")
        if (text, label, client) == ("text", "label", "client"):
            return load_examples(t.path)
        try:
            df = read_table(t.path, (text, label), (client,))
        except ValueError as e:  # name the config field that chose the missing column
            raise ValueError(f"{e}; set task.text_column / task.label_column") from None
        is_test = None
    clients = df[client].astype(str).tolist() if client in df.columns else None
    return Examples(df[text].astype(str).tolist(), df[label].tolist(), clients, is_test)


def build(cfg: Config) -> TextClassification:
    examples = load_task_examples(cfg)
    backbone = resolve(cfg.model.name, minilm_dir() if cfg.model.name is None else None)
    return TextClassification(cfg, examples, backbone, resolve_device(cfg.device))
