"""Run directories: resolved config, metrics.jsonl, ledger.jsonl, summary.json, checkpoints.

Checkpoints are safetensors (tensors) + JSON (everything else), written atomically;
nothing is ever unpickled. Resuming truncates the JSONL logs back to the
checkpoint's round so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"


class RunDirError(RuntimeError):
    pass


def prepare(out: Path, resume: bool, create: bool = True) -> Path:
    """Refuse to overwrite a run; `create=False` only checks (a run whose config or task
    then fails must not leave an empty directory behind)."""
    out = Path(out)
    if not resume and (out / "metrics.jsonl").exists():
        raise RunDirError(
            f"{out} already holds a run; resume it with `fedlora resume {out}` or choose "
            "another --out (nothing was changed)"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines; a trailing partial line (a crash mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_jsonl(path: Path, last_round: int) -> None:
    rows = [r for r in read_jsonl(path) if r.get("round", 0) <= last_round]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = out / (CKPT_TENSORS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / CKPT_TENSORS)
    write_json(out / CKPT_META, meta)  # written second: a meta file implies its tensors


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta_path = out / CKPT_META
    if not meta_path.exists():
        raise RunDirError(f"{out} has no checkpoint to resume from ({CKPT_META} missing)")
    return load_file(str(out / CKPT_TENSORS)), json.loads(meta_path.read_text())
