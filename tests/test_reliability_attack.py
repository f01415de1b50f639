"""Clients that lie: 1 of 10 clients sends its real update sign-flipped (x -10) or scaled
(x 100) through the `tamper` hook. Under the sign flip the plain mean collapses to chance;
the norm bound and the trimmed mean stay within 1 point of the honest run (or above it), and
every rejection is in the metrics. Same tiny task as benchmarks/robust_attack.py (the
BENCHMARKS.md row)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import robust_attack as bench  # noqa: E402

from fedlora.rundir import read_jsonl  # noqa: E402

ROUNDS = 10


def check_attack(tmp_path, tiny_bert_dir, factor: float, mean_drops: bool) -> None:
    logging.getLogger("fedlora").setLevel(logging.ERROR)
    data = bench.make_data(tmp_path / "data.jsonl")

    def run(name, rule, bad):
        return bench.run_one(tiny_bert_dir, data, tmp_path / name, ROUNDS, 0, rule, bad, factor)

    try:
        honest = run("honest", {}, 0)["accuracy"]
        mean = run("mean", {}, 1)["accuracy"]
        bound = run("bound", bench.RULES["norm bound 3x median"], 1)
        trimmed = run("trimmed", {"server.robust.rule": "trimmed_mean",
                                  "server.robust.trim": 0.1}, 1)
    finally:
        logging.getLogger("fedlora").setLevel(logging.NOTSET)
    assert honest > 0.5, honest  # the task is learned at all
    if mean_drops:
        assert mean < honest - 0.1, (mean, honest)  # the attack works on the plain mean
    assert bound["accuracy"] >= honest - 0.01, (bound, honest)
    assert trimmed["accuracy"] >= honest - 0.01, (trimmed, honest)
    # the norm bound rejected the attacker (client 0) in every round, and only it
    rows = read_jsonl(tmp_path / "bound" / "metrics.jsonl")
    assert [list(r.get("rejected", {})) for r in rows] == [["0"]] * ROUNDS
    assert all("> bound" in r["rejected"]["0"] for r in rows)


def test_one_sign_flipped_client_of_ten(tmp_path, tiny_bert_dir):
    check_attack(tmp_path, tiny_bert_dir, bench.FACTOR["sign_flip"], mean_drops=True)


@pytest.mark.slow
def test_one_scaled_client_of_ten(tmp_path, tiny_bert_dir):
    # FedAdam divides each step by the running second moment, so an update that is the
    # honest direction x 100 barely moves the plain mean's accuracy here (measured: 0.667 vs
    # 0.667); what must hold is that the robust rules reject it and lose nothing.
    check_attack(tmp_path, tiny_bert_dir, bench.FACTOR["scaled"], mean_drops=False)
