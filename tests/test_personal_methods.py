"""The personalization methods: bytes, client-held state, deployment, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from fedlora.comm import codec
from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.rundir import read_jsonl

PERS = {"task.local_test_fraction": 0.25, "eval.personalized": True, "eval.clients": 3,
        "eval.local_steps": 2}
TIMING = ("wall_s", "eval_s")


def _sim(tiny_bert_dir, text_file, out, **extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **{**PERS, **extra}))
    return Simulation(cfg, out, progress=False)


def _metrics(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out /
                                                                              "metrics.jsonl")]


def test_local_only_sends_nothing_and_deploys_its_own_adapter(tiny_bert_dir, text_file,
                                                               tmp_path):
    sim = _sim(tiny_bert_dir, text_file, tmp_path / "run", **{"method.name": "local_only"})
    sim.run()
    ledger = read_jsonl(tmp_path / "run" / "ledger.jsonl")
    assert len(ledger) == 2 * 3
    assert all(r["upload_bytes"] == 0 and r["download_bytes"] == 0 for r in ledger)
    rows = _metrics(tmp_path / "run")
    assert all(r["cum_upload_bytes"] == 0 and r["cum_download_bytes"] == 0 for r in rows)
    assert all("dropped" not in r and r["train_loss"] is not None for r in rows)
    assert torch.equal(sim.P, sim.task.initial_vector)  # the server never moves
    trained = {c for r in ledger for c in [r["client"]]}
    for c in trained:  # each sampled client keeps an adapter of its own
        own = sim.runner.store.load(c)["personal"]
        assert not torch.equal(own, sim.task.initial_vector.cpu())
    per = read_jsonl(tmp_path / "run" / "personal.jsonl")[-1]
    assert per["deployed"] != per["global"] or not set(per["clients"]) & trained


def test_finetune_global_trains_exactly_like_its_base(tiny_bert_dir, text_file, tmp_path):
    base = _sim(tiny_bert_dir, text_file, tmp_path / "flasc", **{"method.name": "flasc"})
    base.run()
    ft = _sim(tiny_bert_dir, text_file, tmp_path / "ft", **{"method.name": "finetune_global",
                                                           "method.finetune_steps": 3})
    ft.run()
    assert torch.equal(base.P, ft.P)
    assert read_jsonl(tmp_path / "flasc" / "ledger.jsonl") == \
        read_jsonl(tmp_path / "ft" / "ledger.jsonl")
    a, b = _metrics(tmp_path / "flasc")[-1], _metrics(tmp_path / "ft")[-1]
    assert a["accuracy"] == b["accuracy"] and a["pers/global/mean"] == b["pers/global/mean"]
    pa = read_jsonl(tmp_path / "flasc" / "personal.jsonl")[-1]
    pb = read_jsonl(tmp_path / "ft" / "personal.jsonl")[-1]
    assert pa["deployed"] == pa["global"] == pb["global"]
    assert pb["deployed"] != pb["global"]  # fine-tuned on each client's own examples


def test_flasc_personal_is_flasc_until_a_residual_exists(tiny_bert_dir, text_file, tmp_path):
    # d_up = 1 leaves nothing behind: FLASC exactly, no client state
    for d in ("1", "1/4"):
        rounds = 2 if d == "1" else 1  # at 1/4 a residual exists from the 2nd visit on
        flasc = _sim(tiny_bert_dir, text_file, tmp_path / f"f{rounds}",
                     **{"method.name": "flasc", "method.d_up": d, "rounds": rounds})
        flasc.run()
        pers = _sim(tiny_bert_dir, text_file, tmp_path / f"p{rounds}",
                    **{"method.name": "flasc_personal", "method.d_up": d, "rounds": rounds})
        pers.run()
        assert torch.equal(flasc.P, pers.P)
        assert read_jsonl(tmp_path / f"f{rounds}" / "ledger.jsonl") == \
            read_jsonl(tmp_path / f"p{rounds}" / "ledger.jsonl")
        has_state = (tmp_path / f"p{rounds}" / "clients").exists()
        assert has_state == (d != "1")
    # at 1/4 each sampled client keeps what it did not send: at most the 3/4 of the entries
    # outside its top-k upload, and no entry it sent (the upload's positions)
    ledger = read_jsonl(tmp_path / "p1" / "ledger.jsonl")
    for c in {r["client"] for r in ledger}:
        r = pers.runner.store.load(c)["residual"]
        nz = int((r != 0).sum())
        assert 0 < nz <= r.numel() - r.numel() // 4
        assert float(r.abs().max()) > 0


def _windows(v: torch.Tensor, k: int = 8, count: int = 16) -> list[bytes]:
    """`count` runs of k consecutive float32 values of v, as bytes (nonzero runs only)."""
    raw = v.detach().cpu().float().contiguous().numpy()
    rng = np.random.default_rng(0)
    out = []
    for start in rng.choice(len(raw) - k, size=count * 4, replace=False):
        w = raw[start:start + k]
        if np.count_nonzero(w) == k:
            out.append(w.tobytes())
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("d_up", ["1", "1/4"])
def test_fdlora_personal_bytes_never_cross_the_wire(tiny_bert_dir, text_file, tmp_path, d_up):
    sim = _sim(tiny_bert_dir, text_file, tmp_path / "run",
               **{"method.name": "fdlora", "method.d_up": d_up, "rounds": 3})
    n = sim.n
    # plant a recognizable personal adapter in every client before the run: the initial
    # adapter plus a fixed pattern, so no other vector of the run shares its bytes
    pattern = 1e-2 * torch.sin(torch.arange(n, dtype=torch.float32) * 0.7) + 3e-3
    planted = sim.task.initial_vector.cpu() + pattern
    for c in range(len(sim.task.data.clients)):
        sim.runner.store.save(c, 0, {"personal": planted})
    wire: list[bytes] = []
    received_windows: list[bytes] = []
    personal_states: list[torch.Tensor] = [planted]
    run_one, save = sim.runner.run, sim.runner.store.save

    def spy_run(ct):
        wire.extend(ct.payloads.values())
        received, _ = sim.runner.decode_download(ct, None)
        received_windows.extend(_windows(received, count=2))
        res = run_one(ct)
        wire.append(res.upload)
        return res

    def spy_save(c, r, tensors):
        before = sim.runner.store.load(c)["personal"]
        personal_states.append(tensors["personal"].clone())
        personal_states.append(before - tensors["personal"])  # its update, as an upload would be
        save(c, r, tensors)

    sim.runner.run, sim.runner.store.save = spy_run, spy_save
    sim.runner.run_many = lambda cts: [spy_run(ct) for ct in cts]
    sim.run()
    assert len(personal_states) == 1 + 2 * 3 * 3
    blob = b"".join(wire)
    files = b"".join((tmp_path / "run" / f).read_bytes()
                     for f in ("ledger.jsonl", "metrics.jsonl", "personal.jsonl"))
    # the scan finds what was sent (the download carries the global vector's values) ...
    assert received_windows and all(w in blob for w in received_windows)
    # ... and never any personal adapter: planted, or trained by a client
    for state in personal_states:
        for w in _windows(state):
            assert w not in blob and w not in files
    # the ledger counts the global half's payloads only
    ledger = read_jsonl(tmp_path / "run" / "ledger.jsonl")
    assert sum(r["upload_bytes"] + r["download_bytes"] for r in ledger) == len(blob)
    lora = _sim(tiny_bert_dir, text_file, tmp_path / "lora",
                **{"method.name": "flasc", "method.d_up": d_up, "rounds": 3})
    lora.run()
    assert [r["upload_bytes"] for r in ledger] == \
        [r["upload_bytes"] for r in read_jsonl(tmp_path / "lora" / "ledger.jsonl")]
    # deployed = the fusion of the personal and global adapters, per client
    per = read_jsonl(tmp_path / "run" / "personal.jsonl")[-1]
    assert len(per["deployed"]) == 3


@pytest.mark.parametrize("method", ["fdlora", "flasc_personal", "local_only"])
def test_resume_with_client_state_equals_an_uninterrupted_run(tiny_bert_dir, text_file,
                                                              tmp_path, method):
    over = {"method.name": method, "rounds": 4, "checkpoint_every": 2, "eval_every": 1}
    full = _sim(tiny_bert_dir, text_file, tmp_path / "full", **over)
    full.run()
    part = _sim(tiny_bert_dir, text_file, tmp_path / "part", **over)
    run_many = part.runner.run_many

    def crash_in_round_4(cts):
        results = run_many(cts)  # round 4's clients trained and saved their state ...
        if cts[0].round == 4:
            raise KeyboardInterrupt  # ... then the process died before the server closed it
        return results

    part.runner.run_many = crash_in_round_4
    with pytest.raises(KeyboardInterrupt):
        part.run()
    # round 3 ran after the round-2 checkpoint: it and round 4's state must be rolled back
    resumed = Simulation.resume(tmp_path / "part", progress=False)
    assert resumed.round == 2
    resumed.run()
    assert torch.equal(full.P, resumed.P)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "part")
    for f in ("ledger.jsonl", "personal.jsonl"):
        assert read_jsonl(tmp_path / "full" / f) == read_jsonl(tmp_path / "part" / f)
    for c in range(len(full.task.data.clients)):
        a, b = full.runner.store.load(c), resumed.runner.store.load(c)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks_personal_base(tiny_bert_dir, text_file):
    from fedlora.config import ConfigError
    from fedlora.engine import resolve_config

    with pytest.raises(ConfigError, match="method.base"):
        resolve_config(load_config(None, ["method.name=finetune_global", "method.base=hetlora"]))
    with pytest.raises(ConfigError, match="method.fusion_l1"):
        resolve_config(load_config(None, ["method.name=fdlora", "method.fusion_l1=-1"]))
    cfg = resolve_config(load_config(None, ["method.name=fdlora"]))
    assert cfg.method.d_up == 1.0  # FDLoRA's global module is dense unless d_up says so
    assert codec  # the payload codec is what the ledger counts (imported for the scan)
