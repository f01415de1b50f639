"""FLASC-S order, stopping rules, ledger and caching, against fake trial functions."""

import json
import math

import pytest

from fedlora.search import (
    SearchResult,
    TrialResult,
    flasc_s,
    full_grid,
    lora_rank_grid,
)

RANKS = [1, 2, 4, 8, 16]
DENSITIES = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]


class FakeTrial:
    """Counts calls; bytes = 1000 * rank * density, so equal-cost pairs have equal bytes."""

    def __init__(self, utility):
        self.utility = utility
        self.calls: list[tuple[int, float]] = []

    def __call__(self, rank: int, d_up: float) -> TrialResult:
        self.calls.append((rank, d_up))
        return TrialResult(self.utility(rank, d_up), round(1000 * rank * d_up), f"r{rank}-{d_up}")


def r2_wins_from_quarter(rank: int, d: float) -> float:
    """r1 loses to r2 only at d >= 1/4; rank helps up to 8, r16 ties r8 (no improvement)."""
    if rank == 1:
        return 0.5 + 0.1 * d
    base = 0.4 if d < 1 / 4 else 0.6
    return base + {2: 0.0, 4: 0.05, 8: 0.08, 16: 0.08}[rank]


def pairs(result: SearchResult) -> list[tuple[int, float]]:
    return [(t.rank, t.d_up) for t in result.trials]


def test_flasc_s_exact_order_and_stop():
    trial = FakeTrial(r2_wins_from_quarter)
    res = flasc_s(RANKS, DENSITIES, trial)
    assert pairs(res) == [
        # d_1 = 1/16: r1 runs at d * r2 / r1 = 1/8; r1 wins
        (1, 1 / 8),
        (2, 1 / 16),
        # d_2 = 1/8: r1 wins
        (1, 1 / 4),
        (2, 1 / 8),
        # d_3 = 1/4: r2 beats r1 -> density fixed at 1/4
        (1, 1 / 2),
        (2, 1 / 4),
        # rank phase: r4 and r8 improve; r16 ties r8 -> run (its bytes count), then stop
        (4, 1 / 4),
        (8, 1 / 4),
        (16, 1 / 4),
    ]
    assert res.chosen_density == 0.25
    assert [t.phase for t in res.trials] == ["density"] * 6 + ["rank"] * 3
    assert (res.best.rank, res.best.d_up) == (8, 0.25)
    assert trial.calls == pairs(res)
    # Density-phase pairs cost the same upload.
    dens = [t.upload_bytes for t in res.trials if t.phase == "density"]
    assert dens[0::2] == dens[1::2]


def test_ledger_sums_trial_bytes_and_tracks_best():
    res = flasc_s(RANKS, DENSITIES, FakeTrial(r2_wins_from_quarter))
    ledger = res.ledger()
    assert [row["cum_upload_bytes"] for row in ledger] == [
        125,
        250,
        500,
        750,
        1250,
        1750,
        2750,
        4750,
        8750,
    ]
    assert ledger[-1]["cum_upload_bytes"] == sum(t.upload_bytes for t in res.trials)
    best = [row["best_utility"] for row in ledger]
    assert best == pytest.approx([0.5125, 0.5125, 0.525, 0.525, 0.55, 0.6, 0.65, 0.68, 0.68])
    frame = res.ledger_frame()
    assert list(frame["cum_upload_bytes"]) == [row["cum_upload_bytes"] for row in ledger]


def test_early_stop_false_runs_every_rank():
    # Algorithm 2 read literally: the rank loop has no break, even if rank 4 is worse.
    def util(r, d):
        return {1: 0.5, 2: 0.6, 4: 0.55, 8: 0.5, 16: 0.4}[r]

    res = flasc_s(RANKS, DENSITIES, FakeTrial(util), early_stop=False)
    assert pairs(res) == [(1, 1 / 8), (2, 1 / 16), (4, 1 / 16), (8, 1 / 16), (16, 1 / 16)]
    assert flasc_s(RANKS, DENSITIES, FakeTrial(util)).trials[-1].rank == 4


def test_rank_phase_stops_at_first_non_improvement():
    # Rank 4 is worse than rank 2 at the chosen density: run it, then stop.
    def util(r, d):
        return {1: 0.5, 2: 0.6, 4: 0.55, 8: 0.9, 16: 0.9}[r]

    res = flasc_s(RANKS, DENSITIES, FakeTrial(util))
    assert pairs(res) == [(1, 1 / 8), (2, 1 / 16), (4, 1 / 16)]
    assert (res.best.rank, res.best.d_up) == (2, 1 / 16)


def test_clipping_and_cache_never_reruns_a_config():
    # r2 = 4 never beats r1 = 1: from d = 1/4 on, r1's density d*4 >= 1 clips to 1 and the
    # clipped (1, 1.0) trial is reused, never rerun.
    trial = FakeTrial(lambda r, d: 0.9 if r == 1 else 0.1 * d)
    res = flasc_s([1, 4, 16], [1 / 8, 1 / 4, 1 / 2, 1], trial)
    assert pairs(res) == [
        (1, 0.5),
        (4, 1 / 8),
        (1, 1.0),
        (4, 1 / 4),
        (4, 1 / 2),
        (4, 1.0),
        (16, 1.0),
    ]
    assert len(trial.calls) == len(set(trial.calls)) == 7
    assert res.chosen_density == 1.0
    assert any("clipped" in n for n in res.notes)
    assert any("never beat" in n for n in res.notes)


def test_lower_is_better_mirrors_higher_is_better():
    up = flasc_s(RANKS, DENSITIES, FakeTrial(r2_wins_from_quarter))
    down = flasc_s(
        RANKS,
        DENSITIES,
        FakeTrial(lambda r, d: 100 - r2_wins_from_quarter(r, d)),
        higher_is_better=False,
    )
    assert pairs(up) == pairs(down)
    assert (down.best.rank, down.best.d_up) == (8, 0.25)
    assert down.ledger()[-1]["best_utility"] == pytest.approx(100 - 0.68)


def test_density_grid_gets_one_appended_and_validated():
    res = flasc_s([1, 2], [1 / 4, 1 / 2], FakeTrial(lambda r, d: 0.0))
    assert res.densities == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError):
        flasc_s([1, 2], [0.0, 0.5], FakeTrial(lambda r, d: 0.0))
    with pytest.raises(ValueError):
        flasc_s([4], DENSITIES, FakeTrial(lambda r, d: 0.0))


def test_nan_utility_never_wins():
    res = flasc_s([1, 2, 4], [1 / 2, 1], FakeTrial(lambda r, d: math.nan if r == 2 else 0.5))
    # r2 diverged at every density, so FLASC-S carries on at d = 1 with r4.
    assert pairs(res) == [(1, 1.0), (2, 0.5), (2, 1.0), (4, 1.0)]
    assert res.best.rank == 1


def test_grids_order_and_shared_cache():
    trial = FakeTrial(r2_wins_from_quarter)
    cache: dict = {}
    grid = full_grid([1, 2, 4], [1 / 4, 1 / 2, 1], trial, cache=cache)
    costs = [t.rank * t.d_up for t in grid.trials]
    assert costs == sorted(costs) and len(grid.trials) == 9
    assert pairs(grid)[:4] == [(1, 0.25), (1, 0.5), (2, 0.25), (1, 1.0)]
    assert len(trial.calls) == 9

    lora = lora_rank_grid([4, 1, 2], trial, cache=cache)
    assert pairs(lora) == [(1, 1.0), (2, 1.0), (4, 1.0)]
    assert len(trial.calls) == 9  # all three answered by the shared cache ...
    assert all(t.reused for t in lora.trials)
    assert lora.ledger()[-1]["cum_upload_bytes"] == 7000  # ... yet they count as tuning cost


def test_json_roundtrip_and_files(tmp_path):
    res = flasc_s(RANKS, DENSITIES, FakeTrial(r2_wins_from_quarter))
    res.trials[0].utility = math.nan
    text = res.to_json()
    d = json.loads(text)  # strict JSON: NaN written as null
    assert d["trials"][0]["utility"] is None
    assert d["best"]["rank"] == 8 and len(d["ledger"]) == 9
    back = SearchResult.from_json(text)
    assert pairs(back) == pairs(res) and math.isnan(back.trials[0].utility)
    assert back.chosen_density == 0.25

    res.write(tmp_path)
    lines = (tmp_path / "ledger.csv").read_text().splitlines()
    assert lines[0] == "trial,rank,d_up,phase,utility,upload_bytes,cum_upload_bytes,best_utility"
    assert len(lines) == 10 and lines[-1].split(",")[6] == "8750"
    assert json.loads((tmp_path / "search.json").read_text())["strategy"] == "flasc_s"


def test_trial_result_from_run_dir(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"round": 1, "upload_bytes": 10, "download_bytes": 5, "cum_upload_bytes": 10, '
        '"cum_download_bytes": 5, "wall_s": 0.1, "accuracy": 0.3}\n'
    )
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "final": {"accuracy": 0.3},
                "total_upload_bytes": 10,
                "total_download_bytes": 5,
                "rounds": 1,
                "finished": True,
            }
        )
    )
    res = TrialResult.from_run_dir(tmp_path)
    assert res == TrialResult(0.3, 10, str(tmp_path))
