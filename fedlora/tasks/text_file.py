"""`text-file`: bring your own JSONL, CSV or Parquet with `text`, `label` [, `client`]."""

from __future__ import annotations

from pathlib import Path

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, minilm_dir, resolve
from fedlora.tasks._text_common import BadRows, read_checked
from fedlora.tasks.base import Examples, resolve_device
from fedlora.tasks.text import TextClassification

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_table(path: str | None, required: tuple[str, ...], optional: tuple[str, ...] = (),
               *, on_bad_rows: str = "error", nonempty: tuple[str, ...] = ()):
    """A pandas DataFrame with every row checked (see :func:`read_table_checked`)."""
    return read_table_checked(path, required, optional, on_bad_rows=on_bad_rows,
                              nonempty=nonempty)[0]


def read_table_checked(path: str | None, required: tuple[str, ...],
                       optional: tuple[str, ...] = (), *, on_bad_rows: str = "error",
                       nonempty: tuple[str, ...] = ()) -> tuple[object, BadRows]:
    """(DataFrame, skipped-row report): a bad row raises naming the file, line/row and column,
    or with ``on_bad_rows="skip"`` is counted and left out (fedlora/tasks/_text_common.py)."""
    if not path:
        raise MissingResource("task.path: this task reads a local file; set task.path=FILE")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingResource(f"task.path: file not found: {p}")
    kind = READERS.get(p.suffix.lower())
    if kind is None:
        raise ValueError(f"task.path: unsupported file type '{p.suffix}' "
                         f"(valid: {', '.join(READERS)})")
    return read_checked(p, kind, required, optional, on_bad_rows=on_bad_rows, nonempty=nonempty)


def load_examples(path: str | None, on_bad_rows: str = "error", *, text: str = "text",
                  label: str = "label", client: str = "client") -> Examples:
    """The file's examples with every row checked; column names as configured."""
    df, bad = read_table_checked(path, (text, label), (client,), on_bad_rows=on_bad_rows,
                                 nonempty=(text,))
    check_classes(path, df[label].tolist(), bad, label)
    clients = df[client].astype(str).tolist() if client in df.columns else None
    examples = Examples(df[text].astype(str).tolist(), df[label].tolist(), clients)
    examples.bad_rows = bad.to_dict()  # reported in the log and summary.json
    return examples


def check_classes(path: str | None, labels: list, bad: BadRows, column: str = "label") -> None:
    """A classification file needs at least two classes (after skipped rows)."""
    classes = {str(x) for x in labels}
    if len(classes) < 2:
        skipped = f" after skipping {bad.count} bad row(s)" if bad.count else ""
        raise ValueError(f"task.path: {path} column {column!r} has only one class "
                         f"({next(iter(classes), None)!r}){skipped}; a classifier needs two")


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
        try:
            return load_examples(t.path, t.on_bad_rows, text=text, label=label, client=client)
        except ValueError as e:  # name the config field that chose a missing column
            if (text, label) != ("text", "label") and "lacks column" in str(e):
                raise ValueError(f"{e}; set task.text_column / task.label_column") from None
            raise
    clients = df[client].astype(str).tolist() if client in df.columns else None
    return Examples(df[text].astype(str).tolist(), df[label].tolist(), clients, is_test)


def build(cfg: Config) -> TextClassification:
    examples = load_task_examples(cfg)
    backbone = resolve(cfg.model.name, minilm_dir() if cfg.model.name is None else None)
    task = TextClassification(cfg, examples, backbone, resolve_device(cfg.device))
    task.bad_rows = getattr(examples, "bad_rows", None)  # the engine copies it into summary
    return task
