"""Populations of 100,000 clients: partitions as index arrays, nothing per client that grows
with the model, and runs that work when most clients hold one example or none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_overrides

from fedlora.data import partition
from fedlora.data.federated import FederatedData
from fedlora.data.partition import Partition


def test_partition_views_sizes_and_errors():
    parts = [np.array([4, 1]), np.array([], dtype=np.int64), np.array([0, 2, 3])]
    p = Partition.from_arrays(parts)
    assert len(p) == 3
    assert [x.tolist() for x in p] == [[1, 4], [], [0, 2, 3]]
    assert p[-1].tolist() == [0, 2, 3]
    assert p.sizes.tolist() == [2, 0, 3]
    assert p.empty.tolist() == [1]
    assert partition.empty_clients(p) == [1]
    with pytest.raises(IndexError, match="client 3 out of range"):
        p[3]
    with pytest.raises(ValueError, match="read-only"):
        p[0][0] = 7  # a view into the shared index array must not be writable
    with pytest.raises(ValueError, match="offsets"):
        Partition(np.arange(3), np.array([0, 2]))


def test_from_owner_keeps_indices_ascending_within_a_client():
    owner = np.array([2, 0, 2, -1, 0, 1])
    p = Partition.from_owner(owner, 4)
    assert [x.tolist() for x in p] == [[1, 4], [5], [0, 2], []]


def test_dirichlet_100k_clients_is_two_arrays():
    labels = np.random.default_rng(0).integers(0, 26, size=80_000)
    p = partition.dirichlet(labels, 100_000, 0.1, np.random.default_rng(1))
    assert isinstance(p, Partition) and len(p) == 100_000
    assert np.array_equal(np.sort(p.indices), np.arange(80_000))  # every example once
    sizes = p.sizes
    assert sizes.sum() == 80_000 and np.median(sizes) <= 2 and (sizes == 0).any()
    # O(examples + clients) integers; a list of 100,000 arrays alone would be ~10 MB of headers
    assert p.nbytes <= 8 * (80_000 + 2 * 100_001)


def test_natural_with_100k_ids():
    ids = [f"u{i % 100_000}" for i in range(150_000)]
    p, names = partition.natural(ids)
    assert len(p) == len(names) == 100_000
    assert isinstance(names, np.ndarray)  # one string array, not 100,000 Python objects
    k = int(np.flatnonzero(names == "u7")[0])
    assert p[k].tolist() == [7, 100_007]


def test_federated_data_sizes_come_from_the_partition():
    p = Partition.from_arrays([np.array([0]), np.zeros(0, np.int64), np.array([1, 2])])
    data = FederatedData(train=None, test=None, clients=p, client_names=["a", "b", "c"],
                         label_names=[])
    assert data.sizes is p.sizes
    assert data.eligible.tolist() == [0, 2]


@pytest.mark.parametrize("method", ["flasc", "hetlora"])
def test_a_run_over_100k_mostly_empty_clients(method, tmp_path, tiny_bert_dir, text_file):
    """120 examples over 100,000 Dirichlet clients: almost everyone is empty; rounds sample
    only non-empty clients; the run dir stays small (no per-client lists in checkpoints)."""
    from fedlora.config import load_config
    from fedlora.engine import Simulation

    extra = {"task.partition": "dirichlet", "task.num_clients": 100_000, "task.alpha": 0.1,
             "method.name": method}
    if method == "hetlora":
        extra.update({"het.tiers": 3, "het.r_base": 2, "model.rank": 4, "het.self_prune": True,
                      "het.prune_lambda": 0.5})
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, **extra))
    sim = Simulation(cfg, tmp_path / method, progress=False)
    assert len(sim.task.data.clients) == 100_000
    assert len(sim.eligible) <= len(sim.task.data.train)
    summary = sim.run()
    assert summary["finished"] and summary["num_clients"] == 100_000
    for row in (tmp_path / method / "ledger.jsonl").read_text().splitlines():
        c = json.loads(row)["client"]
        assert len(sim.task.data.clients[c]) > 0
    from safetensors import safe_open  # the checkpoint's JSON lives in its header metadata

    with safe_open(str(tmp_path / method / "checkpoint.safetensors"), "pt") as f:
        assert len(json.dumps(f.metadata())) < 20_000  # O(sampled clients), not O(population)


# ------------------------------------------------------------------ the rest of the round


def test_eval_subset_during_training_full_test_set_at_the_end(tmp_path, tiny_bert_dir,
                                                              text_file):
    from fedlora.config import load_config
    from fedlora.engine import Simulation
    from fedlora.rundir import read_jsonl

    def run(name, **extra):
        cfg = load_config(None, tiny_overrides(tiny_bert_dir, text_file, rounds=3, **extra))
        sim = Simulation(cfg, tmp_path / name, progress=False)
        return sim, sim.run(), read_jsonl(tmp_path / name / "metrics.jsonl")

    sim, summary, rows = run("sub", eval_max_examples=10)
    assert [r.get("eval_examples") for r in rows] == [10, 10, None]  # last round: all 24
    a, b = sim.eval_split(full=False), sim.eval_split(full=False)
    assert a is b and len(a) == 10  # one subset, drawn once from the seed
    _, full_summary, full_rows = run("full")
    assert all("eval_examples" not in r for r in full_rows)
    # Training is untouched by how evaluation is done; the final full evaluation agrees.
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full_rows]
    assert rows[-1]["accuracy"] == full_rows[-1]["accuracy"]
    assert summary["final"]["accuracy"] == full_summary["final"]["accuracy"]
    assert summary["best"] == rows[-1]["accuracy"]  # subset rows are not results
    sim2, _, _ = run("sub2", eval_max_examples=10)
    assert torch_equal(sim2.eval_split(False).labels, a.labels)


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_threads_setting(monkeypatch):
    import torch

    from fedlora.config import ConfigError, load_config
    from fedlora.engine import set_threads

    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("FEDLORA_THREADS", "1")
        assert set_threads(None) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("FEDLORA_THREADS")
        assert set_threads(None) >= 1  # every usable core
        monkeypatch.setenv("FEDLORA_THREADS", "many")
        with pytest.raises(ValueError, match="FEDLORA_THREADS"):
            set_threads(None)
        with pytest.raises(ConfigError, match="threads"):
            load_config(None, ["threads=0"])
        with pytest.raises(ConfigError, match="eval_max_examples"):
            load_config(None, ["eval_max_examples=0"])
    finally:
        torch.set_num_threads(1)


def test_client_values_store_only_what_departs_from_the_rule():
    from fedlora.methods.client_state import ClientValues

    tiers = np.array([1, 3, 2, 3])
    ranks = ClientValues(4, lambda ids: 2 ** (tiers[ids] - 1), np.int64)
    assert ranks[1] == 4 and ranks[[0, 2]].tolist() == [1, 2]
    ranks[1] = 2
    assert ranks[np.array([1, 3])].tolist() == [2, 4] and ranks.to_json() == {"1": 2}
    losses = ClientValues(100_000, np.inf)
    losses[[5, 99_999]] = [0.5, 0.25]
    assert losses[-1] == 0.25 and losses[6] == np.inf and len(losses.to_json()) == 2
    with pytest.raises(IndexError, match="population 100000"):
        losses[100_000]
    # An older checkpoint's dense list loads as the same values, kept sparse.
    again = ClientValues(4, lambda ids: 2 ** (tiers[ids] - 1), np.int64)
    again.load_json([1, 2, 2, 4], missing=0)
    assert again.to_json() == {"1": 2}
    inf_again = ClientValues(3, np.inf)
    inf_again.load_json({"0": None, "2": 0.1}, missing=np.inf)
    assert inf_again[[0, 1, 2]].tolist() == [np.inf, np.inf, 0.1]
