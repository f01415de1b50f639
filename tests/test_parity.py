"""Results must not move: every method's tiny run matches the recorded fixture bit for bit.

The fixture (tests/fixtures/parity.json) was recorded before the client/server protocol
split; see tests/parity.py for the cases and how to regenerate it when an issue says that
results may move.
"""

from __future__ import annotations

import json

import pytest
from parity import CASES, FIXTURE, environment, run_case

RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_results_do_not_move(name, tmp_path, tiny_bert_dir, text_file):
    if RECORDED["environment"] != environment():
        pytest.skip(f"fixture recorded on {RECORDED['environment']}, here {environment()}")
    want = RECORDED["cases"][name]
    got = run_case(name, tiny_bert_dir, text_file, tmp_path / name)
    assert got["ledger"] == want["ledger"]
    assert got["metrics"] == want["metrics"]
    assert (got["n"], got["sum"]) == (want["n"], want["sum"])
    assert got["sha256"] == want["sha256"]


def test_every_documented_method_has_a_case():
    from fedlora.methods import METHODS

    covered = {c["method.name"] for c in CASES.values()}
    assert set(METHODS) <= covered, set(METHODS) - covered
