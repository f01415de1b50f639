"""fedlora on Flower: a real SuperLink and SuperNodes on loopback, and the simulation engine.

Each test starts its own `flower-superlink` and `flower-supernode` processes on free
127.0.0.1 ports (tests/flower_harness.py) and ends them by PID. The final server vector of
every Flower run must be bit-identical (SHA-256) to the in-process `Simulation` with the
same config and seed.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from conftest import tiny_overrides  # noqa: E402
from flower_harness import Federation, make_node_key  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.engine import Simulation  # noqa: E402
from fedlora.rundir import read_jsonl  # noqa: E402

FLASC = {"method.name": "flasc", "method.d_up": "1/4"}
HET = {"method.name": "hetlora", "het.tiers": 3, "het.r_base": 2, "model.rank": 4}
SELECT = {"method.name": "federated_select", "method.density": "1/2"}
RUN_TIMEOUT = 300.0


def users_file(p: Path, users: int) -> Path:
    """A JSONL text task whose `client` column has `users` users (one per SuperNode)."""
    words = {"animal": ["a dog that barks", "a small cat", "a large horse", "wild wolf pack"],
             "food": ["sweet apple pie", "bread with butter", "hot soup", "fresh salad"],
             "tool": ["a sharp knife", "heavy hammer", "long screwdriver", "a saw for wood"]}
    rows = []
    for i in range(40 * users):
        label = list(words)[i % 3]
        rows.append({"text": f"{words[label][i % 4]} number {i}", "label": label,
                     "client": f"user{i % users}"})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def vector_sha(out: Path) -> str:
    """SHA-256 of the server vector in the run's last checkpoint."""
    from safetensors.torch import load_file

    P = load_file(str(out / "checkpoint.safetensors"))["P"].contiguous()
    return hashlib.sha256(P.numpy().tobytes()).hexdigest()


def reference(out: Path, overrides: list[str]) -> tuple[str, list[dict]]:
    """The in-process Simulation of the same config: (vector SHA-256, metrics rows)."""
    Simulation(load_config(None, overrides), out, progress=False).run()
    return vector_sha(out), read_jsonl(out / "metrics.jsonl")


def run_config(overrides: list[str], out: Path, **extra) -> dict:
    return {"overrides": " ".join(shlex.quote(o) for o in overrides), "out": str(out),
            "poll-interval": 0.05, **extra}


def same_bytes(flower_rows: list[dict], ref_rows: list[dict]) -> None:
    assert len(flower_rows) == len(ref_rows)
    for f, r in zip(flower_rows, ref_rows):
        for k in ("round", "clients", "aggregated", "upload_bytes", "download_bytes"):
            assert f[k] == r[k], (k, f, r)
        # Flower frames our payloads: its messages are bigger than the payloads they carry.
        assert f["flower_up_bytes"] > f["upload_bytes"]
        assert f["flower_down_bytes"] > f["download_bytes"]


def start(fed: Federation, users: int, node_kw: dict[int, dict] | None = None) -> None:
    fed.start_superlink()
    for c in range(users):
        fed.start_node(c, users, **(node_kw or {}).get(c, {}))


def flower_run(fed: Federation, cfg: dict, out: Path, timeout: float = RUN_TIMEOUT) -> int:
    rid = fed.run(cfg)
    fed.wait_file(out / "summary.json", timeout)
    return rid


def test_deployment_flasc_bit_identical(tmp_path, tiny_bert_dir):
    """3 SuperNodes (processes), 2 rounds of FLASC d_up=1/4: same vector as in-process."""
    data = users_file(tmp_path / "data.jsonl", 3)
    ovr = tiny_overrides(tiny_bert_dir, data, **FLASC)
    sha, ref_rows = reference(tmp_path / "ref", ovr)
    out = tmp_path / "flower"
    # Node 2 loads its data from its own path (node config data-path), here a copy.
    own = tmp_path / "node2" / "data.jsonl"
    own.parent.mkdir()
    own.write_bytes(data.read_bytes())
    with Federation(tmp_path / "fed") as fed:
        start(fed, 3, {2: {"extra": f'data-path="{own}"'}})
        flower_run(fed, run_config(ovr, out, **{"min-nodes": 3}), out)
    assert vector_sha(out) == sha
    same_bytes(read_jsonl(out / "metrics.jsonl"), ref_rows)
    assert read_jsonl(out / "ledger.jsonl") == read_jsonl(tmp_path / "ref" / "ledger.jsonl")


def test_deployment_held_state_in_context(tmp_path, tiny_bert_dir):
    """flasc_personal over 3 SuperNodes, 3 rounds: each client's residual (client-held, no
    bytes) lives in its ClientApp's context.state and feeds its next start, so the vector
    matches in-process only if the state survived between messages; no file holds it."""
    data = users_file(tmp_path / "data.jsonl", 3)
    ovr = tiny_overrides(tiny_bert_dir, data, rounds=3, **{"method.name": "flasc_personal",
                                                           "method.d_up": "1/4"})
    sha, ref_rows = reference(tmp_path / "ref", ovr)
    lost, _ = reference(tmp_path / "flasc", tiny_overrides(tiny_bert_dir, data, rounds=3,
                                                           **FLASC))
    assert sha != lost  # flasc_personal without its residual is FLASC
    out = tmp_path / "flower"
    with Federation(tmp_path / "fed") as fed:
        start(fed, 3)
        flower_run(fed, run_config(ovr, out, **{"min-nodes": 3}), out)
    assert vector_sha(out) == sha
    same_bytes(read_jsonl(out / "metrics.jsonl"), ref_rows)
    assert not [p for p in (tmp_path / "fed").rglob("*.safetensors")]
    assert not (out / "clients").exists()


@pytest.mark.slow
def test_deployment_baselines_bit_identical(tmp_path, tiny_bert_dir):
    """A masked baseline and HetLoRA over the same deployment, each run its own Flower run."""
    data = users_file(tmp_path / "data.jsonl", 3)
    with Federation(tmp_path / "fed") as fed:
        start(fed, 3)
        for name, extra in (("federated_select", SELECT), ("hetlora", HET)):
            ovr = tiny_overrides(tiny_bert_dir, data, **extra)
            sha, ref_rows = reference(tmp_path / f"ref-{name}", ovr)
            out = tmp_path / name
            flower_run(fed, run_config(ovr, out, **{"min-nodes": 3}), out)
            assert vector_sha(out) == sha, name
            same_bytes(read_jsonl(out / "metrics.jsonl"), ref_rows)


@pytest.mark.slow
def test_simulation_engine_bit_identical(tmp_path, tiny_bert_dir):
    """Flower's simulation engine (Ray), 10 virtual SuperNodes, 4 sampled per round."""
    data = users_file(tmp_path / "data.jsonl", 10)
    ovr = tiny_overrides(tiny_bert_dir, data, **FLASC, clients_per_round=4)
    sha, ref_rows = reference(tmp_path / "ref", ovr)
    out = tmp_path / "flower"
    with Federation(tmp_path / "fed", simulation=True) as fed:
        fed.start_superlink()
        fed.run(run_config(ovr, out, **{"min-nodes": 10}),
                federation_config="num-supernodes=10 init-args-num-cpus=2 "
                                  "client-resources-num-cpus=1")
        fed.wait_file(out / "summary.json", RUN_TIMEOUT)
    assert vector_sha(out) == sha
    same_bytes(read_jsonl(out / "metrics.jsonl"), ref_rows)


def wait_log(proc, needle: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if needle in proc.text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{needle!r} not in {proc.name}'s log after {timeout}s:\n{proc.text()}")


@pytest.mark.slow
def test_faults_killed_corrupt_and_late(tmp_path, tiny_bert_dir):
    """Node 1 is killed mid-round, node 2 replies corrupt bytes, node 3 replies too late.

    The round timeout must exceed a healthy ClientApp's cold start (a fresh process
    imports torch and builds the model: tens of seconds on a loaded 2-core machine)."""
    data = users_file(tmp_path / "data.jsonl", 4)
    ovr = tiny_overrides(tiny_bert_dir, data, **FLASC, clients_per_round=4)
    out = tmp_path / "flower"
    timeout = 90.0
    with Federation(tmp_path / "fed") as fed:
        start(fed, 4, {1: {"extra": 'fault="sleep:600"'}, 2: {"extra": 'fault="corrupt"'},
                       3: {"extra": f'fault="sleep-round:1:{timeout + 5}"'}})
        fed.run(run_config(ovr, out, **{"min-nodes": 4, "round-timeout": timeout}))
        victim = next(p for p in fed.procs if p.name == "supernode-1")
        wait_log(victim, "Receiving: train", 300)
        victim.stop()
        fed.wait_file(out / "summary.json", RUN_TIMEOUT + 300)
    rows = read_jsonl(out / "metrics.jsonl")
    log = (out / "flower.log").read_text()
    node = rows[0]["nodes"]
    assert rows[0]["aggregated"] == 1 and sorted(rows[0]["dropped"]) == [1, 2, 3]
    why = rows[0]["dropped_reasons"]
    # The killed node: Flower reports it unavailable (missed heartbeats) or it never answers.
    assert why["1"].startswith(f"node {node['1']}: ")
    assert "Unavailable" in why["1"] or "no reply within" in why["1"]
    assert "failed to decode" in why["2"]  # the corrupt upload; the log names its node:
    assert f"dropped client 2 (node {node['2']}): its upload failed to decode" in log
    assert why["3"] == f"node {node['3']}: no reply within {timeout:g}s"
    for r in rows[1:]:  # the killed node and the corrupt one stay dropped
        assert {1, 2} <= set(r["dropped"])
    late = [x for r in rows[1:] for x in r.get("late_replies", [])]
    assert {"round": 1, "client": 3, "node": node["3"]} in late
    assert f"ignored a late reply from node {node['3']} (client 3) for round 1" in log
    # A late reply is never aggregated: each row counts only replies of its own round.
    assert all(r["aggregated"] + len(r.get("dropped", [])) == r["clients"] for r in rows)


@pytest.mark.slow
def test_serverapp_killed_resumes_from_checkpoint(tmp_path, tiny_bert_dir):
    """The ServerApp process dies after round 1; a new run with resume=true finishes
    bit-identical to the uninterrupted in-process run."""
    data = users_file(tmp_path / "data.jsonl", 3)
    ovr = tiny_overrides(tiny_bert_dir, data, **FLASC, rounds=3, checkpoint_every=1)
    sha, _ = reference(tmp_path / "ref", ovr)
    out = tmp_path / "flower"
    with Federation(tmp_path / "fed") as fed:
        start(fed, 3)
        fed.run(run_config(ovr, out, **{"min-nodes": 3}))
        fed.wait_file(out / "checkpoint.json", RUN_TIMEOUT)
        link = fed.procs[0]
        pids = fed.children(link, "flwr-serverapp")
        assert pids, fed.logs()
        import os
        import signal

        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert not (out / "summary.json").exists()
        done = json.loads((out / "checkpoint.json").read_text())["round"]
        assert 1 <= done < 3
        flower_run(fed, run_config(ovr, out, resume=True, **{"min-nodes": 3}), out)
    assert vector_sha(out) == sha
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_tls_and_supernode_auth(tmp_path, tiny_bert_dir):
    """TLS (certificates made here) and SuperNode auth: 3 registered nodes train,
    bit-identical; a node whose key is not registered is refused and trains nothing."""
    data = users_file(tmp_path / "data.jsonl", 3)
    ovr = tiny_overrides(tiny_bert_dir, data, **FLASC)
    sha, _ = reference(tmp_path / "ref", ovr)
    out = tmp_path / "flower"
    keys = tmp_path / "keys"
    with Federation(tmp_path / "fed", tls=True, auth=True) as fed:
        fed.start_superlink()
        for c in range(3):
            priv, pub = make_node_key(keys, f"node{c}")
            fed.register(pub)
            fed.start_node(c, 3, key=priv)
        intruder_key, _ = make_node_key(keys, "intruder")
        intruder = fed.start_node(0, 3, key=intruder_key, name="intruder")
        flower_run(fed, run_config(ovr, out, **{"min-nodes": 3}), out)
        assert not intruder.alive()
        assert intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.text()
        assert "Receiving: train" not in intruder.text()
    assert vector_sha(out) == sha
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(r["aggregated"] == 3 for r in rows)
    assert len(set(rows[0]["nodes"].values())) == 3
