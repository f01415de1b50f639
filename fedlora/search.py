"""FLASC-S (paper Algorithm 2) and the grid searches it is compared against (paper Fig. 7).

Every search is written against an injected ``trial(rank, d_up) -> TrialResult`` that trains
one FLASC configuration and reports its utility and total upload bytes, so the search logic
is testable without training. Each search returns a :class:`SearchResult` holding the trials
in the order they ran and a tuning ledger: after each trial, the cumulative tuning upload
(every trial's communication counts) and the best utility found so far.

FLASC-S, as implemented (Algorithm 2; rank grid ``r_1 < r_2 < ... < r_M``, density grid
``d_1 < ... < d_N = 1``):

1. Density phase. For ``i = 1..N``: run ``FLASC(r_1, d_i * r_2 / r_1)`` then
   ``FLASC(r_2, d_i)`` (equal upload bytes); stop at the first ``d_i`` where ``r_2`` beats
   ``r_1`` (``y_1 < y_2``, strict). If ``r_2`` never wins, the loop ends with ``d_i = d_N = 1``
   (what the pseudocode's loop leaves behind) and the rank phase runs at density 1.
2. Rank phase. Fix ``d = d_i``; for ``j = 3..M`` run ``FLASC(r_j, d)``. Stopping rule
   (``early_stop=True``, the default): keep going while utility strictly improves over the
   previous rank at that density (``y_j`` better than ``y_{j-1}``, with ``y_2`` the ``r_2``
   trial at ``d``); the first ``r_j`` that does not improve is run (its bytes count) and ends
   the search. ``early_stop=False`` runs every remaining rank, which is the pseudocode
   taken literally: its rank loop (lines 8-9) has no break.

Reading of Algorithm 2. The paper text we work from is a PDF extraction with
garbled indices: line 8 reads ``for j = i..M`` and line 9 ``y_j = FLASC(r_3, d_i * r_1/r_2)``.
We read these as ``for j = 3..M`` and ``FLASC(r_j, d_i)``, following the prose of Sec. 4.2
("we fix d and increase the rank") and the method rules ("fix that density and increase the rank
along the grid"); ``d_i * r_1 / r_2`` would change the density at every rank, which neither
says.

Density clipping: ``r_1``'s density ``d_i * r_2 / r_1`` exceeds 1 once ``d_i > r_1 / r_2``.
A client cannot send more than its dense update, so it is clipped to 1. From there on the
pair is not equal-cost: ``r_1`` uploads ``r_1 / (d_i * r_2)`` of ``r_2``'s bytes, so "r_2
beats r_1" means r_2 wins while spending more. We still compare (the paper's loop does);
the clipped ``FLASC(r_1, 1)`` runs once and is reused from the cache for later densities.
Clipping is recorded in ``SearchResult.notes``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class TrialResult:
    """What one training run reports to a search."""

    utility: float
    upload_bytes: int
    run_dir: str | None = None

    @classmethod
    def from_run_dir(cls, path: str | Path, metric: str | None = None) -> TrialResult:
        """Final utility and total upload of a finished run directory."""
        from fedlora.report.runs import choose_metric, load_run

        run = load_run(path)
        metric, _ = choose_metric([run], metric)
        return cls(run.final(metric), run.total_upload_bytes, str(run.path))


Trial = Callable[[int, float], TrialResult]


@dataclass
class TrialRecord:
    """One trial as run by a search; ``reused`` = answered from a shared cache, not rerun."""

    rank: int
    d_up: float
    utility: float
    upload_bytes: int
    run_dir: str | None
    phase: str
    reused: bool = False


@dataclass
class SearchResult:
    """The trials of one search, in order, and the tuning ledger derived from them."""

    strategy: str
    ranks: list[int]
    densities: list[float]
    higher_is_better: bool = True
    trials: list[TrialRecord] = field(default_factory=list)
    chosen_density: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> TrialRecord | None:
        """The best trial (ties: the earliest, i.e. the cheapest found)."""
        best = None
        for t in self.trials:
            if best is None or _better(t.utility, best.utility, self.higher_is_better):
                best = t
        return best

    @property
    def total_upload_bytes(self) -> int:
        return sum(t.upload_bytes for t in self.trials)

    def ledger(self) -> list[dict[str, Any]]:
        """After each trial: cumulative tuning upload bytes and best utility so far."""
        rows, cum, best = [], 0, math.nan
        for i, t in enumerate(self.trials, start=1):
            cum += t.upload_bytes
            if _better(t.utility, best, self.higher_is_better):
                best = t.utility
            rows.append(
                {
                    "trial": i,
                    "rank": t.rank,
                    "d_up": t.d_up,
                    "phase": t.phase,
                    "utility": t.utility,
                    "upload_bytes": t.upload_bytes,
                    "cum_upload_bytes": cum,
                    "best_utility": best,
                }
            )
        return rows

    def ledger_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.ledger(), columns=_LEDGER_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        best = self.best
        d["best"] = asdict(best) if best is not None else None
        d["ledger"] = self.ledger()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SearchResult:
        d = json.loads(text)
        trials = [TrialRecord(**{**t, "utility": _nan(t["utility"])}) for t in d.pop("trials")]
        d.pop("best", None)
        d.pop("ledger", None)
        return cls(trials=trials, **d)

    def write(self, out_dir: str | Path) -> Path:
        """Write ``search.json`` and ``ledger.csv`` into ``out_dir``; returns the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(self.to_json() + "\n")
        with open(out / "ledger.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_LEDGER_COLUMNS)
            writer.writeheader()
            writer.writerows(self.ledger())
        return out


_LEDGER_COLUMNS = [
    "trial",
    "rank",
    "d_up",
    "phase",
    "utility",
    "upload_bytes",
    "cum_upload_bytes",
    "best_utility",
]


class _Runner:
    """Runs trials for one search, never the same (rank, density) twice, and records them.

    ``shared`` is an optional cache across searches (e.g. a sweep that reuses runs): a hit
    there skips training but is still recorded, because that strategy would have paid for it.
    """

    def __init__(self, trial: Trial, result: SearchResult, shared: dict | None = None):
        self.trial, self.result, self.shared = trial, result, shared
        self.seen: dict[tuple[int, float], TrialResult] = {}

    def __call__(self, rank: int, d_up: float, phase: str) -> float:
        key = (int(rank), _dkey(d_up))
        if key in self.seen:
            return self.seen[key].utility
        reused = self.shared is not None and key in self.shared
        res = self.shared[key] if reused else self.trial(int(rank), float(d_up))
        if self.shared is not None:
            self.shared[key] = res
        self.seen[key] = res
        self.result.trials.append(
            TrialRecord(
                int(rank),
                float(d_up),
                float(res.utility),
                int(res.upload_bytes),
                res.run_dir,
                phase,
                reused,
            )
        )
        return float(res.utility)


# ---------------------------------------------------------------------------- searches


def flasc_s(
    ranks: Sequence[int],
    densities: Sequence[float],
    trial: Trial,
    *,
    higher_is_better: bool = True,
    early_stop: bool = True,
    cache: dict | None = None,
) -> SearchResult:
    """FLASC-S (Algorithm 2): tune density on the two smallest ranks, then grow the rank.

    See the module docstring for the exact order, the stopping rules and density clipping.
    ``cache`` maps (rank, density) -> TrialResult and is shared with other searches.
    """
    ranks, densities = _rank_grid(ranks, min_len=2), _density_grid(densities)
    result = SearchResult("flasc_s", ranks, densities, higher_is_better)
    run = _Runner(trial, result, cache)
    r1, r2 = ranks[0], ranks[1]

    # Density phase: equal-cost pairs (r_1, d*r_2/r_1) vs (r_2, d), smallest d first.
    for d in densities:
        d1 = d * r2 / r1
        if d1 > 1:
            result.notes.append(f"d={d:g}: r_1={r1} density {d1:g} > 1 clipped to 1")
            d1 = 1.0
        y1 = run(r1, d1, "density")
        y2 = run(r2, d, "density")
        if _better(y2, y1, higher_is_better):
            break
    else:
        result.notes.append(f"r_2={r2} never beat r_1={r1}; rank phase at d={d:g}")
    result.chosen_density = d

    # Rank phase: fixed density, increase the rank while utility improves.
    prev = y2
    for r in ranks[2:]:
        y = run(r, d, "rank")
        if early_stop and not _better(y, prev, higher_is_better):
            break
        prev = y
    return result


def lora_rank_grid(
    ranks: Sequence[int],
    trial: Trial,
    *,
    higher_is_better: bool = True,
    cache: dict | None = None,
) -> SearchResult:
    """Grid search over the LoRA rank alone (d_up = 1), smallest (cheapest) rank first."""
    ranks = _rank_grid(ranks, min_len=1)
    result = SearchResult("lora_rank_grid", ranks, [1.0], higher_is_better)
    run = _Runner(trial, result, cache)
    for r in ranks:
        run(r, 1.0, "grid")
    return result


def full_grid(
    ranks: Sequence[int],
    densities: Sequence[float],
    trial: Trial,
    *,
    higher_is_better: bool = True,
    cache: dict | None = None,
) -> SearchResult:
    """Every (rank, density), cheapest first (rank * density, then rank) as in paper Fig. 7."""
    ranks, densities = _rank_grid(ranks, min_len=1), _density_grid(densities, require_one=False)
    result = SearchResult("full_grid", ranks, densities, higher_is_better)
    run = _Runner(trial, result, cache)
    for r, d in sorted(
        ((r, d) for r in ranks for d in densities), key=lambda p: (p[0] * p[1], p[0])
    ):
        run(r, d, "grid")
    return result


# ---------------------------------------------------------------------------- helpers


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    """Strictly better; NaN (a diverged run) is worse than anything."""
    if a is None or math.isnan(a):
        return False
    if b is None or math.isnan(b):
        return True
    return a > b if higher_is_better else a < b


def _dkey(d: float) -> float:
    # d * r2 / r1 and the grid's own values must hit the same cache entry.
    return round(float(d), 12)


def _rank_grid(ranks: Sequence[int], min_len: int) -> list[int]:
    out = sorted({int(r) for r in ranks})
    if len(out) < min_len or out[0] < 1:
        raise ValueError(f"need at least {min_len} distinct positive rank(s), got {list(ranks)}")
    return out


def _density_grid(densities: Sequence[float], require_one: bool = True) -> list[float]:
    """Sorted, deduplicated densities in (0, 1]; Algorithm 2's grid ends with 1 (added)."""
    out = sorted({_dkey(d) for d in densities})
    if not out or out[0] <= 0 or out[-1] > 1:
        raise ValueError(f"densities must lie in (0, 1], got {list(densities)}")
    if require_one and out[-1] != 1.0:
        out.append(1.0)
    return out


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x
