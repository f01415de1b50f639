"""Each baseline's defining property, checked on real payloads of tiny end-to-end runs.

A `Wire` spy records every instruction and reply of the protocol (download, then upload,
per client) with the server's mask at that moment, and a training spy checks that local
SGD with momentum never moves an entry outside the gradient mask.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from fedlora.comm import codec
from fedlora.comm.topk import num_kept, topk_mask
from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.methods.adapter_lth import lth_density
from fedlora.rundir import read_jsonl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from threads; on a shared 2-core box they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Wire:
    """Spy on the engine's download and upload: per client, the payloads and the mask."""

    def __init__(self, sim: Simulation, monkeypatch):
        self.sim, self.down, self.up = sim, [], []
        run = sim.runner.run

        def spy(ct):  # the protocol's instruction and reply are the wire
            mask = getattr(sim.method, "mask", None)
            self.down.append((ct.round, ct.payloads["down"],
                              None if mask is None else mask.clone()))
            result = run(ct)
            self.up.append(result.upload)
            return result

        monkeypatch.setattr(sim.runner, "run", spy)

    def pairs(self) -> list[tuple[int, bytes, bytes, torch.Tensor | None]]:
        """(round, download, upload, mask) per client, in engine order."""
        assert len(self.down) == len(self.up)
        return [(t, d, u, m) for (t, d, m), u in zip(self.down, self.up)]

    def check_ledger(self) -> None:
        """Every ledger row's bytes are exactly the lengths of the payloads sent."""
        rows = read_jsonl(self.sim.out / "ledger.jsonl")
        pairs = self.pairs()
        assert len(rows) == len(pairs)
        for row, (t, down, up, _) in zip(rows, pairs):
            assert (row["round"], row["download_bytes"], row["upload_bytes"]) == (
                t, len(down), len(up))


def positions(payload: bytes, n: int) -> torch.Tensor:
    pos, _ = codec.decode_sparse(payload, n)
    return pos


def values_only(payload: bytes, mask: torch.Tensor) -> bool:
    """A payload over a mask both ends know: exactly mask.sum() values, no positions."""
    h = codec.header(payload)
    return h["positions"] == "dense" and h["n"] == h["k"] == int(mask.sum())


def spy_training(sim: Simulation) -> list[torch.Tensor]:
    """Wrap local training: entries outside the grad mask must not move; returns start vectors."""
    starts, train = [], sim.runner.train

    def wrapped(batches, grad_mask, penalty=None):
        start = sim.adapter.vector.clone()
        stats = train(batches, grad_mask, penalty)
        after = sim.adapter.vector
        if grad_mask is not None:
            assert torch.equal(after[~grad_mask], start[~grad_mask])
            assert not torch.equal(after[grad_mask], start[grad_mask])
        starts.append(start)
        return stats

    sim.runner.train = wrapped
    return starts


def make(tmp_path, tiny_bert_dir, text_file, monkeypatch, name="run", **extra):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    sim = Simulation(cfg, tmp_path / name, progress=False)
    return sim, Wire(sim, monkeypatch)


def test_adapter_lth_follows_its_density_schedule(tmp_path, tiny_bert_dir, text_file,
                                                  monkeypatch):
    p, q = 0.2, 2
    sim, wire = make(tmp_path, tiny_bert_dir, text_file, monkeypatch, rounds=5,
                     **{"method.name": "adapter_lth", "method.prune_ratio": p,
                        "method.prune_every": q})
    spy_training(sim)
    sim.run()
    n, previous = sim.n, None
    for t, down, up, mask in wire.pairs():
        k = num_kept(n, lth_density(t, p, q))  # 1, 1, 0.8, 0.8, 0.64 of n
        assert codec.header(up)["k"] == codec.header(down)["k"] == k
        if t <= q:
            assert mask is None and codec.header(up)["positions"] == "dense"
        else:
            assert values_only(up, mask)  # the server dictated the mask
            assert torch.equal(positions(down, n), mask.nonzero().flatten())
            if previous is not None:
                assert not (mask & ~previous).any()  # nested: nothing pruned comes back
            previous = mask
    assert sim.method.prunes == 2 and sim.method.density == pytest.approx(0.64)
    assert (sim.P[~sim.method.mask] == 0).all()
    wire.check_ledger()


def test_sparse_adapter_round_one_dense_then_one_fixed_mask(tmp_path, tiny_bert_dir, text_file,
                                                            monkeypatch):
    # |A| at init dwarfs |B| after one round, so a low density would keep no B at all
    # (and then nothing trains: A's gradient is multiplied by B = 0); 0.6 keeps some B
    sim, wire = make(tmp_path, tiny_bert_dir, text_file, monkeypatch, rounds=1,
                     **{"method.name": "sparse_adapter", "method.density": 0.6})
    spy_training(sim)
    sim.run()
    after_round_1 = sim.P.clone()
    sim.cfg.rounds = 3
    sim.run()
    expected = topk_mask(after_round_1.abs(), 0.6)  # scored on the server vector after round 1
    for t, down, up, mask in wire.pairs():
        if t == 1:
            assert mask is None and codec.header(up)["k"] == sim.n
        else:
            assert torch.equal(mask, expected)
            assert values_only(up, expected)
            assert torch.equal(positions(down, sim.n), expected.nonzero().flatten())
    assert (sim.P[~expected] == 0).all() and (sim.P[expected] != after_round_1[expected]).any()
    wire.check_ledger()


def test_federated_select_mask_moves_and_the_rest_keeps_server_state(
        tmp_path, tiny_bert_dir, text_file, monkeypatch):
    # With B = 0 at init, density 0.5 selects all of A and the largest head entries: only the
    # head trains (A's gradient is multiplied by B = 0), so the mask moves among head entries.
    sim, wire = make(tmp_path, tiny_bert_dir, text_file, monkeypatch, rounds=3,
                     **{"method.name": "federated_select", "method.density": 0.5,
                        "server.weight_decay": 0.1})
    starts = spy_training(sim)
    before, kept_nonzero = {}, []
    begin, end = sim.method.begin_round, sim.method.end_round

    def snapshot(P, t):
        before[t] = (P.clone(), sim.server.m.clone(), sim.server.v.clone())
        begin(P, t)

    def check(P, t):
        end(P, t)
        out = ~sim.method.mask
        P0, m0, v0 = before[t]
        assert torch.equal(P[out], P0[out])
        kept_nonzero.append(bool((P0[out] != 0).any()))  # unselected, yet not pruned
        assert torch.equal(sim.server.m[out], m0[out]) and torch.equal(sim.server.v[out], v0[out])

    sim.method.begin_round, sim.method.end_round = snapshot, check
    sim.run()
    assert any(kept_nonzero)
    masks = {t: mask for t, _, _, mask in wire.pairs()}
    assert any(not torch.equal(masks[t], masks[t + 1]) for t in (1, 2))
    for (_, down, up, mask), start in zip(wire.pairs(), starts):
        assert values_only(up, mask)
        assert torch.equal(positions(down, sim.n), mask.nonzero().flatten())
        assert (start[~mask] == 0).all()  # clients start from the temporarily pruned P * M
    wire.check_ledger()


def test_ffa_lora_never_changes_a_and_never_sends_it(tmp_path, tiny_bert_dir, text_file,
                                                     monkeypatch):
    # a reused task whose resident model holds a previous run's trained A
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **{"method.name": "lora"}))
    task = Simulation(cfg, tmp_path / "lora", progress=False).task
    Simulation(cfg, tmp_path / "lora2", progress=False, task=task).run()
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **{
        "method.name": "ffa_lora", "server.weight_decay": 0.1}))
    sim = Simulation(cfg, tmp_path / "ffa", progress=False, task=task)
    wire = Wire(sim, monkeypatch)
    is_a = sim.adapter.named_slices(lambda name: ".lora_A." in name)
    head = sim.adapter.named_slices(lambda name: "modules_to_save" in name)
    assert is_a.any() and head.any()
    init = sim.P.clone()
    starts = spy_training(sim)
    sim.run()
    assert torch.equal(sim.P[is_a], init[is_a])  # bit-identical across the run
    assert (sim.P[head] != init[head]).any()  # the head is trained
    for start in starts:
        assert torch.equal(start[is_a], init[is_a])  # clients fill A from the seed, not zeros
    for _, down, up, _ in wire.pairs():
        assert values_only(down, ~is_a) and values_only(up, ~is_a)  # mask fixed by layout
    wire.check_ledger()


def test_full_finetune_trains_and_sends_every_backbone_weight(tmp_path, tiny_bert_dir, text_file,
                                                              monkeypatch):
    sim, wire = make(tmp_path, tiny_bert_dir, text_file, monkeypatch,
                     **{"method.name": "full_finetune"})
    model = sim.task.model
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert sim.n == sum(p.numel() for p in model.parameters())  # embeddings and head included
    names = [e.name for e in sim.adapter.layout]
    assert any("word_embeddings" in x for x in names) and any("classifier" in x for x in names)
    init = sim.P.clone()
    sim.run()
    for _, down, up, _ in wire.pairs():
        for payload in (down, up):
            h = codec.header(payload)
            assert h["k"] == sim.n and h["positions"] == "dense"
    layer = sim.adapter.named_slices(lambda name: "encoder.layer.0." in name)
    assert (sim.P[layer] != init[layer]).any()
    wire.check_ledger()


@pytest.mark.parametrize("method", ["fedsparsify", "spdst", "federated_select_backbone"])
def test_sparse_backbone_methods_mask_the_backbone(method, tmp_path, tiny_bert_dir, text_file,
                                                   monkeypatch):
    own = {"method.prune_ratio": 0.5} if method == "fedsparsify" else {"method.density": 0.5}
    sim, wire = make(tmp_path, tiny_bert_dir, text_file, monkeypatch,
                     **{"method.name": method, **own})
    spy_training(sim)
    head = sim.adapter.head_mask()  # the new classifier: not W, so never masked
    assert head is not None and head.sum() < sim.n
    assert all("classifier" in e.name for e in sim.adapter.layout if head[e.offset])
    init = sim.P.clone()
    sim.run()
    assert sim.n == sum(p.numel() for p in sim.task.model.parameters())
    dense_first = method != "federated_select_backbone"
    n_head = int(head.sum())
    for t, _, up, mask in wire.pairs():
        k = sim.n if (t == 1 and dense_first) else n_head + num_kept(sim.n - n_head, 0.5)
        assert codec.header(up)["k"] == k
        if mask is not None:
            assert values_only(up, mask)
            assert mask[head].all()
    assert (sim.P[head] != init[head]).all()  # every head entry trained
    if dense_first:
        assert (sim.P[~sim.method.mask] == 0).all()
    wire.check_ledger()


@pytest.mark.parametrize("method", ["adapter_lth", "sparse_adapter"])
def test_resume_of_a_pruning_method_equals_an_uninterrupted_run(method, tmp_path, tiny_bert_dir,
                                                                text_file):
    own = {"method.prune_ratio": 0.2} if method == "adapter_lth" else {"method.density": 0.25}
    extra = {"rounds": 4, "checkpoint_every": 2, "method.name": method, **own}
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    full = Simulation(cfg, tmp_path / "full", progress=False)
    full.run()

    crashed = Simulation(cfg, tmp_path / "crash", progress=False)

    def crash(t, c, payload):
        if t == 4:
            raise KeyboardInterrupt
        return payload

    crashed.tamper = crash
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    resumed = Simulation.resume(tmp_path / "crash", progress=False)
    assert resumed.round == 2 and resumed.method.mask is not None
    resumed.run()
    assert torch.equal(resumed.P, full.P)
    assert torch.equal(resumed.method.mask, full.method.mask)
    assert resumed.method.state_json() == full.method.state_json()
    assert read_jsonl(tmp_path / "crash" / "ledger.jsonl") == read_jsonl(
        tmp_path / "full" / "ledger.jsonl")


def test_modules_the_checkpoint_lacks_are_new_not_w(tmp_path, tiny_bert_dir, text_file):
    """A checkpoint without BERT's pooler: the pooler is randomly initialized on load, so like
    the classifier it stays out of the backbone mask."""
    import shutil

    from safetensors.torch import load_file, save_file

    bare = tmp_path / "no-pooler"
    shutil.copytree(tiny_bert_dir, bare)
    weights = load_file(bare / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k},
              str(bare / "model.safetensors"), metadata={"format": "pt"})
    over = {"method.name": "federated_select_backbone", "method.density": 0.5}
    for model_dir, new in ((tiny_bert_dir, {"classifier"}), (bare, {"classifier", "pooler"})):
        cfg = load_config(None, tiny_overrides(model_dir, text_file, **over))
        adapter = Simulation(cfg, tmp_path / model_dir.name, progress=False).adapter
        head = adapter.head_mask()
        kinds = {k for e in adapter.layout if head[e.offset] for k in ("classifier", "pooler")
                 if k in e.name}
        assert kinds == new
