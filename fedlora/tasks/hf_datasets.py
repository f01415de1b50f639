"""Hugging Face `datasets` folders (`save_to_disk`) as task input, read offline with pyarrow.

A `Dataset.save_to_disk(DIR)` folder holds `state.json` (its Arrow files) and
`dataset_info.json` (features: a `ClassLabel`'s names); a `DatasetDict` folder holds
`dataset_dict.json` and one such folder per split. The Arrow files are Arrow IPC streams,
so pyarrow reads them without the `datasets` package (nothing is unpickled). A hub name is
never downloaded: the error says how to save it to a folder on a connected machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora.model.backbone import MissingResource

# Split names taken as the held-out test split when `task.split` is unset, in this order.
TEST_SPLITS = ("test", "validation", "valid", "dev")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_dataset_folder(path: str | Path) -> bool:
    """Whether `path` is a folder written by `Dataset`/`DatasetDict.save_to_disk`."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def hub_name_error(path: str, field: str = "task.path") -> MissingResource:
    """The error for a name that is neither a file nor a folder here (maybe a hub dataset)."""
    return MissingResource(
        f"{field}: '{path}' is neither a local file nor a folder. Data is read offline only: "
        f"for a Hugging Face dataset, on a machine with internet run `python -c \"import "
        f"datasets; datasets.load_dataset('{path}').save_to_disk('DIR')\"`, copy DIR here and "
        f"set {field}=DIR (add task.split=NAME to pick one split)")


def _arrow(folder: Path):
    """One saved Dataset's Arrow table (its schema metadata keeps the `datasets` features)."""
    import pyarrow as pa

    state = json.loads((folder / "state.json").read_text())
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise ValueError(f"{folder}/state.json lists no data files")
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    return pa.concat_tables(tables)


def arrow_splits(path: str | Path, split: str | None) -> list[tuple[str, object, str | None]]:
    """(name, Arrow table, "train"/"test"/None) per split to read, chosen as
    `read_dataset_folder` chooses them; for tasks that decode their own columns (images)."""
    p = Path(path).expanduser()
    if (p / "state.json").is_file():
        if split is not None:
            raise ValueError(f"task.split: {p} is a single Dataset, not a DatasetDict; "
                             f"leave task.split unset")
        return [(str(p), _arrow(p), None)]
    splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
    if split is not None:
        if split not in splits:
            raise ValueError(f"task.split: {p} has no split {split!r} (has: {splits})")
        return [(str(p / split), _arrow(p / split), None)]
    if "train" not in splits:
        raise ValueError(f"task.split: {p} has no 'train' split (has: {splits}); set "
                         f"task.split to the one to use")
    test = next((s for s in TEST_SPLITS if s in splits), None)
    out = [(str(p / "train"), _arrow(p / "train"), "train")]
    if test is not None:
        out.append((str(p / test), _arrow(p / test), "test"))
    return out


def _read_split(folder: Path):
    """One saved Dataset as a pandas DataFrame, ClassLabel ints replaced by their names."""
    df = _arrow(folder).to_pandas()
    info_path = folder / "dataset_info.json"
    features = json.loads(info_path.read_text()).get("features", {}) if info_path.is_file() else {}
    for col, feat in (features or {}).items():
        names = feat.get("names") if isinstance(feat, dict) else None
        if feat.get("_type") == "ClassLabel" and names and col in df.columns:
            df[col] = [names[int(v)] if v is not None and v >= 0 else None for v in df[col]]
    return df


def read_dataset_folder(path: str | Path, split: str | None, field: str = "task.path"):
    """(DataFrame, is_test or None) from a `save_to_disk` folder.

    A DatasetDict with `split` set gives that split alone (the task holds out its own test
    examples); unset, `train` trains and the first of test/validation/valid/dev that exists
    is the fixed test split. A single Dataset is read whole (`split` must then be unset).
    """
    import pandas as pd

    p = Path(path).expanduser()
    if (p / "state.json").is_file():
        if split is not None:
            raise ValueError(f"task.split: {p} is a single Dataset, not a DatasetDict; "
                             f"leave task.split unset")
        return _read_split(p), None
    splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
    if split is not None:
        if split not in splits:
            raise ValueError(f"task.split: {p} has no split {split!r} (has: {splits})")
        return _read_split(p / split), None
    if "train" not in splits:
        raise ValueError(f"task.split: {p} has no 'train' split (has: {splits}); set "
                         f"task.split to the one to use")
    test = next((s for s in TEST_SPLITS if s in splits), None)
    train_df = _read_split(p / "train")
    if test is None:
        return train_df, None
    test_df = _read_split(p / test)
    is_test = np.r_[np.zeros(len(train_df), bool), np.ones(len(test_df), bool)]
    return pd.concat([train_df, test_df], ignore_index=True), is_test


def check_columns(df, where: str, required: list[str], field_for: dict[str, str]) -> None:
    """Raise naming the missing column, the config field that chose it, and the columns."""
    for col in required:
        if col not in df.columns:
            raise ValueError(f"{field_for.get(col, 'task.path')}: {where} has no column {col!r} "
                             f"(columns: {list(df.columns)})")
        bad = df[col].isna()
        if bad.any():
            raise ValueError(f"{where} row {int(np.flatnonzero(bad.to_numpy())[0])} has an "
                             f"empty {col!r}")
