"""client.workers: a round's clients trained by worker processes give the same run."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from conftest import tiny_overrides

from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.protocol import ClientTask, ProtocolError
from fedlora.workers import WorkerError, pack, resolve_workers, unpack


def _run(out, model_dir, data, **extra):
    over = tiny_overrides(model_dir, data, **extra)
    summary = Simulation(load_config(None, over), out, progress=False).run()
    from safetensors.torch import load_file

    vec = load_file(str(out / "checkpoint.safetensors"))["P"].contiguous().numpy().tobytes()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # wall-clock fields differ between any two runs
        for k in [k for k in r if k.endswith("_s") or k in ("time", "seconds")]:
            r.pop(k)
    return summary, hashlib.sha256(vec).hexdigest(), rows


@pytest.mark.parametrize("extra", [
    {"method.name": "flasc", "method.d_up": "1/4"},
    {"method.name": "hetlora", "het.tiers": 3, "het.r_base": 2},
    {"method.name": "lora", "dp.enabled": True, "dp.clip": 0.5, "dp.noise_multiplier": 0.3},
])
def test_workers_match_one_process(tmp_path, tiny_bert_dir, text_file, extra, caplog):
    """2 workers, 3 clients per round: every byte of the run as in one process."""
    one = _run(tmp_path / "one", tiny_bert_dir, text_file, **extra)
    with caplog.at_level(logging.INFO, logger="fedlora"):
        two = _run(tmp_path / "two", tiny_bert_dir, text_file, **extra,
                   **{"client.workers": 2})
    assert "client.workers=2: 2 processes with 1 torch thread each" in caplog.text
    assert one[1] == two[1]
    assert one[2] == two[2]
    assert (tmp_path / "one" / "ledger.jsonl").read_text() == \
        (tmp_path / "two" / "ledger.jsonl").read_text()


def test_workers_with_lockstep_chunks_match(tmp_path, tiny_bert_dir, text_file):
    """Lockstep chunks are planned in the main process: P workers, same replies."""
    extra = {"client.lockstep": 2, "clients_per_round": 4}
    one = _run(tmp_path / "one", tiny_bert_dir, text_file, **extra)
    two = _run(tmp_path / "two", tiny_bert_dir, text_file, **extra, **{"client.workers": 2})
    assert one[1:] == two[1:]


def test_a_dead_worker_is_named(tmp_path, tiny_bert_dir, text_file):
    over = tiny_overrides(tiny_bert_dir, text_file, **{"client.workers": 2})
    sim = Simulation(load_config(None, over), tmp_path / "r", progress=False)
    pool = sim.start_workers()
    try:
        victim = pool.procs[1][0]
        victim.kill()
        victim.wait()
        _, tasks = sim.open_round()
        with pytest.raises(WorkerError, match=f"client worker 1 \\(pid {victim.pid}\\)"):
            pool.run_many(tasks)
    finally:
        pool.close()
        sim.lock.release()


def test_held_state_methods_train_in_process(tmp_path, tiny_bert_dir, text_file, caplog):
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        _run(tmp_path / "r", tiny_bert_dir, text_file, **{"method.name": "local_only",
                                                         "client.workers": 2})
    assert "keeps client-held state in this process" in caplog.text


def test_frames_round_trip_without_pickle():
    blob = b"\x00\x01" * 10
    recs = [{"a": 1, "b": 0.1, "c": "x", "d": True, "e": [1, 2.5], "p": blob},
            {"p": blob, "q": b""}]
    frame = pack({"groups": [2]}, recs)
    assert frame.count(blob) == 1  # a payload shared by clients crosses once
    header, back = unpack(frame)
    assert header == {"groups": [2]} and back == recs
    ct = ClientTask(1, 2, 0, "lora", 4, {"lr": 0.1, "momentum": 0.9, "batch_size": 2,
                                         "epochs": 1, "max_steps": None},
                    payloads={"down": b"abc"})
    assert ClientTask.from_record(unpack(pack({}, [ct.to_record()]))[1][0]) == ct
    for bad in (b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", frame + b"x", frame[:-3]):
        with pytest.raises(ProtocolError, match="worker frame"):
            unpack(bad)


def test_resolve_workers():
    import torch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_workers("auto", 10, 2, cpu) == 2
    assert resolve_workers("auto", 1, 16, cpu) == 1
    assert resolve_workers("auto", 10, 8, gpu) == 1
    assert resolve_workers(3, 10, 1, cpu) == 3


def test_bad_setting_names_the_field():
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="client.workers"):
        load_config(None, ["client.workers=0"])
