"""The foundation: TopKMask, partitions, server optimizers, config errors, flat vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import resolved

from fedlora.comm.topk import num_kept, topk_mask
from fedlora.config import ConfigError, ServerConfig, load_config
from fedlora.data import partition
from fedlora.server.aggregate import weighted_mean
from fedlora.server.optim import ServerOptimizer

# ---------------------------------------------------------------- TopKMask


def test_topk_k_is_floor_and_at_least_one():
    assert num_kept(100, 0.25) == 25
    assert num_kept(10, 0.29) == 2  # floor, not round
    assert num_kept(10, 0.01) == 1  # at least one when d > 0
    assert num_kept(7, 1.0) == 7
    with pytest.raises(ValueError):
        num_kept(10, 0.0)


def test_topk_keeps_largest_and_breaks_ties_by_lowest_index():
    v = torch.tensor([0.5, 2.0, 1.0, 1.0, 1.0, -3.0, 1.0])
    m = topk_mask(v.abs(), 3 / 7)  # k = 3: |-3|, 2, then one of the four 1.0s
    assert m.tolist() == [False, True, True, False, False, True, False]
    m = topk_mask(v.abs(), 4 / 7)
    assert m.tolist() == [False, True, True, True, False, True, False]


def test_topk_matches_stable_sort_on_random_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randint(0, 5, (200,), generator=g).float()
        d = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        k = num_kept(200, d)
        ref = torch.zeros(200, dtype=torch.bool)
        ref[torch.sort(v, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(topk_mask(v, d), ref)


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 100.0])
def test_dirichlet_assigns_every_example_exactly_once(alpha):
    labels = np.random.default_rng(0).integers(0, 7, size=1013)
    parts = partition.dirichlet(labels, 37, alpha, np.random.default_rng(1))
    allidx = np.concatenate(parts)
    assert len(parts) == 37
    assert np.array_equal(np.sort(allidx), np.arange(1013))


def test_dirichlet_follows_the_normalised_column_rule():
    """Client k gets round(q_kc N_c) of class c, with q the column-normalised draw."""
    labels = np.repeat(np.arange(3), [400, 300, 300])
    rng = np.random.default_rng(5)
    parts = partition.dirichlet(labels, 4, 0.5, rng)
    p = np.random.default_rng(5).dirichlet(np.full(3, 0.5), size=4)
    q = p / p.sum(0, keepdims=True)
    for k, idx in enumerate(parts):
        counts = np.bincount(labels[idx], minlength=3)
        assert np.all(np.abs(counts - q[k] * np.array([400, 300, 300])) <= 1.0)


def test_dirichlet_small_alpha_is_skewed():
    labels = np.repeat(np.arange(10), 20)
    parts = partition.dirichlet(labels, 50, 0.01, np.random.default_rng(0))
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 200
    nonempty = [p for p in parts if len(p)]
    purity = np.mean([np.bincount(labels[p]).max() / len(p) for p in nonempty])
    assert purity > 0.9


def test_iid_and_natural_and_mix_assign_once():
    rng = np.random.default_rng(0)
    parts = partition.iid(101, 10, rng)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(101))
    ids = ["b", "a", "c", "a", "b", "a"]
    parts, names = partition.natural(ids)
    assert list(names) == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]
    mixed = partition.iid_mix(parts, 0.5, rng)
    assert np.array_equal(np.sort(np.concatenate(mixed)), np.arange(6))


# ---------------------------------------------------------------- server optimizers


def _adam_by_formula(P, grads, lr, b1, b2, tau, bias_correction):
    m = np.zeros_like(P)
    v = np.zeros_like(P)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh = m / (1 - b1**t) if bias_correction else m
        vh = v / (1 - b2**t) if bias_correction else v
        P = P - lr * mh / (np.sqrt(vh) + tau)
    return P


@pytest.mark.parametrize("bias_correction", [True, False])
def test_fedadam_matches_the_formula(bias_correction):
    rng = np.random.default_rng(0)
    P0 = rng.normal(size=50)
    grads = [rng.normal(size=50) * 1e-3 for _ in range(5)]
    cfg = ServerConfig(optimizer="fedadam", lr=0.01, tau=1e-3, bias_correction=bias_correction)
    opt = ServerOptimizer(cfg, 50)
    P = torch.tensor(P0, dtype=torch.float64)
    opt.m, opt.v = opt.m.double(), opt.v.double()
    for g in grads:
        opt.step(P, torch.tensor(g))
    expect = _adam_by_formula(P0, grads, 0.01, 0.9, 0.999, 1e-3, bias_correction)
    np.testing.assert_allclose(P.numpy(), expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_fedadam_is_bit_identical_to_torch_adam(wd):
    """The paper's Algorithm 1 is torch Adam on P with the pseudo-gradient as .grad."""
    g = torch.Generator().manual_seed(0)
    P = torch.randn(300, generator=g)
    ref = torch.nn.Parameter(P.clone())
    torch_opt = (torch.optim.AdamW if wd else torch.optim.Adam)(
        [ref], lr=0.01, eps=1e-8, weight_decay=wd, foreach=False)
    ours = ServerOptimizer(ServerConfig(lr=0.01, tau=1e-8, weight_decay=wd), 300)
    for _ in range(4):
        grad = torch.randn(300, generator=g) * 1e-2
        ref.grad = grad.clone()
        torch_opt.step()
        ours.step(P, grad)
    assert torch.equal(P, ref.detach())


def test_fedyogi_fedadagrad_fedavg_formulas():
    g = torch.tensor([0.1, -0.2, 0.3])
    P = torch.zeros(3)
    ServerOptimizer(ServerConfig(optimizer="fedavg", lr=0.5), 3).step(P, g)
    assert torch.allclose(P, -0.5 * g)
    for name in ("fedyogi", "fedadagrad"):
        cfg = ServerConfig(optimizer=name, lr=0.1, tau=1e-3, bias_correction=False)
        opt, P = ServerOptimizer(cfg, 3), torch.zeros(3)
        opt.step(P, g)
        v = (1 - 0.999) * g * g if name == "fedyogi" else g * g  # v0 = 0: sign(0 - g^2) = -1
        expect = -0.1 * (0.1 * g) / (v.sqrt() + 1e-3)
        assert torch.allclose(P, expect, atol=1e-7), name


def test_step_mask_freezes_values_and_state():
    opt = ServerOptimizer(ServerConfig(lr=0.1), 4)
    P = torch.ones(4)
    mask = torch.tensor([True, False, True, False])
    opt.step(P, torch.ones(4), mask)
    assert P[1] == 1 and P[3] == 1 and P[0] < 1
    assert opt.m[1] == 0 and opt.v[3] == 0


def test_weighted_mean_is_sequential():
    us = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    assert torch.equal(weighted_mean(us), torch.tensor([2.0, 3.0]))
    assert torch.equal(weighted_mean(us, [1, 3]), torch.tensor([2.5, 3.5]))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("override, field", [
    (["method.name=flask"], "method.name"),
    (["task.name=nope"], "task.name"),
    (["server.optimizer=sgd"], "server.optimizer"),
    (["method.d_up=0"], "method.d_up"),
    (["method.d_up=1.5"], "method.d_up"),
    (["method.d_down=-1"], "method.d_down"),
    (["model.rank=0"], "model.rank"),
    (["rounds=abc"], "rounds"),
    (["comm.values=int3"], "comm.values"),
    (["method.dup=0.1"], "method.dup"),
    (["task.partition=zipf"], "task.partition"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolved(None, override)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="flasc"):
        resolved(None, ["method.name=flask"])


def test_config_accepts_fractions_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 3\nmethod:\n  d_up: 1/16\nmodel:\n  target_modules: [query, key]\n")
    cfg = load_config(p, ["model.rank=8"])
    assert cfg.rounds == 3 and cfg.method.d_up == 1 / 16 and cfg.model.rank == 8
    assert cfg.model.target_modules == ["query", "key"]
    with pytest.raises(ConfigError, match="not found"):
        resolved(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- flat vector


def test_flat_adapter_aliases_params_and_grads():
    from fedlora.model.flat import FlatAdapter

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    ad = FlatAdapter(model)
    assert ad.n == 4 + 8 + 2 and [e.name for e in ad.layout] == ["0.bias", "2.weight", "2.bias"]
    ad.load_(torch.arange(ad.n, dtype=torch.float32))
    assert torch.equal(model[2].bias.detach(), torch.tensor([12.0, 13.0]))
    ad.zero_grad()
    model(torch.ones(5, 3)).sum().backward()
    ad.check_aliasing()
    assert torch.equal(ad.grad[ad.layout[2].slice], torch.full((2,), 5.0))
