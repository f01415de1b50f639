"""The kill test: SIGKILL `fedlora run`, `fedlora sweep` and `fedlora search` at seeded random
moments (in the middle of the i-th durable write, via FEDLORA_TEST_KILL_AT_WRITE, and after
a random delay), resume each time, and require the final vector, metrics and ledger to be
bit-identical to an uninterrupted run.

Each command runs in a child process forked from the test process (the imports are already
paid for, so a child costs only its own work); the child is killed with a real SIGKILL.
The default run kills `run` 10 times, `sweep` 3 times and `search` twice (about 60 s); the
slow variants kill each 20 times.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora import cli, rundir

TIMING = ("wall_s", "eval_s")


def child(argv: list[str], kill_at_write: int | None = None) -> int:
    """Fork, run `fedlora <argv>` in the child, return its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 98
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if kill_at_write is None:
                os.environ.pop(rundir._KILL_ENV, None)
            else:
                os.environ[rundir._KILL_ENV] = str(kill_at_write)
            rundir._writes = 0
            code = cli.main(argv)
        except BaseException:
            code = 99
        finally:
            os._exit(code)
    return pid


def wait(pid: int, kill_after: float | None = None, limit: float = 120.0) -> int:
    """Exit code (negative: killed by that signal); SIGKILL after `kill_after` seconds."""
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - start
        if kill_after is not None and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)
            kill_after = None
        if elapsed > limit:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"fedlora {pid} did not finish within {limit} s")
        time.sleep(0.005)


def run_cmd(argv: list[str], kill_at_write: int | None = None,
            kill_after: float | None = None) -> int:
    return wait(child(argv, kill_at_write), kill_after)


def digest(run_dir: Path) -> dict:
    """What must be bit-identical: P, metrics without timings, ledger, summary essentials."""
    tensors, meta = rundir.load_checkpoint(run_dir)
    P = tensors["P"].contiguous().numpy()
    metrics = [{k: v for k, v in r.items() if k not in TIMING}
               for r in rundir.read_jsonl(run_dir / "metrics.jsonl")]
    s = json.loads((run_dir / "summary.json").read_text())
    adapter = hashlib.sha256((run_dir / "adapter.safetensors").read_bytes()).hexdigest()
    return {"P": hashlib.sha256(P.tobytes()).hexdigest(), "round": meta["round"],
            "metrics": metrics, "ledger": rundir.read_jsonl(run_dir / "ledger.jsonl"),
            "finished": s["finished"], "total_upload_bytes": s["total_upload_bytes"],
            "adapter": adapter}


def differences(got: dict, want: dict) -> str:
    """Which run directory and which of its digest fields differ (for the failure message)."""
    out = []
    for run in sorted(set(got) | set(want), key=str):
        g, w = got.get(run, {}), want.get(run, {})
        for key in sorted(set(g) | set(w)):
            if g.get(key) != w.get(key):
                out.append(f"{run}: {key}: {str(g.get(key))[:300]} != {str(w.get(key))[:300]}")
    return "; ".join(out) or "no field differs"


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.jsonl"))


class Killer:
    """Seeded kill moments: alternately in the middle of a random write and after a random
    delay within the uninterrupted run's duration."""

    def __init__(self, seed: int, writes: int, duration: float):
        self.rng = np.random.default_rng(seed)
        self.writes, self.duration = writes, duration
        self.i = 0

    def next(self) -> dict:
        self.i += 1
        if self.i % 2:
            return {"kill_at_write": int(self.rng.integers(1, self.writes + 1))}
        return {"kill_after": float(self.rng.uniform(0.05, self.duration))}


def kill_until_done(first: list[str], again, killer: Killer, budget: int) -> int:
    """Run `first` with a kill moment; after each landed kill rerun `again()` with the next
    moment, until a command finishes on its own or `budget` kills landed (then one last,
    unkilled `again()`). Returns how many kills landed."""
    landed, argv = 0, first
    while True:
        if landed >= budget:
            assert run_cmd(argv) == 0, f"final {argv} failed"
            return landed
        code = run_cmd(argv, **killer.next())
        if code != -signal.SIGKILL:
            assert code == 0, f"{argv} exited {code}"
            return landed
        landed += 1
        argv = again()


def count_writes(argv: list[str]) -> tuple[int, float]:
    """(durable writes, seconds) of an uninterrupted command: kill at an absurd index and
    read the counter back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 98
        try:
            os.close(r)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ[rundir._KILL_ENV] = str(10**9)
            rundir._writes = 0
            code = cli.main(argv)
            os.write(w, str(rundir._writes).encode())
        except BaseException:
            code = 99
        finally:
            os._exit(code)
    os.close(w)
    start = time.monotonic()
    code = wait(pid)
    took = time.monotonic() - start
    writes = int(os.read(r, 64) or b"0")
    os.close(r)
    assert code == 0, f"{argv} exited {code}"
    return writes, took


def warm_up(sets: list[str], out: Path) -> None:
    """One in-process run first: lazy imports (transformers' model classes, ...) then happen
    once in the parent instead of in every forked child."""
    from fedlora.config import load_config
    from fedlora.engine import Simulation

    Simulation(load_config(None, sets[1::2]), out, progress=False).run()


def tiny_sets(model_dir: Path, data: Path, **extra) -> list[str]:
    from conftest import tiny_overrides

    base = {"rounds": 4, "eval_every": 2, "checkpoint_every": 1, "clients_per_round": 2,
            "client.max_steps": 1, "method.d_up": "1/4", "model.dropout": 0.1}
    base.update(extra)
    out = []
    for item in tiny_overrides(model_dir, data, **base):
        out += ["--set", item]
    return out


def check_run(tmp_path, tiny_bert_dir, text_file, kills: int, seed: int) -> int:
    sets = tiny_sets(tiny_bert_dir, text_file)
    warm_up(sets, tmp_path / "warm")
    ref = tmp_path / "ref"
    writes, took = count_writes(["run", *sets, "--out", str(ref), "--no-progress"])
    want = digest(ref)
    assert want["finished"] and writes >= 10
    killer = Killer(seed, writes, took)
    landed = attempt = 0
    while landed < kills and attempt < 10 * kills:  # a fresh directory each time one finishes
        out = tmp_path / f"crash{attempt}"
        attempt += 1
        first = ["run", *sets, "--out", str(out), "--no-progress"]

        def again(out=out, first=first):  # what a user does: resume, or rerun if nothing saved
            return ["resume", str(out), "--no-progress"] if (out / "config.yaml").exists() \
                else first

        landed += kill_until_done(first, again, killer, kills - landed)
        assert digest(out) == want, f"{out} differs from the uninterrupted run"
    return landed


def test_kill_run_resume_is_bit_identical(tmp_path, tiny_bert_dir, text_file):
    """20 seeded kills of `fedlora run` (at the i-th write and after timed delays)."""
    check_run(tmp_path, tiny_bert_dir, text_file, kills=20, seed=20)


@pytest.mark.slow
def test_kill_run_resume_is_bit_identical_40_kills(tmp_path, tiny_bert_dir, text_file):
    check_run(tmp_path, tiny_bert_dir, text_file, kills=40, seed=21)


def check_grid(tmp_path, tiny_bert_dir, text_file, kind: str, kills: int, seed: int) -> int:
    sets = tiny_sets(tiny_bert_dir, text_file, rounds=2)
    if kind == "search":  # search sets method.name and d_up per trial (lora has no d_up)
        at = sets.index("method.d_up=1/4")
        del sets[at - 1 : at + 1]
    warm_up(sets, tmp_path / "warm")
    if kind == "sweep":
        args = ["sweep", "--grid", "model.rank=2,4", *sets]
    else:
        args = ["search", "--ranks", "2,4", "--densities", "1" if kills < 10 else "1/2,1", *sets]
    ref = tmp_path / "ref"
    writes, took = count_writes([*args, "--out", str(ref)])
    want = {p.relative_to(ref): digest(p) for p in run_dirs(ref)}
    assert len(want) >= 2
    killer = Killer(seed, writes, took)
    landed = attempt = 0
    while landed < kills and attempt < 10 * kills:
        out = tmp_path / f"crash{attempt}"
        attempt += 1
        argv = [*args, "--out", str(out)]
        landed += kill_until_done(argv, lambda argv=argv: argv, killer, kills - landed)
        got = {p.relative_to(out): digest(p) for p in run_dirs(out)}
        assert got == want, f"{out} differs from the uninterrupted {kind}: " + differences(
            got, want)
    return landed


def test_kill_sweep_and_search_resume_bit_identical(tmp_path, tiny_bert_dir, text_file):
    check_grid(tmp_path / "sweep", tiny_bert_dir, text_file, "sweep", kills=3, seed=30)
    check_grid(tmp_path / "search", tiny_bert_dir, text_file, "search", kills=2, seed=31)


@pytest.mark.slow
def test_kill_sweep_and_search_20_kills(tmp_path, tiny_bert_dir, text_file):
    check_grid(tmp_path / "sweep", tiny_bert_dir, text_file, "sweep", kills=20, seed=32)
    check_grid(tmp_path / "search", tiny_bert_dir, text_file, "search", kills=20, seed=33)
