"""Run directories: resolved config, metrics.jsonl, ledger.jsonl, summary.json, checkpoints.

Crash safety (docs/reliability.md):

* A checkpoint is ONE file, ``checkpoint.safetensors``: the tensors plus, in the safetensors
  header metadata, the JSON state (round, n, server and method state) and a SHA-256 of every
  tensor. It is written to a temporary file, fsync'd, and renamed into place; the generation
  it replaces is kept as ``checkpoint.prev.safetensors``. Loading verifies the file (framing,
  no trailing bytes, metadata, checksums, P's shape and dtype) and falls back to the previous
  generation, with a warning naming the file, when the newest one is torn or missing.
* Every other file is replaced atomically (temporary file, fsync, rename). JSONL logs are
  appended and fsync'd; a half-written last line (a kill mid-append) is ignored when read and
  removed on resume, which rewrites the logs back to the checkpoint's round.
* A write that fails (disk full, read-only directory) raises :class:`RunDirError` naming the
  path; the last good checkpoint is never touched by a failed write.
* :class:`RunLock` holds an exclusive lock on ``run.lock`` (with the owner's PID in it) for as
  long as a process writes the directory; a second writer is refused. The operating system
  drops the lock when its owner dies, so a stale lock never blocks a resume.

Nothing is ever unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger("fedlora")

CKPT = "checkpoint.safetensors"
CKPT_PREV = "checkpoint.prev.safetensors"
CKPT_TENSORS = CKPT  # the name before generations existed
CKPT_META = "checkpoint.json"  # legacy (format 1) metadata file, still read
LOCK = "run.lock"
META_KEY = "fedlora.checkpoint"
FORMAT = 2

# Test hook (the kill test): FEDLORA_TEST_KILL_AT_WRITE=i SIGKILLs this process in the
# middle of its i-th durable write (1-based, counted over every write this module makes),
# after the first half of the bytes reached the file. Unset in normal use.
_KILL_ENV = "FEDLORA_TEST_KILL_AT_WRITE"
_writes = 0


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked; the message names the file."""


# ---------------------------------------------------------------- durable writes


def _maybe_kill(f, data: bytes) -> None:
    """The kill test's hook: write half of ``data``, flush, and die as SIGKILL would."""
    global _writes
    at = os.environ.get(_KILL_ENV)
    if not at:
        return
    _writes += 1
    if _writes == int(at):
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), 9)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some network filesystems): the rename still holds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError, extra: str = "") -> RunDirError:
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the filesystem is read-only",
           errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}
    reason = why.get(e.errno, e.strerror or str(e))
    return RunDirError(f"cannot write {path}: {reason} ({type(e).__name__}){extra}")


def write_bytes(path: Path, data: bytes, *, extra: str = "",
                previous: Path | None = None) -> None:
    """Atomically replace ``path`` with ``data``: temporary file, fsync, rename, fsync dir.
    With ``previous``, the file it replaces is kept there (a checkpoint's last generation).

    A failure leaves ``path`` as it was and raises RunDirError naming it (``extra`` is
    appended to the message)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            _maybe_kill(f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _write_error(path, e, extra) from None
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """Atomically replace a text file (UTF-8)."""
    write_bytes(path, text.encode())


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


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


# ---------------------------------------------------------------- JSONL logs


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows durably (flush + fsync); a failure raises RunDirError naming the file."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    try:
        with open(path, "ab") as f:
            _maybe_kill(f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(Path(path), e, "; the run can be resumed once there is room") from None


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines. A last line without its newline (a kill mid-append) is ignored;
    a bad line anywhere else is corruption and raises RunDirError naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{path} line {i} is not valid JSON ({e}); the file is "
                              "corrupted beyond a torn last line") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path} line {i} is not a JSON object")
        rows.append(row)
    if torn:
        log.warning("%s: ignoring a half-written last line (%d bytes) left by an interrupted "
                    "write", path, len(torn))
    return rows


def truncate_jsonl(path: Path, last_round: int) -> None:
    """Keep the rows of rounds <= last_round (and drop a torn last line), atomically."""
    rows = [r for r in read_jsonl(path) if r.get("round", 0) <= last_round]
    write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- checkpoints


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def has_checkpoint(out: Path) -> bool:
    """Whether `out` holds any checkpoint generation (verified only when loaded)."""
    out = Path(out)
    return any((out / f).exists() for f in (CKPT, CKPT_PREV, CKPT_META))


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write one checkpoint atomically; the generation it replaces becomes CKPT_PREV.

    ``meta`` must hold ``round`` and ``n``; ``tensors`` must hold ``P`` (1-D, n entries)."""
    out = Path(out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    P = tensors.get("P")
    if P is not None and not bool(torch.isfinite(P).all()):
        raise RunDirError(f"refusing to checkpoint a non-finite server vector into {out / CKPT}")
    record = {**meta, "format": FORMAT, "sha256": {k: _digest(v) for k, v in tensors.items()}}
    data = st_save(tensors, metadata={META_KEY: json.dumps(record)})
    path = out / CKPT
    keep = "; the last good checkpoint is intact" if path.exists() else ""
    write_bytes(path, data, extra=keep, previous=out / CKPT_PREV)  # keep the previous one
    legacy = out / CKPT_META
    if legacy.exists():  # a format-1 run resumed: its meta file no longer describes CKPT
        legacy.unlink()


def _parse_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify one checkpoint file; RunDirError says what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunDirError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < 8:
        raise RunDirError(f"{path}: truncated ({len(data)} bytes)")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise RunDirError(f"{path}: truncated (header of {hlen} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8 : 8 + hlen])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        record = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path}: not a fedlora checkpoint (bad header: {e})") from None
    body = len(data) - 8 - hlen
    if max(ends, default=0) != body:
        kind = "trailing bytes after the tensors" if body > max(ends, default=0) else "truncated"
        raise RunDirError(f"{path}: {kind} ({body} data bytes, tensors end at "
                          f"{max(ends, default=0)})")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise RunDirError(f"{path}: unreadable tensors ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RunDirError(f"{path}: unknown checkpoint format {record.get('format')!r}")
    sums = record.get("sha256", {})
    if set(sums) != set(tensors):
        raise RunDirError(f"{path}: tensor list does not match its checksums")
    for name, t in tensors.items():
        if _digest(t) != sums[name]:
            raise RunDirError(f"{path}: checksum mismatch in tensor {name!r}")
    _check_record(path, tensors, record)
    return tensors, record


def _check_record(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    rnd, n = meta.get("round"), meta.get("n")
    if not isinstance(rnd, int) or rnd < 0:
        raise RunDirError(f"{path}: bad round {rnd!r}")
    if not isinstance(n, int) or n < 0:
        raise RunDirError(f"{path}: bad n {n!r}")
    P = tensors.get("P")
    if P is None:
        raise RunDirError(f"{path}: has no server vector P")
    if P.dim() != 1 or P.numel() != n or P.dtype != torch.float32:
        raise RunDirError(f"{path}: P has shape {tuple(P.shape)} and dtype {P.dtype}; "
                          f"expected ({n},) float32")
    if not bool(torch.isfinite(P).all()):
        raise RunDirError(f"{path}: P holds non-finite values")


def _load_legacy(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Format 1: checkpoint.safetensors + checkpoint.json written one after the other."""
    from safetensors.torch import load_file

    meta_path = out / CKPT_META
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(out / CKPT))
    except (OSError, ValueError, SafetensorError) as e:
        raise RunDirError(f"{meta_path}: cannot read the legacy checkpoint ({e})") from None
    _check_record(out / CKPT, tensors, meta)
    return tensors, meta


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of the newest checkpoint generation that verifies.

    A torn or corrupt newest file is moved aside to ``*.corrupt`` (so the next save keeps the
    good previous generation) and the previous one is used, with a warning naming both."""
    out = Path(out)
    if (out / CKPT_META).exists():
        return _load_legacy(out)
    newest, prev = out / CKPT, out / CKPT_PREV
    if not newest.exists() and not prev.exists():
        raise RunDirError(f"{out} has no checkpoint to resume from ({CKPT} missing)")
    problem = f"{newest} is missing (interrupted while rotating generations)"
    if newest.exists():
        try:
            return _parse_checkpoint(newest)
        except RunDirError as e:
            problem = str(e)
    if not prev.exists():
        raise RunDirError(f"{problem}; no previous checkpoint generation to fall back to")
    tensors, meta = _parse_checkpoint(prev)
    if newest.exists():
        os.replace(newest, newest.with_name(newest.name + ".corrupt"))
    log.warning("%s; using the previous checkpoint %s (round %d)", problem, prev, meta["round"])
    return tensors, meta


# ---------------------------------------------------------------- single writer


class RunLock:
    """An exclusive lock on RUN/run.lock holding the owner's PID; one writer per run dir.

    Uses ``fcntl.flock``: the kernel releases it when the owner exits or is killed, so a
    stale lock left by a dead process is simply taken over. A second live process (or a
    second Simulation in the same process) is refused with the owner's PID. The lock is
    also released when this object is garbage-collected (its file is closed)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunLock:
        import fcntl

        if self._file is not None:
            return self
        try:
            f = open(self.path, "a+b")  # noqa: SIM115 (held open: the lock lives with it)
        except OSError as e:
            raise _write_error(self.path, e) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read(64).decode(errors="replace").strip() or "unknown"
            f.close()
            raise RunDirError(f"{self.path.parent} is in use by another fedlora process "
                              f"(PID {owner}, lock {self.path}); wait for it to finish or stop "
                              "it first (nothing was changed)") from None
        f.seek(0)
        stale = f.read(64).decode(errors="replace").strip()
        if stale and stale != str(os.getpid()):
            log.info("%s: taking over the lock left by PID %s, which is gone", self.path, stale)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
