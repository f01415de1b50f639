"""Optional HetLoRA extras: local self-pruning (Cho et al.) and loss-based rank allocation
(Byun & Lee). Both are off by default and must then leave a run exactly as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import resolved, tiny_overrides

from fedlora.config import ConfigError, load_config
from fedlora.engine import Simulation
from fedlora.methods.base import Client, Server
from fedlora.methods.hetlora import HetLoRA, HetLoRAClient, model_tail_norm
from fedlora.model.layers import lora_pairs
from fedlora.protocol import ClientTask
from fedlora.rundir import read_jsonl
from fedlora.server import hetero

# 3 tiers, r_base 2: ranks 1, 2, 4; seed 0 puts the 6 clients in tiers [1, 3, 3, 3, 1, 1].
HET = {"method.name": "hetlora", "het.tiers": 3, "het.r_base": 2, "model.rank": 4,
       "task.num_clients": 6, "clients_per_round": 4}
PRUNE = {"het.self_prune": True, "het.prune_lambda": 10.0, "het.prune_gamma": 0.5}
LOSS = {"het.rank_allocation": "loss", "het.aggregation": "replication_pad"}
TIMING = ("wall_s", "eval_s")


def _sim(tmp_path, name, tiny_bert_dir, text_file, **extra) -> Simulation:
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **{**HET, **extra}))
    return Simulation(cfg, tmp_path / name, progress=False)


def _rows(tmp_path, name: str, file: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_jsonl(tmp_path / name / file)]


def _values(sim: Simulation, r: int) -> int:
    """Values in a rank-r payload (LoRA slice plus the head)."""
    return int(sim.method.mask_for_rank(r).sum())


def _spy_ranks(sim: Simulation) -> dict[tuple[int, int], tuple[int, int]]:
    """(round, client) -> (rank trained, rank after the server received the reply)."""
    seen, receive = {}, sim.method.receive

    def spy(t, c, stats):
        before = sim.method.rank_of(c)
        reason = receive(t, c, stats)
        seen[t, c] = (before, sim.method.rank_of(c))
        return reason

    sim.method.receive = spy
    return seen


def _client(sim: Simulation, c: int, t: int = 1) -> HetLoRAClient:
    """The client half of client c, built from its instruction alone."""
    task = ClientTask(round=t, client=c, seed=sim.cfg.seed, method="hetlora", n=sim.n,
                      train={}, options=sim.method.options(t, c), payloads={"down": b""})
    return HetLoRAClient(task, sim.adapter, sim.task.initial_vector, {})


# ------------------------------------------------------------------ the penalty


def test_penalty_gradient_matches_hand_computation():
    # rank 4, gamma 1/2: the tail is components 2, 3. ||A_tail|| = 5, ||B_tail|| = 1.
    A = torch.zeros(4, 3, dtype=torch.float64)
    B = torch.zeros(2, 4, dtype=torch.float64)
    A[0] = torch.tensor([7.0, 1.0, 2.0])  # head component: not penalized
    B[:, 0] = torch.tensor([3.0, -1.0])
    A[2, 0], A[3, 1] = 3.0, 4.0
    B[0, 2], B[1, 3] = 0.6, 0.8
    A.requires_grad_(True)
    B.requires_grad_(True)
    pen = hetero.tail_penalty(A, B, 4, lam=0.1, gamma=0.5)
    assert pen.item() == pytest.approx(0.1 * 5 * 1)
    pen.backward()
    # d/dA_tail = lam ||B_tail|| A_tail / ||A_tail||, d/dB_tail = lam ||A_tail|| B_tail / ||B_tail||
    want_A = torch.zeros(4, 3, dtype=torch.float64)
    want_A[2, 0], want_A[3, 1] = 0.06, 0.08
    want_B = torch.zeros(2, 4, dtype=torch.float64)
    want_B[0, 2], want_B[1, 3] = 0.3, 0.4
    assert torch.allclose(A.grad, want_A) and torch.allclose(B.grad, want_B)


def test_method_penalty_reaches_the_flat_gradient(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "pen", tiny_bert_dir, text_file, **{**PRUNE, "het.prune_lambda": 0.3})
    top = int(np.flatnonzero(sim.method.tiers == 3)[0])  # rank 4: tail 2..3
    low = int(np.flatnonzero(sim.method.tiers == 1)[0])  # rank 1: nothing to prune
    assert _client(sim, low).penalty() is None
    P = torch.randn(sim.n, generator=torch.Generator().manual_seed(0))
    sim.adapter.load_(P)
    sim.adapter.zero_grad()
    _client(sim, top).penalty()().backward()
    want = torch.zeros(sim.n)
    for (A, B), (gA, gB) in zip(lora_pairs(sim.adapter, P), lora_pairs(sim.adapter, want)):
        a, b = A[2:4].norm(), B[:, 2:4].norm()
        gA[2:4] = 0.3 * b * A[2:4] / a
        gB[:, 2:4] = 0.3 * a * B[:, 2:4] / b
    assert torch.allclose(sim.adapter.grad, want, atol=1e-6)


# ------------------------------------------------------------------ self-pruning


def test_self_pruning_rule_and_floor(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "rule", tiny_bert_dir, text_file, **PRUNE)
    m = sim.method
    c = int(np.flatnonzero(m.tiers == 3)[0])
    start = torch.randn(sim.n, generator=torch.Generator().manual_seed(1))

    def prune(t, trained) -> int:
        """The client decides, the server records what it reported."""
        stats = {"train_loss": 1.0, "first_loss": 1.0}
        _client(sim, c, t).done(start, trained, stats)
        assert m.receive(t, c, stats) is None
        return stats["rank"]

    assert m.rank_of(c) == 4
    assert prune(1, 1.5 * start) == 4 == m.rank_of(c)  # tail grew: keep the rank
    assert prune(1, start.clone()) == 4 == m.rank_of(c)  # unchanged is not "below": keep
    assert prune(1, 0.9 * start) == 2 == m.rank_of(c)  # tail shrank: floor(4 / 2)
    assert (model_tail_norm(sim.adapter, 0.9 * start, 4, 0.5, 1)
            < model_tail_norm(sim.adapter, start, 4, 0.5, 1))
    assert prune(2, 0.9 * start) == 1 == m.rank_of(c)
    assert prune(3, 0.0 * start) == 1 == m.rank_of(c) == m.r_min  # never below the floor
    low = int(np.flatnonzero(m.tiers == 1)[0])
    stats = {"train_loss": 1.0, "first_loss": 1.0}
    _client(sim, low).done(start, 0.0 * start, stats)
    assert stats["rank"] == 1 and m.receive(1, low, stats) is None and m.rank_of(low) == 1
    assert m.state_json()["ranks"] == {str(c): 1}  # sparse: only the pruned client


def test_server_refuses_a_rank_it_never_gave(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "liar", tiny_bert_dir, text_file, **PRUNE)
    m = sim.method
    c = int(np.flatnonzero(m.tiers == 3)[0])
    assert "reported rank 3" in m.receive(1, c, {"rank": 3, "first_loss": 1.0})
    assert m.rank_of(c) == 4  # nothing recorded


def test_pruned_rank_helper():
    assert hetero.pruned_rank(16, 0.5) == 8
    assert hetero.pruned_rank(16, 0.99) == 15
    assert hetero.pruned_rank(3, 0.1) == 1
    assert hetero.pruned_rank(4, 0.1, r_min=2) == 2
    assert hetero.pruned_rank(2, 0.5, r_min=2) == 2  # at the floor already
    assert hetero.pruned_rank(4, 1.0) == 4
    for gamma in (0.0, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            hetero.pruned_rank(4, gamma)


def test_pruned_rank_persists_and_shapes_the_traffic(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "persist", tiny_bert_dir, text_file, **PRUNE, rounds=4)
    seen = _spy_ranks(sim)
    sim.run()
    pruned = [(t, c) for (t, c), (r, r_new) in seen.items() if r_new < r]
    assert pruned, "want at least one self-prune in this run"
    assert all(r_new == hetero.pruned_rank(r, 0.5) for r, r_new in seen.values() if r_new < r)
    tier = {c: hetero.tier_rank(int(b), 2) for c, b in enumerate(sim.method.tiers)}
    assert any(int(sim.method.ranks[c]) < tier[c] for c in tier)
    last: dict[int, int] = {}  # a client's next round trains the rank it left the last one with
    for (_t, c), (r, r_new) in sorted(seen.items()):
        assert r == last.get(c, tier[c]) and r_new >= 1
        last[c] = r_new
    ledger = {(row["round"], row["client"]): row for row in
              read_jsonl(tmp_path / "persist" / "ledger.jsonl")}
    for (t, c), (r, r_new) in seen.items():  # values only: download at r, upload at r_new
        down, up = 4 * _values(sim, r), 4 * _values(sim, r_new)
        assert down < ledger[t, c]["download_bytes"] <= down + 32
        assert up < ledger[t, c]["upload_bytes"] <= up + 32


def test_self_prune_off_is_bit_identical(tmp_path, tiny_bert_dir, text_file, monkeypatch):
    """With the extras off the new hooks do nothing: same P, metrics and ledger as a run
    whose method has the base (pre-extras) hooks, and nothing new in the checkpoint."""
    extra = {"rounds": 3, "het.aggregation": "sparsity_weighted"}
    new = _sim(tmp_path, "new", tiny_bert_dir, text_file, **extra)
    assert _client(new, 1).penalty() is None and new.method.state_json() == {}
    new.run()
    for hook in ("cohort_sampled", "state_json", "load_state"):
        monkeypatch.setattr(HetLoRA, hook, getattr(Server, hook))
    monkeypatch.setattr(HetLoRA, "receive", lambda self, t, c, stats: None)
    monkeypatch.setattr(HetLoRAClient, "penalty", Client.penalty)
    monkeypatch.setattr(HetLoRAClient, "done", Client.done)
    monkeypatch.setattr(HetLoRA, "rank_of",  # the tier rule as it was before the extras
                        lambda self, c: hetero.tier_rank(int(self.tiers[c]), self.cfg.het.r_base))
    old = _sim(tmp_path, "old", tiny_bert_dir, text_file, **extra)
    old.run()
    assert torch.equal(new.P, old.P)
    for file in ("metrics.jsonl", "ledger.jsonl"):
        assert _rows(tmp_path, "new", file) == _rows(tmp_path, "old", file)


# ------------------------------------------------------------------ loss-based allocation


def test_loss_based_ranks_unknown_losses_and_tiebreak():
    got = hetero.loss_based_ranks([0.5, math.inf, 0.1, math.inf], [4, 2, 1, 1],
                                  tiebreak=[4, 2, 1, 1])
    assert got.tolist() == [2, 1, 4, 1]  # known losses first, then the unknown by tier
    assert sorted(got.tolist()) == [1, 1, 2, 4]
    none_known = hetero.loss_based_ranks([math.inf] * 4, [1, 4, 2, 1], tiebreak=[1, 4, 2, 1])
    assert none_known.tolist() == [1, 4, 2, 1]  # exactly the tier assignment
    with pytest.raises(ValueError, match="client 1"):
        hetero.loss_based_ranks([0.1, math.nan], [1, 2])


def test_loss_allocation_gives_the_lowest_loss_the_highest_rank(tmp_path, tiny_bert_dir,
                                                                 text_file):
    sim = _sim(tmp_path, "alloc", tiny_bert_dir, text_file, **LOSS)
    m = sim.method
    cohort = [0, 1, 2, 4]  # tiers 1, 3, 3, 1: ranks {1, 4, 4, 1}
    tier_ranks = sorted(int(m.ranks[c]) for c in cohort)
    m.cohort_sampled(1, cohort)  # nobody reported yet: the tier ranks
    assert [m.rank_of(c) for c in cohort] == [int(m.ranks[c]) for c in cohort]
    m.last_loss[[0, 1, 2, 4]] = [0.2, 0.9, 0.5, 0.1]
    m.cohort_sampled(2, cohort)
    got = {c: m.rank_of(c) for c in cohort}
    assert got == {4: 4, 0: 4, 2: 1, 1: 1}
    assert sorted(got.values()) == tier_ranks  # the same bandwidth budget


def test_loss_allocation_end_to_end(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "e2e", tiny_bert_dir, text_file, **LOSS, rounds=3)
    m, per_round = sim.method, {}
    sampled = m.cohort_sampled

    def spy(t, cohort):
        losses = m.last_loss[cohort].copy()
        sampled(t, cohort)
        per_round[t] = (list(cohort), losses, [m.rank_of(c) for c in cohort])

    m.cohort_sampled = spy
    sim.run()
    tier = [hetero.tier_rank(int(b), 2) for b in m.tiers]
    for t, (cohort, losses, ranks) in per_round.items():
        assert sorted(ranks) == sorted(tier[c] for c in cohort)
        known = np.isfinite(losses)
        if t == 1:
            assert not known.any() and ranks == [tier[c] for c in cohort]
        if known.any():  # the lowest reported loss trains the highest rank of the cohort
            assert ranks[int(np.argmin(losses))] == max(ranks)
    assert any(np.isfinite(per_round[t][1]).any() for t in per_round), "want a known loss"
    ledger = read_jsonl(tmp_path / "e2e" / "ledger.jsonl")
    for row in ledger:  # the upload is the assigned rank's slice, values only
        cohort, _, ranks = per_round[row["round"]]
        k = _values(sim, ranks[cohort.index(row["client"])])
        assert 4 * k < row["upload_bytes"] <= 4 * k + 32


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("extra", [PRUNE, LOSS], ids=["self_prune", "loss"])
def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_bert_dir, text_file, extra):
    extra = {**extra, "rounds": 4, "checkpoint_every": 2}
    full = _sim(tmp_path, "full", tiny_bert_dir, text_file, **extra)
    full.run()
    crashed = _sim(tmp_path, "crash", tiny_bert_dir, text_file, **extra)

    def crash(t, c, payload):
        if t == 4:
            raise KeyboardInterrupt
        return payload

    crashed.tamper = crash
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    resumed = Simulation.resume(tmp_path / "crash", progress=False)
    assert resumed.round == 2
    fresh = _sim(tmp_path, "fresh", tiny_bert_dir, text_file, **extra).method.state_json()
    assert resumed.method.state_json() != fresh, "the checkpoint must carry changed state"
    resumed.run()
    assert torch.equal(resumed.P, full.P)
    for file in ("metrics.jsonl", "ledger.jsonl"):
        assert _rows(tmp_path, "crash", file) == _rows(tmp_path, "full", file)
    assert resumed.method.state_json() == full.method.state_json()


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("sets, field", [
    ({"het.prune_lambda": -1}, "het.prune_lambda"),
    ({"het.prune_lambda": ".inf", "het.self_prune": True}, "het.prune_lambda"),
    ({"het.prune_lambda": 0.1}, "het.prune_lambda"),  # without self_prune
    ({"het.prune_gamma": 0}, "het.prune_gamma"),
    ({"het.prune_gamma": 1.5}, "het.prune_gamma"),
    ({"het.self_prune": True, "het.prune_gamma": 1}, "het.prune_gamma"),  # never prunes
    ({"het.self_prune": "maybe"}, "het.self_prune"),
    ({"het.self_prune": True, "method.name": "flasc_tiers"}, "het.self_prune"),
    ({"het.rank_allocation": "random"}, "het.rank_allocation"),
    ({"het.rank_allocation": "loss", "method.name": "lora"}, "het.rank_allocation"),
    ({"het.rank_allocation": "loss", "method.name": "all_lowest_tier"}, "het.rank_allocation"),
    ({"het.rank_allocation": "loss", "het.self_prune": True}, "het.rank_allocation"),
    ({"het.rank_allocation": "loss", "dp.enabled": True}, "het.rank_allocation"),
])
def test_bad_config_names_the_field(sets, field):
    base = {"method.name": "hetlora", "het.tiers": 3, "het.r_base": 2, "model.rank": 4}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolved(None, [f"{k}={v}" for k, v in {**base, **sets}.items()])


def test_good_config_defaults_off():
    cfg = load_config(None, ["method.name=hetlora", "het.tiers=3", "het.r_base=2",
                             "model.rank=4", "het.self_prune=true", "het.prune_lambda=0.01",
                             "het.prune_gamma=0.5"])
    assert cfg.het.self_prune and cfg.het.rank_allocation == "tier"
    default = load_config(None, [])
    assert not default.het.self_prune and default.het.prune_lambda == 0
    assert default.het.rank_allocation == "tier"
