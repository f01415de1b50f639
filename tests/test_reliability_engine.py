"""Engine-side reliability: non-finite aggregates, clients dropped with reasons, robust
rejections in metrics, run lock, layout mismatch, bad-row counts in summary.json."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides

from fedlora import rundir, runner
from fedlora.comm import codec
from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.rundir import RunDirError, read_jsonl


def sim(tmp_path, tiny_bert_dir, text_file, name="run", **extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    return Simulation(cfg, tmp_path / name, progress=False)


def replace_values(payload: bytes, value: float) -> bytes:
    n = codec.header(payload)["n"]
    pos, vals = codec.decode_sparse(payload, n)
    dense = torch.zeros(n)
    dense[pos] = value
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pos] = True
    return codec.encode(dense, None if bool(mask.all()) else mask)


def test_huge_finite_uploads_never_make_p_non_finite(tmp_path, tiny_bert_dir, text_file):
    """Section 0: three finite uploads of 3e38 overflowed the sum, the bad P was checkpointed
    and round 2 died. Now the offenders are rejected and the run goes on."""
    s = sim(tmp_path, tiny_bert_dir, text_file, **{"method.name": "lora",
                                                   "server.optimizer": "fedavg",
                                                   "server.lr": 1.0, "checkpoint_every": 1})
    s.tamper = lambda t, c, p: replace_values(p, 3e38) if t == 1 else p
    summary = s.run()
    assert summary["finished"] and torch.isfinite(s.P).all()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows[0]["rejected"]) >= 1 and all(
        "non-finite" in why for why in rows[0]["rejected"].values())
    assert "rejected" not in rows[1] and summary["rejected_updates"] == len(rows[0]["rejected"])
    tensors, meta = rundir.load_checkpoint(tmp_path / "run")
    assert torch.isfinite(tensors["P"]).all()


def test_client_failures_drop_that_client_with_a_reason(tmp_path, tiny_bert_dir, text_file,
                                                        monkeypatch):
    victims = {}
    real_train = runner.train_client

    def train(task, adapter, batches, **kw):
        t = len(victims)
        if t == 0:  # the first client trained diverges: a real non-finite adapter
            victims["nan"] = True
            adapter.load_(torch.full_like(adapter.vector, float("nan")))
        stats = real_train(task, adapter, batches, **kw)
        if t == 1:  # the second one's update is far beyond the float16 range
            victims["big"] = True
            adapter.load_(adapter.vector * 1e9)
        return stats

    monkeypatch.setattr(runner, "train_client", train)
    s = sim(tmp_path, tiny_bert_dir, text_file, **{"comm.up_values": "float16"})
    summary = s.run()
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    reasons = list(row["dropped_reasons"].values())
    assert len(row["dropped"]) == 2 and row["aggregated"] == row["clients"] - 2
    assert "local training failed" in reasons[0] and "diverged" in reasons[0]
    assert "float16" in reasons[1]
    assert summary["finished"] and summary["dropped_uploads"] == 2


def test_download_above_max_bytes_drops_the_client_and_the_round_goes_on(
        tmp_path, tiny_bert_dir, text_file):
    s = sim(tmp_path, tiny_bert_dir, text_file, **{"method.d_down": 1.0, "method.d_up": "1/8"})
    n = s.n
    s.cfg.comm.max_bytes = 2 * n  # a dense float32 download (4n) is too big, uploads fit
    summary = s.run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["aggregated"] == 0 and len(r["dropped"]) == r["clients"] for r in rows)
    assert all("exceeds comm.max_bytes" in why for why in rows[0]["dropped_reasons"].values())
    assert summary["finished"] and rows[0]["download_bytes"] == 0  # nothing was sent


def test_robust_rejections_are_in_metrics(tmp_path, tiny_bert_dir, text_file):
    s = sim(tmp_path, tiny_bert_dir, text_file, **{"server.robust.max_norm_x_median": 3})
    first = []

    def scale(t, c, p):
        if not first or first[0] == (t, c):
            first[:] = [(t, c)]
            n = codec.header(p)["n"]
            pos, vals = codec.decode_sparse(p, n)
            dense = torch.zeros(n)
            dense[pos] = vals * 1000
            mask = torch.zeros(n, dtype=torch.bool)
            mask[pos] = True
            return codec.encode(dense, mask)
        return p

    s.tamper = scale
    s.run()
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    t, c = first[0]
    assert row["rejected"] == {str(c): pytest.approx(row["rejected"][str(c)])}
    assert "> bound" in row["rejected"][str(c)] and row["aggregated"] == row["clients"] - 1


def test_second_writer_on_a_run_dir_is_refused(tmp_path, tiny_bert_dir, text_file):
    a = sim(tmp_path, tiny_bert_dir, text_file, rounds=1)
    with pytest.raises(RunDirError, match="in use by another fedlora process"):
        Simulation.resume(tmp_path / "run", progress=False)
    a.run()  # releases the lock
    Simulation.resume(tmp_path / "run", progress=False).run()


def test_resume_with_another_layout_is_refused_and_changes_nothing(tmp_path, tiny_bert_dir,
                                                                   text_file):
    sim(tmp_path, tiny_bert_dir, text_file, rounds=1).run()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    data = (tmp_path / "run" / "config.yaml").read_text().replace("rank: 4", "rank: 2")
    (tmp_path / "run" / "config.yaml").write_text(data)
    before["config.yaml"] = data.encode()
    with pytest.raises(RunDirError, match="layout.json does not match"):
        Simulation.resume(tmp_path / "run", progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before


def test_bad_rows_are_counted_in_summary(tmp_path, tiny_bert_dir, text_file):
    with open(text_file, "a") as f:
        f.write('{"text": "", "label": "food", "client": "user1"}\nnot json\n')
    with pytest.raises(ValueError, match="line 121 column 'text': is empty"):
        sim(tmp_path, tiny_bert_dir, text_file, name="strict", rounds=1)
    s = sim(tmp_path, tiny_bert_dir, text_file, rounds=1, **{"task.on_bad_rows": "skip"})
    s.run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_rows"]["skipped"] == 2
    assert summary["bad_rows"]["reasons"] == {"text: is empty": 1, "not valid JSON": 1}
