"""The protocol: a client uses only what reached it, and every payload byte is in the ledger.

For every method, each instruction of a tiny run is sent through plain records (what Flower
carries) to a *separate* client process image: a ClientRunner built on its own freshly built
task (own model load, own seeded init, own client-held state store) that never saw the
server. Its replies must be byte-identical to the in-process run's, and the ledger must equal
the payload lengths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_overrides
from parity import CASES

from fedlora.client.store import ClientStore
from fedlora.config import load_config
from fedlora.engine import ClientRunner, Simulation, resolve_config
from fedlora.protocol import ClientResult, ClientTask, ProtocolError
from fedlora.rundir import read_jsonl
from fedlora.tasks import build_task

# one case per method name (and the HetLoRA extras)
ONE_PER_METHOD = sorted({c["method.name"]: n for n, c in CASES.items()}.values()) + [
    "hetlora_self_prune", "hetlora_loss_ranks", "flasc_int8"]
PLAIN = (int, float, str, bool, bytes, list)


@pytest.mark.parametrize("name", ONE_PER_METHOD)
def test_client_uses_only_what_reached_it(name, tmp_path, tiny_bert_dir, text_file):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **CASES[name]))
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    wire: list[tuple[dict, dict]] = []
    run = sim.runner.run

    def spy(ct: ClientTask) -> ClientResult:
        record = ct.to_record()
        assert all(isinstance(v, PLAIN) for v in record.values()), record
        result = run(ClientTask.from_record(record))  # the client gets only the record
        wire.append((record, result.to_record()))
        return result

    sim.runner.run = spy
    sim.run()
    # a separate client: its own task and model, its own state, no server anywhere
    remote = ClientRunner(build_task(resolve_config(copy.deepcopy(cfg))),
                          ClientStore(tmp_path / "remote-clients"))
    assert remote.adapter is not sim.adapter
    for record, reply in wire:
        again = remote.run(ClientTask.from_record(record)).to_record()
        assert again == reply, f"client {record['client']} round {record['round']}"
    ledger = read_jsonl(tmp_path / "run" / "ledger.jsonl")
    assert len(ledger) == len(wire)
    for row, (record, reply) in zip(ledger, wire):
        down = sum(len(v) for k, v in record.items() if k.startswith("payload."))
        assert (row["round"], row["client"]) == (record["round"], record["client"])
        assert (row["download_bytes"], row["upload_bytes"]) == (down, len(reply["upload"]))


def test_records_are_strict():
    task = ClientTask(round=1, client=2, seed=0, method="flasc", n=10,
                      train={"lr": 0.1, "momentum": 0.9, "batch_size": 4, "epochs": 1,
                             "max_steps": None},
                      options={"d_up": 0.25, "merge_ranks": [1, 2]}, payloads={"down": b"xy"})
    rec = task.to_record()
    assert ClientTask.from_record(rec) == task and task.nbytes == 2
    for bad, field in [({**rec, "round": "1"}, "round"), ({**rec, "extra": 1}, "extra"),
                       ({k: v for k, v in rec.items() if k != "payload.down"}, "payload.down"),
                       ({**rec, "payload.down": "xy"}, "payload.down"),
                       ({**rec, "train.batch_size": 1.5}, "batch_size"),
                       ({**rec, "n": True}, "n")]:
        with pytest.raises(ProtocolError, match=field):
            ClientTask.from_record(bad)
    res = ClientResult(1, 2, b"\x00", {"train_loss": 0.5, "num_examples": 3})
    assert ClientResult.from_record(res.to_record()) == res
    with pytest.raises(ProtocolError, match="upload"):
        ClientResult.from_record({**res.to_record(), "upload": [1]})
    with pytest.raises(ProtocolError, match="stat.x"):
        ClientResult.from_record({**res.to_record(), "stat.x": "high"})


def test_client_state_never_leaves_the_client(tmp_path, tiny_bert_dir, text_file):
    """Stacking's client-held W lives in the client's store and is never in a reply."""
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file,
                                           **CASES["flora_stacking"]))
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    sim.run()
    files = sorted((tmp_path / "run" / "clients").glob("*.safetensors"))
    assert files, "stacking clients keep their merged W"
    assert {f.name.split(".")[0] for f in files} <= {f"c{c}" for c in range(6)}
    # resume rolls state back with the checkpoint: a generation after it is dropped
    late = tmp_path / "run" / "clients" / "c0.r99.safetensors"
    late.write_bytes(files[0].read_bytes())
    Simulation.resume(tmp_path / "run", progress=False)
    assert not late.exists()
    assert torch.isfinite(sim.P).all()
