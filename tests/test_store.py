"""ClientStore: the same generations in a folder, a record (Flower's context.state), memory."""

from __future__ import annotations

import pytest
import torch

from fedlora.client.store import ClientStore


@pytest.fixture(params=["folder", "record", "memory"])
def store(request, tmp_path):
    root = {"folder": tmp_path / "clients", "record": {}, "memory": None}[request.param]
    return ClientStore(root)


def test_generations_rollback_and_commit(store):
    a, b = torch.arange(3.0), torch.ones(2)
    assert store.load(7) == {}
    store.save(7, 1, {"x": a})
    store.save(7, 3, {"x": a + 1, "y": b})
    store.save(8, 2, {"x": -a})
    assert torch.equal(store.load(7)["y"], b) and torch.equal(store.load(8)["x"], -a)
    store.rollback(2)  # resume from a checkpoint of round 2: round 3 never happened
    got = store.load(7)
    assert set(got) == {"x"} and torch.equal(got["x"], a)
    store.commit(2)  # the older generations go; the newest at or before 2 stays
    assert torch.equal(store.load(7)["x"], a) and torch.equal(store.load(8)["x"], -a)


def test_a_record_holds_safetensors_bytes_only():
    rec: dict[str, bytes] = {}
    store = ClientStore(rec)
    store.save(3, 5, {"residual": torch.full((4,), 0.5)})
    assert list(rec) == ["c3.r5.safetensors"] and isinstance(rec["c3.r5.safetensors"], bytes)
    again = ClientStore(rec)  # the next message's ClientApp: a fresh store, the same record
    assert torch.equal(again.load(3)["residual"], torch.full((4,), 0.5))
    again.save(3, 6, {"residual": torch.zeros(4)})
    again.commit(6)
    assert list(rec) == ["c3.r6.safetensors"]
