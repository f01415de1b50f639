"""FLoRA / SLoRA two-stage and FLoRA stacking, end to end on the tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import resolved, tiny_overrides

from fedlora.comm import codec
from fedlora.config import ConfigError, load_config
from fedlora.engine import Simulation
from fedlora.model.layers import view
from fedlora.rng import torch_generator
from fedlora.rundir import read_jsonl

TIMING = ("wall_s", "eval_s")
TWO_STAGE = {"method.name": "flora_two_stage", "method.stage1_rounds": 2}
STACKING = {"method.name": "flora_stacking", "het.tiers": 3, "het.r_base": 2, "model.rank": 4,
            "clients_per_round": 4}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sim(tmp_path, name, tiny_bert_dir, text_file, **extra) -> Simulation:
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    return Simulation(cfg, tmp_path / name, progress=False)


def _spy(sim) -> dict[tuple[int, int], bytes]:
    seen = {}

    def spy(t, c, payload):
        seen[(t, c)] = payload
        return payload

    sim.tamper = spy
    return seen


# ---------------------------------------------------------------- two-stage


def test_svd_switch_reproduces_the_stage1_update(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "svd", tiny_bert_dir, text_file, **TWO_STAGE)
    sim.run()  # rounds = 2 = Stage 1
    m, P0 = sim.method, sim.task.initial_vector
    before = sim.P.clone()
    m.begin_round(sim.P, 3)  # the switch, on what Stage 1 really learned
    s, r = sim.cfg.model.alpha / sim.cfg.model.rank, sim.cfg.model.rank
    tail = total = 0.0
    for ly in m.layers:
        delta = view(before, ly.W) - view(P0, ly.W)
        assert delta.abs().max() > 0, "Stage 1 must have changed W"
        U, S, Vh = torch.linalg.svd(delta.double())
        truncated = (U[:, :r] * S[:r]) @ Vh[:r]
        product = s * view(sim.P, ly.B).double() @ view(sim.P, ly.A).double()
        assert torch.allclose(product, truncated, atol=1e-5)
        assert torch.equal(view(sim.P, ly.W), view(P0, ly.W))  # W back at the pretrained W0
        tail += float((delta.double() - product).square().sum())
        total += float(delta.double().square().sum())
    assert m.svd["rel_err"] == pytest.approx(math.sqrt(tail / total), rel=1e-4)
    assert 0 < m.svd["rel_err"] < 1 and m.state_json()["svd"]["round"] == 3
    assert torch.equal(sim.P[m.stage1_mask & ~m.w_mask], before[m.stage1_mask & ~m.w_mask])


@pytest.mark.parametrize("density", [1.0, 0.1])
def test_stage1_sends_only_w_then_stage2_only_lora(tmp_path, tiny_bert_dir, text_file, density):
    sim = _sim(tmp_path, f"d{density}", tiny_bert_dir, text_file, rounds=3,
               **{**TWO_STAGE, "method.stage1_density": density})
    m = sim.method
    masks, rows, upload_mask = [], [], m.upload_mask

    def spy_mask(t, c):  # the mask the server decodes each values-only upload with
        masks.append((t, upload_mask(t, c)))
        return masks[-1][1]

    m.upload_mask = spy_mask
    m.end_round = lambda P, t: rows.append((t, P.clone()))
    seen = _spy(sim)
    P0 = sim.P.clone()
    sim.run()
    lora = m.stage2_mask & ~m.stage1_mask  # the head is in both stages
    per_layer = {int(view(m.stage1_mask, ly.W).sum()) for ly in m.layers}
    numel = m.layers[0].W.shape[0] * m.layers[0].W.shape[1]
    assert per_layer == {max(1, math.floor(density * numel))}
    for t, mask in masks:
        assert torch.equal(mask, m.stage1_mask if t <= 2 else m.stage2_mask)  # never changes
    for (t, _), payload in seen.items():
        assert codec.header(payload)["k"] == int(m.mask(t).sum())  # values only, of the mask
    for t, P in rows:
        changed = P != P0
        if t <= 2:  # only W (the SLoRA subset) and the head moved; LoRA untouched
            assert not (changed & ~m.stage1_mask).any() and (changed & m.w_mask).any()
        else:  # W back at W0 and frozen; LoRA trains
            assert not (changed & m.w_mask).any() and (changed & lora).any()


def test_stage1_lr_steps_w_with_its_own_learning_rate(tmp_path, tiny_bert_dir, text_file):
    sim = _sim(tmp_path, "lr", tiny_bert_dir, text_file, rounds=1, **{
        **TWO_STAGE, "server.optimizer": "fedavg", "server.lr": 0.5, "method.stage1_lr": 0.01})
    seen, P0 = _spy(sim), sim.P.clone()
    sim.run()
    m = sim.method
    g = sum(sim._receive(b, m.stage1_mask) for b in seen.values()) / len(seen)
    head = m.stage1_mask & ~m.w_mask
    assert g[m.w_mask].abs().max() > 1e-5  # 0.01 g and 0.5 g differ by far more than 1e-8
    assert torch.allclose(sim.P[m.w_mask], (P0 - 0.01 * g)[m.w_mask], rtol=0, atol=1e-8)
    assert torch.allclose(sim.P[head], (P0 - 0.5 * g)[head], rtol=0, atol=1e-7)
    assert m.state_json()["stage1_steps"] == 1


def test_two_stage_config_is_validated():
    with pytest.raises(ConfigError, match="method.stage1_density"):
        resolved(None, ["method.name=flora_two_stage", "method.stage1_density=0"])
    with pytest.raises(ConfigError, match="method.stage1_rounds"):
        resolved(None, ["method.name=flora_two_stage", "method.stage1_rounds=0"])
    with pytest.raises(ConfigError, match="method.stage1_lr"):
        resolved(None, ["method.name=flora_two_stage", "method.stage1_lr=1e-3",
                           "dp.enabled=true"])


# ---------------------------------------------------------------- stacking


@pytest.mark.parametrize("layout", ["stacked", "dense"])
def test_stacking_merges_the_exact_weighted_sum(tmp_path, tiny_bert_dir, text_file, layout):
    extra = dict(STACKING) if layout == "stacked" else {
        **STACKING, "het.tiers": 2, "het.r_base": 8, "model.rank": 8, "clients_per_round": 6}
    sim = _sim(tmp_path, layout, tiny_bert_dir, text_file, rounds=1, **extra,
               **{"client.lr": 1.0, "client.max_steps": 4})  # a merged update well above eps
    seen = _spy(sim)
    P0 = sim.P.clone()
    sim.run()  # default server optimizer (fedadam): the LoRA part bypasses it
    m, s = sim.method, sim.cfg.model.alpha / sim.cfg.model.rank
    clients = [c for _, c in seen]
    ranks = [m.rank_of(c) for c in clients]
    R = sum(ranks)
    for ly in m.layers:
        out_f, in_f = ly.W.shape
        assert (R * (out_f + in_f) < out_f * in_f) == (layout == "stacked")
        expected = torch.zeros(out_f, in_f, dtype=torch.float64)
        for c, r in zip(clients, ranks):
            trained = P0 - sim._receive(seen[(1, c)], m.mask_for_rank(r))
            B, A = view(trained, ly.B)[:, :r].double(), view(trained, ly.A)[:r].double()
            expected += s / len(clients) * B @ A
        W = view(sim.P, ly.W).double()
        assert expected.abs().max() > 1e-6
        # float32 tolerance: one rounding of W + ΔW (half an ulp of W) and of the product
        tol = W.abs() * 2.0**-23 + expected.abs() * 1e-5
        assert ((W - view(P0, ly.W).double() - expected).abs() <= tol).all()
        assert not view(sim.P, ly.B).any()  # LoRA re-initialized: B = 0 ...
        g = torch_generator(sim.cfg.seed, "lora_reinit", 2)  # ... A from the next round's stream
        bound = 1 / math.sqrt(in_f)
        for other in m.layers:
            A = torch.rand(other.A.shape, generator=g) * (2 * bound) - bound
            if other is ly:
                assert torch.equal(view(sim.P, ly.A), A)
                break


def test_stacking_download_bytes_are_the_encoded_merged_update(tmp_path, tiny_bert_dir,
                                                               text_file):
    sim = _sim(tmp_path, "bytes", tiny_bert_dir, text_file, rounds=3, **STACKING)
    seen = _spy(sim)
    sim.run()
    m = sim.method
    head = len(codec.encode(torch.zeros(int(m.head_mask.sum())), None))
    catchup = len(codec.encode(torch.zeros(int(m.w_mask.sum())), None))
    cohorts = {t: [c for (u, c) in seen if u == t] for t in (1, 2, 3)}
    merged = {}
    for t, cohort in cohorts.items():
        R = sum(m.rank_of(c) for c in cohort)
        numel = sum(min(ly.W.shape[0] * ly.W.shape[1], R * sum(ly.W.shape)) for ly in m.layers)
        merged[t] = len(codec.encode(torch.zeros(numel), None))
    assert merged[1] != catchup
    for row in read_jsonl(tmp_path / "bytes" / "ledger.jsonl"):
        t, c = row["round"], row["client"]
        extra = 0 if t == 1 else merged[t - 1] if c in cohorts[t - 1] else catchup
        assert row["download_bytes"] == head + extra


def test_stacking_refuses_dp():
    with pytest.raises(ConfigError, match="dp.enabled"):
        resolved(None, ["method.name=flora_stacking", "het.tiers=3", "het.r_base=2",
                           "model.rank=4", "dp.enabled=true"])


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("extra", [
    {**TWO_STAGE, "server.optimizer": "fedyogi", "method.stage1_lr": 1e-3},  # switch after
    {**TWO_STAGE, "method.stage1_rounds": 1, "method.stage1_density": 0.1},  # in Stage 2
    {**STACKING, "model.dropout": 0.1},
], ids=["flora", "slora", "stacking"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_bert_dir, text_file,
                                                          extra):
    extra = {"rounds": 4, "checkpoint_every": 2, **extra}
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
    resumed.run()
    assert torch.equal(resumed.P, full.P)
    for name in ("metrics.jsonl", "ledger.jsonl"):
        a, b = (read_jsonl(tmp_path / d / name) for d in ("crash", "full"))
        strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in rows]
                 for rows in (a, b)]
        assert strip[0] == strip[1]
    assert resumed.method.state_json() == full.method.state_json()
