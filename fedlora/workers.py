"""Client worker processes: a round's clients trained in parallel, one core each.

On a CPU, one small model step (MiniLM at batch 16) does not use two threads well: most of
a step is many small parallel regions. Flower's simulation engine gets its speed from Ray
running one client per core; `client.workers=P` does the same without Ray: P processes,
each holding its own resident copy of the task (data and model, built from the run's
config) and a `ClientRunner`, with `threads // P` torch threads each.

The server half stays in the main process. Each round it cuts the cohort into the groups
`ClientRunner.plan` makes (lone clients, or lockstep chunks), hands whole groups to the
workers, balanced by client count, and reassembles the replies in cohort order. A client's
reply depends only on its instruction, its data and the seeded init, so a run with P
workers gives the same replies as one with 1 at the same threads per client
(tests/test_workers.py checks bit-identity).

The pipes carry `ClientTask` / `ClientResult` records (`fedlora.protocol`), framed as a
JSON header plus raw byte blobs: nothing is pickled, and a payload shared by many clients
of a frame (the round's download) crosses once. The workers talk over their own pipe pair,
so their stdout and stderr stay free for logs.

Not in workers (the pool says so once and trains in the main process): methods with
client-held state (its store lives with the main process's run), a task object built by
the caller rather than from the config, and an accelerator device ("auto" only).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from typing import Any, BinaryIO

import torch

from fedlora.protocol import ClientResult, ClientTask, ProtocolError

__all__ = ["WorkerPool", "WorkerError", "pack", "unpack", "resolve_workers"]

log = logging.getLogger("fedlora")

_LEN = struct.Struct("<Q")


class WorkerError(RuntimeError):
    """A client worker process failed: its traceback, or how it exited."""


def resolve_workers(setting: int | str, cohort: int, threads: int,
                    device: torch.device) -> int:
    """Processes for `client.workers` (P, or "auto"): "auto" is one per torch thread the run
    was given, at most the cohort, and 1 on an accelerator (one device, one process)."""
    if setting == "auto":
        return 1 if device.type != "cpu" else max(1, min(threads, cohort))
    return max(1, int(setting))


# ------------------------------------------------------------------ framing (no pickle)

def pack(header: dict[str, Any], records: list[dict[str, Any]]) -> bytes:
    """`header` and records of plain values (int, float, str, bool, None, lists, bytes) as
    one frame: a JSON document whose bytes values are {"$b": i} references into the blobs
    that follow it. Identical bytes objects are stored once."""
    blobs: list[bytes] = []
    seen: dict[int, int] = {}

    def ref(v: Any) -> Any:
        if isinstance(v, bytes | bytearray | memoryview):
            i = seen.get(id(v))
            if i is None:
                i = seen[id(v)] = len(blobs)
                blobs.append(bytes(v))
            return {"$b": i}
        return v

    doc = {"header": header, "records": [{k: ref(v) for k, v in r.items()} for r in records],
           "blobs": [len(b) for b in blobs]}
    head = json.dumps(doc).encode()
    return b"".join([_LEN.pack(len(head)), head, *blobs])


def unpack(frame: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Inverse of `pack`; a malformed frame raises ProtocolError."""
    try:
        (hlen,) = _LEN.unpack_from(frame)
        doc = json.loads(frame[_LEN.size:_LEN.size + hlen])
        pos, blobs = _LEN.size + hlen, []
        for n in doc["blobs"]:
            blobs.append(frame[pos:pos + n])
            pos += n
        if pos != len(frame):
            raise ValueError(f"{len(frame) - pos} trailing bytes")
        records = [{k: blobs[v["$b"]] if isinstance(v, dict) else v for k, v in r.items()}
                   for r in doc["records"]]
        return doc["header"], records
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        raise ProtocolError(f"worker frame: malformed ({e})") from e


def _send(f: BinaryIO, frame: bytes) -> None:
    f.write(_LEN.pack(len(frame)))
    f.write(frame)
    f.flush()


def _recv(f: BinaryIO) -> bytes | None:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return data


# ------------------------------------------------------------------ the main process's side

class WorkerPool:
    """P worker processes for one run. `run_many(tasks)` answers like
    `ClientRunner.run_many`; `close()` ends them (by their own PIDs)."""

    def __init__(self, cfg, runner, workers: int, threads: int):
        self.runner, self.size = runner, workers
        self.threads = max(1, threads // workers)
        self._warned = False
        config = json.dumps(cfg.to_dict(), default=str)
        self.procs: list[tuple[subprocess.Popen, BinaryIO, BinaryIO]] = []
        try:
            for i in range(workers):
                self.procs.append(self._start(i, config))
        except BaseException:
            self.close()
            raise
        log.info("client.workers=%d: %d processes with %d torch thread%s each", workers,
                 workers, self.threads, "" if self.threads == 1 else "s")

    def _start(self, i: int, config: str):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = dict(os.environ, FEDLORA_THREADS=str(self.threads))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlora.workers", str(to_r), str(from_w)],
            pass_fds=(to_r, from_w), env=env, stdin=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        out, inp = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")
        _send(out, pack({"config": config, "worker": i}, []))
        return proc, out, inp

    def run_many(self, tasks: list[ClientTask]) -> list[ClientResult | str]:
        groups = self.runner.plan(tasks, threads=self.threads)
        if len(groups) < self.size and len(tasks) >= self.size and not self._warned:
            log.warning("client.workers=%d but client.lockstep=%s makes %d chunk%s of this "
                        "cohort: some workers idle", self.size, self.runner.lockstep,
                        len(groups), "" if len(groups) == 1 else "s")
            self._warned = True
        # Whole groups to the least-loaded worker, largest first (ties: lowest index).
        loads, assigned = [0] * self.size, [[] for _ in range(self.size)]
        for gi in sorted(range(len(groups)), key=lambda g: -len(groups[g])):
            w = min(range(self.size), key=lambda j: (loads[j], j))
            loads[w] += len(groups[gi])
            assigned[w].append(gi)
        for w, gis in enumerate(assigned):
            if gis:
                records = [ct.to_record() for gi in gis for ct in groups[gi]]
                self._send(w, pack({"groups": [len(groups[gi]) for gi in gis]}, records))
        replies: dict[int, ClientResult | str] = {}
        for w, gis in enumerate(assigned):
            if not gis:
                continue
            header, records = self._recv(w)
            if "error" in header:
                raise WorkerError(f"client worker {w} (pid {self.procs[w][0].pid}) "
                                  f"failed:\n{header['error']}")
            flat = [ct for gi in gis for ct in groups[gi]]
            if len(records) != len(flat):
                raise WorkerError(f"client worker {w}: {len(records)} replies for "
                                  f"{len(flat)} clients")
            for ct, rec in zip(flat, records):
                replies[id(ct)] = rec["why"] if "why" in rec else ClientResult.from_record(rec)
        return [replies[id(ct)] for ct in tasks]

    def _send(self, w: int, frame: bytes) -> None:
        try:
            _send(self.procs[w][1], frame)
        except (BrokenPipeError, OSError) as e:
            raise self._dead(w) from e

    def _recv(self, w: int):
        frame = _recv(self.procs[w][2])
        if frame is None:
            raise self._dead(w)
        return unpack(frame)

    def _dead(self, w: int) -> WorkerError:
        proc = self.procs[w][0]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return WorkerError(f"client worker {w} (pid {proc.pid}) stopped answering "
                           f"(exit code {code}); its error is in the log above")

    def close(self) -> None:
        """Close the pipes (a worker exits at end of input), then wait; kill by PID only a
        worker that does not exit within 10 s."""
        for _, out, inp in self.procs:
            for f in (out, inp):
                try:
                    f.close()
                except OSError:
                    pass
        for proc, _, _ in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


# ------------------------------------------------------------------ the worker's side

def worker_main(fd_in: int, fd_out: int) -> int:
    """A worker: build the task from the config in the first frame, then answer each frame
    of instructions (whole groups of `ClientRunner.plan`) with their replies."""
    import traceback

    from fedlora.client.store import ClientStore
    from fedlora.config import config_from_dict
    from fedlora.resolve import resolve_config
    from fedlora.runner import ClientRunner, set_threads
    from fedlora.tasks import build_task

    inp, out = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")
    first = _recv(inp)
    if first is None:
        return 0
    header, _ = unpack(first)
    cfg = resolve_config(config_from_dict(json.loads(header["config"])))
    set_threads(None)  # FEDLORA_THREADS, set by the pool
    runner = ClientRunner(build_task(cfg), ClientStore(None), lockstep=cfg.client.lockstep)
    while (frame := _recv(inp)) is not None:
        try:
            header, records = unpack(frame)
            tasks = [ClientTask.from_record(r) for r in records]
            replies: list[dict[str, Any]] = []
            pos = 0
            for size in header["groups"]:
                for res in runner.run_group(tasks[pos:pos + size]):
                    replies.append({"why": res} if isinstance(res, str) else res.to_record())
                pos += size
            _send(out, pack({}, replies))
        except Exception:  # the main process raises it, with this traceback
            _send(out, pack({"error": traceback.format_exc()}, []))
            return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="fedlora worker: %(message)s")
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
