"""Shared plumbing for the paper's text tasks: splits, partitions, tokenizers, backbones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedlora.config import Config
from fedlora.model.backbone import resolve
from fedlora.tasks.base import (  # noqa: F401 (re-export)
    default_partition,
    partition_clients,
    train_test,
)

# The paper's text backbone (GPT-2 small, 124M). A hub id: `resolve` finds it in the local
# Hugging Face cache or says which folder to pass as model.name.
GPT2 = "gpt2"
# LoRA targets per architecture: K,V,Q (`c_attn`) for GPT-2 (paper B.3), Q,V elsewhere.
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
           "qwen2": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
           "bert": ["query", "value"], "roberta": ["query", "value"],
           "distilbert": ["q_lin", "v_lin"]}
SPLIT_VALUES = {"train": False, "test": True}


def gpt2_backbone(cfg: Config) -> str:
    """`model.name`, or GPT-2 small when unset; errors clearly when it is not on disk."""
    return resolve(cfg.model.name or GPT2, None)


def default_targets(model_type: str) -> list[str]:
    return TARGETS.get(model_type, ["q_proj", "v_proj"])


def partition(cfg: Config, n_train: int, train_labels: np.ndarray | None,
              train_clients: list | None) -> tuple[Sequence[np.ndarray], np.ndarray]:
    """`task.partition` over the training examples; next-token tasks have no labels to skew."""
    default_partition(cfg, train_clients is not None, train_labels is not None)
    if train_labels is None:
        if cfg.task.partition == "dirichlet":
            raise ValueError(f"task.partition: task '{cfg.task.name}' is next-token prediction "
                             "and has no labels for a Dirichlet split; use natural (its own "
                             "users/roles), iid_mix or iid")
        train_labels = np.zeros(n_train, dtype=np.int64)
    return partition_clients(cfg, train_labels, train_clients, cfg.seed)


def split_column(values, where: str) -> np.ndarray:
    """An optional `split` column ("train"/"test") as a boolean is_test array."""
    out = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        key = str(v).strip().lower()
        if key not in SPLIT_VALUES:
            raise ValueError(f"task.path: {where} row {i} has split={v!r}; expected "
                             f"'train' or 'test'")
        out[i] = SPLIT_VALUES[key]
    return out


def load_tokenizer(backbone: str):
    """The backbone's tokenizer with a pad token (GPT-2 has none: its EOS is used; padding
    is masked by length everywhere, so the pad id never reaches a loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"model.name: the tokenizer of {backbone} has neither a pad nor an "
                             "EOS token")
        tok.pad_token = tok.eos_token
    return tok


def start_token(tok) -> int | None:
    """The token that starts every sequence, so the first real token is predicted too."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def pack(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 matrix (width = longest row) and the row lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), int(lengths.max(initial=1))), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths


# ---------------------------------------------------------------- row validation
# Data files are messy. Every row of a local table is checked before anything is trained on
# it: a row that is not JSON, not UTF-8, lacks a required value, or has an empty text either
# stops the run with the file, line/row and column named (task.on_bad_rows=error, the
# default) or is skipped and counted (skip); the count reaches the log and summary.json.

ON_BAD_ROWS = ("error", "skip")
_BOM = b"\xef\xbb\xbf"


class BadRows:
    """Skipped rows of one file: a count per reason and the first few, named."""

    def __init__(self, path: Path, mode: str):
        if mode not in ON_BAD_ROWS:
            raise ValueError(f"task.on_bad_rows: must be error or skip, got {mode!r}")
        self.path, self.mode = path, mode
        self.count = 0
        self.reasons: dict[str, int] = {}
        self.examples: list[str] = []
        self._first: tuple[int, str] | None = None  # error mode: the earliest bad row

    def add(self, where: str, column: str | None, reason: str, order: int = 1 << 62) -> None:
        """Record one bad row (``order``: its line in the file, to report the first one)."""
        col = f" column {column!r}" if column else ""
        msg = f"{self.path} {where}{col}: {reason}"
        if self._first is None or order < self._first[0]:
            self._first = (order, msg)
        self.count += 1
        key = f"{column}: {reason.split(' (')[0]}" if column else reason.split(" (")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(msg)

    def raise_in_error_mode(self) -> None:
        """In error mode, the first bad row in file order stops the run, named."""
        if self.mode == "error" and self._first is not None:
            raise ValueError(f"task.path: {self._first[1]} (set task.on_bad_rows=skip to skip "
                             "and count such rows)")

    def to_dict(self) -> dict:
        return {"file": str(self.path), "skipped": self.count, "reasons": dict(self.reasons),
                "examples": list(self.examples)}


def _jsonl_records(p: Path, bad: BadRows) -> list[tuple[str, dict, int]]:
    """(where, object, line) per non-blank line; undecodable or non-object lines go to `bad`."""
    import json

    data = p.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    out = []
    for i, raw in enumerate(data.split(b"\n"), 1):
        where = f"line {i}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(where, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1})", i)
            continue
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no row
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add(where, None, f"not valid JSON ({e.msg} at column {e.colno})", i)
            continue
        if not isinstance(obj, dict):
            bad.add(where, None, f"not a JSON object (got {type(obj).__name__})", i)
            continue
        out.append((where, obj, i))
    return out


def _csv_records(p: Path, bad: BadRows) -> list[tuple[str, dict, int]]:
    """CSV rows as strings (a UTF-8 BOM is accepted); non-UTF-8 lines and rows with the
    wrong number of fields go to `bad`."""
    import io

    import pandas as pd

    data = p.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    lines = data.split(b"\n")
    kept = []
    for i, raw in enumerate(lines, 1):
        try:
            kept.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if i == 1:
                raise ValueError(f"task.path: {p} line 1 (the header) is not valid UTF-8 "
                                 f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            bad.add(f"line {i}", None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                       f"{e.start + 1})", i)
    ragged: list[list[str]] = []

    def on_bad_line(fields: list[str]) -> None:
        ragged.append(fields)
        return None

    try:
        df = pd.read_csv(io.StringIO("\n".join(kept)), dtype=str, keep_default_na=False,
                         na_filter=False, engine="python", on_bad_lines=on_bad_line)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"task.path: {p} is not a readable CSV ({e})") from None
    for fields in ragged:
        bad.add("a row", None, f"has {len(fields)} fields, the header has {len(df.columns)} "
                               f"(starts {','.join(fields)[:40]!r})")
    return [(f"row {i + 1}", {k: (None if v == "" else v) for k, v in rec.items()}, i + 2)
            for i, rec in enumerate(df.to_dict("records"))]  # an empty CSV cell is missing


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def check_rows(p: Path, records: list[tuple[str, dict, int]], required: tuple[str, ...],
               optional: tuple[str, ...], nonempty: tuple[str, ...], bad: BadRows):
    """The records that pass every check, as a DataFrame of the required and optional
    columns; each failing row goes to `bad` (which raises in error mode)."""
    import pandas as pd

    present = set().union(*(r.keys() for _, r, _ in records)) if records else set()
    missing = [c for c in required if c not in present]
    if missing:
        bad.raise_in_error_mode()  # a broken line may be why a column seems absent
        raise ValueError(f"task.path: {p} lacks column(s) {missing} (has: {sorted(present)})")
    keep = [c for c in (*required, *optional) if c in present]
    rows = []
    for where, rec, order in records:
        problem = None
        for c in required:
            v = rec.get(c)
            if _missing(v):
                problem = (c, "is missing")
            elif c in nonempty and not isinstance(v, str):
                problem = (c, f"must be text, got {type(v).__name__} {v!r:.30}")
            elif c in nonempty and not v.strip():
                problem = (c, "is empty")
            elif not isinstance(v, str | int | float | bool):
                problem = (c, f"must be a single value, got {type(v).__name__}")
            if problem:
                break
        if problem:
            bad.add(where, *problem, order)
            continue
        rows.append([rec.get(c) for c in keep])
    bad.raise_in_error_mode()
    if not rows:
        raise ValueError(f"task.path: {p} has no valid rows ({bad.count} skipped: "
                         f"{bad.reasons})")
    return pd.DataFrame(rows, columns=keep)


def read_checked(p: Path, kind: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
                 *, on_bad_rows: str = "error", nonempty: tuple[str, ...] = ()):
    """(DataFrame, BadRows) of a JSONL/JSON/CSV/Parquet table, every row checked."""
    import pandas as pd

    bad = BadRows(p, on_bad_rows)
    if kind == "json" and p.suffix.lower() == ".jsonl":
        records = _jsonl_records(p, bad)
    elif kind == "csv":
        records = _csv_records(p, bad)
    else:
        try:
            df = pd.read_json(p) if kind == "json" else pd.read_parquet(p)
        except (ValueError, OSError) as e:
            raise ValueError(f"task.path: {p} is not a readable {kind} table ({e})") from None
        records = [(f"row {i + 1}", {k: _plain(v) for k, v in rec.items()}, i + 1)
                   for i, rec in enumerate(df.to_dict("records"))]
    df = check_rows(p, records, required, optional, nonempty, bad)
    if bad.count:
        import logging

        logging.getLogger("fedlora").warning(
            "%s: skipped %d bad row(s) (task.on_bad_rows=skip): %s; first: %s", p, bad.count,
            bad.reasons, bad.examples[0])
    return df, bad


def _plain(v):
    """numpy scalars from pandas as Python values, so type checks read the same for every
    format (a Parquet int64 label is an int, a float NaN is missing)."""
    return v.item() if isinstance(v, np.generic) else v
