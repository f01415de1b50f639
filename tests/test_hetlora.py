"""HetLoRA and budget tiers, end to end: the flat aggregation equals the per-layer rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import resolved, tiny_overrides

from fedlora.config import ConfigError, load_config
from fedlora.engine import Simulation
from fedlora.model.layers import lora_pairs
from fedlora.rundir import read_jsonl
from fedlora.server import hetero

HET = {"het.tiers": 3, "het.r_base": 2, "model.rank": 4, "rounds": 1, "task.num_clients": 6,
       "server.optimizer": "fedavg", "server.lr": 1.0, "clients_per_round": 4}


def _sim(tmp_path, name, tiny_bert_dir, text_file, **extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **{**HET, **extra}))
    return Simulation(cfg, tmp_path / name, progress=False)


def _spy_round(sim):
    seen = {}

    def spy(t, c, payload):
        seen[c] = payload
        return payload

    sim.tamper = spy
    P0 = sim.P.clone()
    sim.run()
    trained = {}
    for c, payload in seen.items():
        m = sim.method.mask_for_rank(sim.method.rank_of(c))
        delta = sim._receive(payload, m)
        trained[c] = (P0 * m - delta, sim.method.rank_of(c))
    return P0, trained


@pytest.mark.parametrize("rule", ["zero_pad", "replication_pad", "sparsity_weighted"])
def test_flat_aggregation_equals_the_per_layer_rule(tmp_path, tiny_bert_dir, text_file, rule):
    sim = _sim(tmp_path, rule, tiny_bert_dir, text_file, **{"method.name": "hetlora",
                                                            "het.aggregation": rule})
    P0, trained = _spy_round(sim)
    assert len({r for _, r in trained.values()}) > 1, "want mixed ranks in the cohort"
    clients = list(trained)
    per_client = [list(lora_pairs(sim.adapter, trained[c][0])) for c in clients]
    prev = list(lora_pairs(sim.adapter, P0))
    new = list(lora_pairs(sim.adapter, sim.P))
    scaling = sim.cfg.model.alpha / 4
    if rule == "sparsity_weighted":
        norms = [sum(float(n) ** 2 for n in (torch.linalg.matrix_norm(scaling * (B @ A))
                                             for A, B in pc)) ** 0.5 for pc in per_client]
        weights = hetero.normalize_weights(norms)
    else:
        weights = [1 / len(clients)] * len(clients)
    for layer, (A_new, B_new) in enumerate(new):
        As = [pc[layer][0][: trained[c][1]] for pc, c in zip(per_client, clients)]
        Bs = [pc[layer][1][:, : trained[c][1]] for pc, c in zip(per_client, clients)]
        if rule == "replication_pad":
            A, B = hetero.replication_pad(As, Bs, weights, 4, prev_A=prev[layer][0],
                                          prev_B=prev[layer][1])
        else:
            A, B = hetero.zero_pad(As, Bs, weights, 4)
        assert torch.allclose(A_new, A, atol=1e-6) and torch.allclose(B_new, B, atol=1e-6)


def test_tiers_are_fixed_by_the_seed_and_independent_of_the_method(tmp_path, tiny_bert_dir,
                                                                   text_file):
    a = _sim(tmp_path, "h", tiny_bert_dir, text_file, **{"method.name": "hetlora"})
    b = _sim(tmp_path, "f", tiny_bert_dir, text_file, **{"method.name": "flasc_tiers"})
    assert np.array_equal(a.method.tiers, b.method.tiers)
    assert set(a.method.tiers) <= {1, 2, 3}


def test_hetlora_sends_values_only_and_evaluates_every_tier(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "bytes", tiny_bert_dir, text_file, **{"method.name": "hetlora"})
    summary = sim.run()
    for row in read_jsonl(tmp_path / "bytes" / "ledger.jsonl"):
        k = int(sim.method.mask_for_rank(sim.method.rank_of(row["client"])).sum())
        assert 4 * k < row["upload_bytes"] <= 4 * k + 32  # float32 values + a small header
    last = read_jsonl(tmp_path / "bytes" / "metrics.jsonl")[-1]
    assert "tier1/accuracy" in last and "tier2/accuracy" in last and summary["finished"]


def test_flasc_tiers_bytes_follow_the_tier(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "ft", tiny_bert_dir, text_file, **{"method.name": "flasc_tiers"})
    sim.run()
    for row in read_jsonl(tmp_path / "ft" / "ledger.jsonl"):
        d = sim.method.rank_of(row["client"]) / 4
        assert row["upload_bytes"] <= 4 * sim.n * d * 1.25 + 64


def test_highest_tier_only_samples_the_top_tier(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "top", tiny_bert_dir, text_file, **{"method.name": "highest_tier_only",
                                                             "rounds": 2})
    sim.run()
    clients = {r["client"] for r in read_jsonl(tmp_path / "top" / "ledger.jsonl")}
    assert clients and all(sim.method.tiers[c] == 3 for c in clients)


def test_rank_must_match_the_tiers():
    with pytest.raises(ConfigError, match="model.rank"):
        resolved(None, ["method.name=hetlora", "het.tiers=3", "het.r_base=4",
                           "model.rank=8"])
