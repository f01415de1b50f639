"""Crash safety of run directories (fedlora/rundir.py): atomic verified checkpoints with a
previous generation, torn JSONL lines, disk-full errors naming the path, one writer."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedlora import rundir
from fedlora.rundir import CKPT, CKPT_PREV, RunDirError, RunLock


def state(r: int, n: int = 6):
    P = torch.arange(n, dtype=torch.float32) + r
    return {"P": P, "server.m": P * 0.5, "method.count": torch.tensor([r])}, {"round": r, "n": n,
                                                                            "method": {"a": r}}


def test_checkpoint_is_one_verified_file_with_the_previous_generation(tmp_path):
    rundir.save_checkpoint(tmp_path, *state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CKPT]  # no separate meta file
    rundir.save_checkpoint(tmp_path, *state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CKPT_PREV, CKPT]
    tensors, meta = rundir.load_checkpoint(tmp_path)
    assert meta["round"] == 2 and meta["method"] == {"a": 2} and meta["n"] == 6
    assert torch.equal(tensors["P"], state(2)[0]["P"])
    assert set(meta["sha256"]) == {"P", "server.m", "method.count"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "missing"])
def test_torn_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog, damage):
    rundir.save_checkpoint(tmp_path, *state(1))
    rundir.save_checkpoint(tmp_path, *state(2))
    path = tmp_path / CKPT
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "flip":
        b = bytearray(data)
        b[-3] ^= 0x40  # inside the last tensor's bytes: only the checksum can tell
        path.write_bytes(bytes(b))
    elif damage == "garbage":
        path.write_bytes(data + b"\x00trailing")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()  # killed between the two renames of a save
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        tensors, meta = rundir.load_checkpoint(tmp_path)
    assert meta["round"] == 1 and torch.equal(tensors["P"], state(1)[0]["P"])
    assert str(tmp_path / CKPT_PREV) in caplog.text
    if damage != "missing":
        assert str(path) in caplog.text  # the warning names the bad file ...
        assert (tmp_path / (CKPT + ".corrupt")).exists()  # ... kept aside, not deleted
    # the next save keeps the good generation as the previous one
    rundir.save_checkpoint(tmp_path, *state(3))
    assert rundir.load_checkpoint(tmp_path)[1]["round"] == 3
    assert rundir._parse_checkpoint(tmp_path / CKPT_PREV)[1]["round"] == 1


def test_both_generations_bad_is_a_clear_error(tmp_path):
    rundir.save_checkpoint(tmp_path, *state(1))
    rundir.save_checkpoint(tmp_path, *state(2))
    for name in (CKPT, CKPT_PREV):
        (tmp_path / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RunDirError, match="not a fedlora checkpoint"):
        rundir.load_checkpoint(tmp_path)
    with pytest.raises(RunDirError, match="no checkpoint"):
        rundir.load_checkpoint(tmp_path / "nothing")


def test_checkpoint_with_wrong_shape_or_dtype_or_nonfinite_is_refused(tmp_path):
    tensors, meta = state(1)
    rundir.save_checkpoint(tmp_path, {**tensors, "P": tensors["P"].double()}, meta)
    with pytest.raises(RunDirError, match=r"dtype torch.float64; expected \(6,\) float32"):
        rundir._parse_checkpoint(tmp_path / CKPT)
    rundir.save_checkpoint(tmp_path, {**tensors, "P": tensors["P"][:4]}, meta)
    with pytest.raises(RunDirError, match="shape"):
        rundir._parse_checkpoint(tmp_path / CKPT)
    before = (tmp_path / CKPT).read_bytes()
    with pytest.raises(RunDirError, match="non-finite"):
        rundir.save_checkpoint(tmp_path, {**tensors, "P": tensors["P"] / 0}, meta)
    assert (tmp_path / CKPT).read_bytes() == before  # nothing overwritten


def test_legacy_two_file_checkpoint_still_loads(tmp_path):
    from safetensors.torch import save_file

    tensors, meta = state(4)
    save_file(tensors, str(tmp_path / CKPT))
    (tmp_path / rundir.CKPT_META).write_text(json.dumps(meta))
    assert rundir.load_checkpoint(tmp_path)[1]["round"] == 4
    rundir.save_checkpoint(tmp_path, *state(5))  # upgrades in place
    assert not (tmp_path / rundir.CKPT_META).exists()
    assert rundir.load_checkpoint(tmp_path)[1]["round"] == 5


def test_disk_full_names_the_path_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    rundir.save_checkpoint(tmp_path, *state(1))
    good = (tmp_path / CKPT).read_bytes()
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode or "a" in mode:
            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(RunDirError) as e:
        rundir.save_checkpoint(tmp_path, *state(2))
    assert str(tmp_path / CKPT) in str(e.value) and "disk is full" in str(e.value)
    assert "last good checkpoint is intact" in str(e.value)
    with pytest.raises(RunDirError, match="metrics.jsonl: the disk is full"):
        rundir.append_jsonl(tmp_path / "metrics.jsonl", [{"round": 1}])
    with pytest.raises(RunDirError, match="summary.json: the disk is full"):
        rundir.write_json(tmp_path / "summary.json", {"a": 1})
    monkeypatch.undo()
    assert (tmp_path / CKPT).read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))  # no debris
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_run_dir_is_a_clear_error(tmp_path):
    rundir.save_checkpoint(tmp_path, *state(1))
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="permission denied"):
            rundir.save_checkpoint(tmp_path, *state(2))
    finally:
        tmp_path.chmod(0o700)
    assert rundir.load_checkpoint(tmp_path)[1]["round"] == 1


def test_half_written_last_jsonl_line_is_ignored_and_repaired(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rundir.append_jsonl(path, [{"round": 1}, {"round": 2}])
    with open(path, "a") as f:
        f.write('{"round": 3, "acc')  # a kill mid-append
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        assert rundir.read_jsonl(path) == [{"round": 1}, {"round": 2}]
    assert "half-written last line" in caplog.text
    rundir.truncate_jsonl(path, 5)  # what resume does
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n'
    rundir.append_jsonl(path, [{"round": 3}])
    assert [r["round"] for r in rundir.read_jsonl(path)] == [1, 2, 3]


def test_corruption_in_the_middle_of_a_log_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"round": 1}\n{"round": 2,,}\n{"round": 3}\n')
    with pytest.raises(RunDirError, match="ledger.jsonl line 2 is not valid JSON"):
        rundir.read_jsonl(path)


def test_second_writer_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()  # a second Simulation in this process
    code = textwrap.dedent(f"""
        from fedlora.rundir import RunLock, RunDirError
        try:
            RunLock({str(tmp_path)!r}).acquire()
        except RunDirError as e:
            print("REFUSED", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "REFUSED" in out.stdout and f"PID {os.getpid()}" in out.stdout, out.stderr
    lock.release()
    # a process that takes the lock and dies without releasing it (SIGKILL)
    dead = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from fedlora.rundir import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print(os.getpid(), flush=True)
        os.kill(os.getpid(), 9)
    """)], capture_output=True, text=True, timeout=60)
    assert dead.returncode == -9
    assert (tmp_path / rundir.LOCK).read_text().strip() == dead.stdout.strip()
    with RunLock(tmp_path):  # stale: taken over
        assert (tmp_path / rundir.LOCK).read_text().strip() == str(os.getpid())
