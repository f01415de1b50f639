"""DP-FedAdam wired into the engine: order of operations, accounting, Poisson sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import resolved, tiny_overrides

from fedlora.cli import main
from fedlora.comm import codec
from fedlora.config import ConfigError, load_config
from fedlora.engine import Simulation
from fedlora.privacy import clip, epsilon
from fedlora.rng import torch_generator
from fedlora.rundir import read_jsonl


def _sim(tmp_path, name, tiny_bert_dir, text_file, **extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    return Simulation(cfg, tmp_path / name, progress=False)


def test_sigma_zero_and_no_clip_equals_the_non_private_run(tmp_path, tiny_bert_dir, text_file):
    a = _sim(tmp_path, "plain", tiny_bert_dir, text_file, **{"method.d_up": "1/4"})
    a.run()
    b = _sim(tmp_path, "dp", tiny_bert_dir, text_file,
             **{"method.d_up": "1/4", "dp.enabled": "true", "dp.clip": "inf"})
    b.run()
    assert torch.equal(a.P, b.P)


def test_order_is_sparsify_clip_sum_noise_divide(tmp_path, tiny_bert_dir, text_file):
    C, sigma = 1e-3, 0.5
    sim = _sim(tmp_path, "order", tiny_bert_dir, text_file, rounds=1,
               **{"method.d_up": "1/8", "dp.enabled": "true", "dp.clip": C,
                  "dp.noise_multiplier": sigma, "server.optimizer": "fedavg", "server.lr": 1.0})
    P0 = sim.P.clone()
    seen = []
    sim.tamper = lambda t, c, p: seen.append(p) or p
    sim.run()
    sparse = [codec.decode(p, sim.n) for p in seen]  # what was sent: already sparse
    assert all(int((u != 0).sum()) <= sim.n // 8 for u in sparse)
    clipped = [clip(u, C)[0] for u in sparse]
    assert all(float(u.norm()) <= C * (1 + 1e-6) for u in clipped)
    total = torch.zeros(sim.n)
    for u in clipped:
        total.add_(u)
    noise = torch.randn(sim.n, generator=torch_generator(0, "dp_noise", 1)) * sigma * C
    expect = (total + noise) / 3
    assert torch.allclose(P0 - sim.P, expect, atol=1e-7)


def test_epsilon_in_metrics_matches_the_accountant(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "eps", tiny_bert_dir, text_file,
               **{"dp.enabled": "true", "dp.clip": 0.1, "dp.noise_multiplier": 1.0})
    summary = sim.run()
    rows = read_jsonl(tmp_path / "eps" / "metrics.jsonl")
    for r in rows:
        direct = epsilon(noise_multiplier=1.0, rounds=r["round"], sampling="fixed",
                         population=6, cohort_size=3)
        assert r["epsilon"] == pytest.approx(direct.epsilon, abs=1e-6)
        assert r["delta"] == pytest.approx(1 / 6)
    p = summary["privacy"]
    assert p["sampling"] == "fixed" and p["neighboring_relation"] == "replace_one"


def test_poisson_sampling_records_empty_rounds(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "poisson", tiny_bert_dir, text_file, rounds=6, clients_per_round=1,
               sampling="poisson", **{"dp.enabled": "true", "dp.clip": 0.1,
                                      "dp.noise_multiplier": 1.0})
    sizes = [len(sim.sample(t)) for t in range(1, 7)]
    summary = sim.run()
    rows = read_jsonl(tmp_path / "poisson" / "metrics.jsonl")
    assert [r["clients"] for r in rows] == sizes and len(rows) == 6
    assert 0 in sizes or max(sizes) > 1  # realised cohorts vary around q N = 1
    assert summary["privacy"]["accountant"] in ("pld", "rdp")
    assert summary["privacy"]["neighboring_relation"] == "add_or_remove_one"


def test_accountant_sampling_mismatch_is_refused():
    with pytest.raises(ConfigError, match="dp.accountant"):
        resolved(None, ["dp.enabled=true", "dp.accountant=pld", "sampling=fixed",
                           "dp.clip=1", "dp.noise_multiplier=1"])
    with pytest.raises(ConfigError, match="dp.clip"):
        resolved(None, ["dp.enabled=true", "dp.noise_multiplier=1"])


def test_privacy_cli_calibrates_sigma(capsys):
    assert main(["privacy", "--target-epsilon", "8", "--population", "1000",
                 "--set", "rounds=200", "--set", "sampling=poisson"]) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("=")[1].split()[0])
    assert epsilon(noise_multiplier=sigma, rounds=200, sampling="poisson", population=1000,
                   cohort_size=10).epsilon <= 8.0
