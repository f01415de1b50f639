"""Per-client evaluation: the local test split, the summaries, and the engine's pers/* rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from fedlora.config import ConfigError, load_config
from fedlora.data.partition import hold_out
from fedlora.personal.summary import metric_row, summarize
from fedlora.rng import np_rng
from fedlora.rundir import read_jsonl


def test_hold_out_stratified_disjoint_and_seeded():
    labels = np.array([0] * 6 + [1] * 4 + [2] * 10)
    parts = [np.arange(0, 10), np.arange(10, 20), np.array([3]), np.zeros(0, np.int64)]
    train, test = hold_out(parts, labels, 0.5, lambda k: np_rng(0, "local_test", k))
    again = hold_out(parts, labels, 0.5, lambda k: np_rng(0, "local_test", k))
    other = hold_out(parts, labels, 0.5, lambda k: np_rng(1, "local_test", k))
    for a, b in zip(test, again[1]):
        assert np.array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(test, other[1]))
    for p, tr, te in zip(parts, train, test):
        assert len(np.intersect1d(tr, te)) == 0
        assert np.array_equal(np.sort(np.concatenate([tr, te])), np.sort(p))
    # client 0: 6 of class 0 and 4 of class 1 -> 3 + 2 held out (stratified)
    assert np.bincount(labels[test[0]], minlength=3).tolist() == [3, 2, 0]
    assert len(test[1]) == 5 and set(labels[test[1]]) == {2}
    assert len(test[2]) == 0 and train[2].tolist() == [3]  # one example: kept for training
    assert len(test[3]) == 0 and len(train[3]) == 0
    # unlabelled (next-token tasks): a plain random share
    _, test_u = hold_out(parts, None, 0.3, lambda k: np_rng(0, "local_test", k))
    assert [len(t) for t in test_u] == [3, 3, 0, 0]


def test_summaries_on_three_clients():
    acc = {0: 0.9, 1: 0.5, 2: 0.7}
    ref = {0: 0.8, 1: 0.5, 2: 0.75}  # client 0 better, 1 tied (not better), 2 worse
    s = summarize(acc, ref)
    assert s["mean"] == pytest.approx(0.7)
    assert s["median"] == pytest.approx(0.7)
    assert s["p10"] == pytest.approx(0.5 + 0.2 * 0.2)  # linear: 10% of the way 0.5 -> 0.7
    assert s["beats_local"] == pytest.approx(1 / 3)
    assert s["clients"] == 3
    ppl = summarize({0: 10.0, 1: 20.0, 2: 30.0}, {0: 12.0, 1: 18.0, 2: 31.0},
                    higher_is_better=False)
    assert ppl["beats_local"] == pytest.approx(2 / 3)
    assert "beats_local" not in summarize(acc)
    assert metric_row("deployed", {"p10": 0.1}) == {"pers/deployed/p10": 0.1}
    with pytest.raises(ValueError, match="no per-client values"):
        summarize({})


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="eval.personalized.*local_test_fraction"):
        load_config(None, ["eval.personalized=true"])
    with pytest.raises(ConfigError, match="task.local_test_fraction"):
        load_config(None, ["task.local_test_fraction=1"])
    with pytest.raises(ConfigError, match="eval.clients"):
        load_config(None, ["eval.clients=0"])


def test_engine_writes_per_client_metrics(tiny_bert_dir, text_file, tmp_path):
    from fedlora.client.personal import client_metric
    from fedlora.engine import Simulation

    cfg = load_config(None, tiny_overrides(
        tiny_bert_dir, text_file, **{"task.local_test_fraction": 0.25, "eval.personalized": True,
                                     "eval.clients": 3, "eval.local_steps": 2}))
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    data = sim.task.data
    assert all(len(t) == 4 for t in data.local_test)  # 16 training examples per user, 1/4 out
    sim.run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    per = read_jsonl(tmp_path / "run" / "personal.jsonl")
    assert [r["round"] for r in per] == [1, 2] and len(per[0]["clients"]) == 3
    last, final = rows[-1], per[-1]
    for model in ("global", "deployed", "local"):
        assert last[f"pers/{model}/mean"] == pytest.approx(np.mean(final[model]))
        assert last[f"pers/{model}/p10"] == pytest.approx(np.percentile(final[model], 10))
    assert final["deployed"] == final["global"]  # flasc deploys the global model
    # each per-client value is the accuracy of P on that client's held-out examples
    for c, value in zip(final["clients"], final["global"]):
        m = client_metric(sim.task, sim.adapter, sim.P, data.local_test[c], 64, sim.device)
        assert value == pytest.approx(m["accuracy"])
        held = set(data.local_test[c].tolist())
        assert not held & set(data.clients[c].tolist())  # never trained on
    beats = np.mean(np.array(final["global"]) > np.array(final["local"]))
    assert last["pers/global/beats_local"] == pytest.approx(beats)
    ref = json.loads((tmp_path / "run" / "personal_reference.json").read_text())
    assert sorted(int(k) for k in ref) == final["clients"]
    assert torch.isfinite(sim.P).all()

    from fedlora.report import read_per_client, report

    assert read_per_client(tmp_path / "run") == final
    md = report([tmp_path / "run"], tmp_path / "report").read_text()
    assert "per_client.png" in md and (tmp_path / "report" / "per_client.png").stat().st_size > 0


def test_fusion_weights_pick_the_grid_point_of_least_penalised_loss():
    from fedlora.client.personal import FUSION_GRID, fuse, fusion_weights

    p, g = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, -1.0])
    target = fuse(p, g, (0.5, 1.5))
    calls = []

    def loss_of(v):
        calls.append(v)
        return float(((v - target) ** 2).sum())

    w, score = fusion_weights(loss_of, p, g, l1=0.01)
    assert w == (0.5, 1.5) and score == pytest.approx(0.01 * 2.0)
    assert len(calls) == len(FUSION_GRID) ** 2
    # a large L1 penalty pulls the weights to zero: the base model alone
    assert fusion_weights(loss_of, p, g, l1=100.0)[0] == (0.0, 0.0)
    # equal scores: the first candidate in grid order wins
    assert fusion_weights(lambda v: 1.0, p, g, l1=0.0)[0] == (FUSION_GRID[0], FUSION_GRID[0])
