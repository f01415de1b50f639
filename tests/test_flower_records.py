"""fedlora's instruction and reply inside Flower records, and the Flower settings (no processes)."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from conftest import tiny_overrides  # noqa: E402
from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora.config import ConfigError, load_config  # noqa: E402
from fedlora.engine import RoundServer  # noqa: E402
from fedlora.flower.records import (  # noqa: E402
    RESULT_RECORD,
    message_nbytes,
    read_result,
    read_task,
    result_content,
    task_content,
)
from fedlora.flower.settings import NodeSettings, ServerSettings  # noqa: E402
from fedlora.protocol import ProtocolError  # noqa: E402
from fedlora.runner import ClientRunner  # noqa: E402


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    """A Message outside a Flower process needs a run/node identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.parametrize("extra", [
    {"method.name": "flasc", "method.d_up": "1/4"},
    {"method.name": "hetlora", "het.tiers": 3, "het.r_base": 2, "model.rank": 4},
    {"method.name": "flora_stacking", "het.tiers": 3, "het.r_base": 2, "model.rank": 4},
])
def test_task_and_result_round_trip_through_messages(tmp_path, tiny_bert_dir, text_file,
                                                     extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    server = RoundServer(cfg, tmp_path / "run", progress=False)
    t, tasks = server.open_round()
    runner = ClientRunner(server.task)
    for ct in tasks:
        msg = Message(task_content(ct), 7, "train")
        assert read_task(msg.content) == ct
        # Flower's framing: the message is bigger than the payloads it carries.
        assert message_nbytes(msg) > ct.nbytes
        res = runner.run(ct)
        reply = Message(result_content(res), 7, "train")
        assert read_result(reply.content) == res
        assert message_nbytes(reply) > len(res.upload)


def test_a_malformed_reply_names_the_field():
    bad = RecordDict({RESULT_RECORD: ConfigRecord({"round": 1, "client": 2})})
    with pytest.raises(ProtocolError, match="upload"):
        read_result(bad)
    with pytest.raises(ProtocolError, match="fedlora.task"):
        read_task(RecordDict({"other": ConfigRecord({"x": 1})}))


def test_run_config_carries_the_fedlora_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rounds: 7\nmethod:\n  name: lora\n")
    s = ServerSettings.from_run_config({
        "config": str(yaml_file), "overrides": "model.rank=4 'method.d_up=1/8'",
        "set.seed": 3, "set.dp.enabled": False, "round-timeout": 5.0})
    cfg = s.fedlora_config()
    assert (cfg.rounds, cfg.method.name, cfg.model.rank, cfg.seed) == (7, "lora", 4, 3)
    assert cfg.method.d_up == 1 / 8 and s.round_timeout == 5.0 and not cfg.dp.enabled
    with pytest.raises(ConfigError, match="round-timeout"):
        ServerSettings.from_run_config({"round-timeout": 0})
    with pytest.raises(ConfigError, match="unknown config key"):
        ServerSettings.from_run_config({"overrides": "methd.name=x"}).fedlora_config()


def test_node_config():
    n = NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 5,
                                       "data-path": "/data/x.jsonl",
                                       "fault": "sleep-round:1:2.5"})
    assert (n.partition_id, n.num_partitions) == (2, 5)
    assert n.overrides() == {"task": {"path": "/data/x.jsonl"}}
    assert n.sleep_before(1) == 2.5 and n.sleep_before(2) == 0
    with pytest.raises(ConfigError, match="partition-id"):
        NodeSettings.from_node_config({"num-partitions": 5})


def test_fuzzed_flower_records_are_refused_cleanly():
    """10,000 mutations of an instruction and a reply as they travel in Flower ConfigRecords
    (a field dropped, retyped, added; payload bytes flipped, cut or extended): the receiving
    half either rebuilds the message or raises ProtocolError naming a field, and the payload
    then decodes or raises CodecError. Nothing else escapes (docs/reliability.md)."""
    import numpy as np
    import torch

    from fedlora.comm import codec
    from fedlora.protocol import ClientResult, ClientTask

    rng = np.random.default_rng(0)
    n = 4000
    v = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    mask = torch.from_numpy(rng.random(n) < 0.25)
    ct = ClientTask(round=3, client=7, seed=0, method="flasc", n=n,
                    train={"lr": 0.1, "momentum": 0.9, "batch_size": 16, "epochs": 1,
                           "max_steps": 4}, options={"d_up": 0.25},
                    payloads={"down": codec.encode(v, mask)})
    res = ClientResult(3, 7, codec.encode(-v, mask, values="int8"),
                       {"train_loss": 0.5, "first_loss": 0.7, "num_examples": 12})
    weird = [None, "x", 1.5, -1, True, b"\x00", [1, 2], [], 2**70, float("nan")]
    outcomes = {"ok": 0, "protocol": 0, "codec": 0, "flower": 0}

    def mutate(record: dict) -> dict:
        rec = dict(record)
        key = sorted(rec)[int(rng.integers(len(rec)))]
        kind = int(rng.integers(5))
        if kind == 0:
            del rec[key]
        elif kind == 1:
            rec[key] = weird[int(rng.integers(len(weird)))]
        elif kind == 2:
            rec[f"junk.{int(rng.integers(100))}"] = 1
        else:
            payload = next((k for k in rec if isinstance(rec[k], bytes)), None)
            data = bytearray(rec[payload])
            if kind == 3:
                for _ in range(int(rng.integers(1, 8))):
                    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            else:
                data = data[: int(rng.integers(len(data)))] + bytes(int(rng.integers(3)))
            rec[payload] = bytes(data)
        return rec

    for i in range(10_000):
        is_task = i % 2 == 0
        rec = mutate((ct if is_task else res).to_record())
        try:  # what Flower itself refuses never reaches fedlora
            content = RecordDict({("fedlora.task" if is_task else RESULT_RECORD):
                                  ConfigRecord(rec)})
        except (TypeError, ValueError):
            outcomes["flower"] += 1
            continue
        try:
            got = read_task(content) if is_task else read_result(content)
            codec.decode(got.payloads["down"] if is_task else got.upload, n)
            outcomes["ok"] += 1
        except ProtocolError:
            outcomes["protocol"] += 1
        except codec.CodecError:
            outcomes["codec"] += 1
    print("fuzzed Flower records:", outcomes)
    assert sum(outcomes.values()) == 10_000
    assert outcomes["protocol"] > 1000 and outcomes["codec"] > 1000 and outcomes["ok"] > 100


def test_per_client_evaluation_is_refused_before_anything_runs(tmp_path):
    from fedlora.config import load_config
    from fedlora.flower.serverapp import run_rounds

    cfg = load_config(None, ["eval.personalized=true", "task.local_test_fraction=0.2"])
    s = ServerSettings.from_run_config({})
    with pytest.raises(ConfigError, match="eval.personalized: per-client evaluation runs "
                                          "in-process only"):
        run_rounds(None, cfg, tmp_path / "run", s)
    assert not (tmp_path / "run").exists()
