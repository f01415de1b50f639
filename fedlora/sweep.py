"""Grids of runs and FLASC-S on real training: one run directory per point, resumable.

A rerun skips finished points and resumes unfinished ones from their checkpoint, so an
interrupted sweep costs at most the rounds since each point's last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from fedlora import rundir
from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.report.runs import choose_metric, load_run
from fedlora.report.table import bytes_to_target
from fedlora.search import SearchResult, TrialResult, flasc_s, full_grid, lora_rank_grid


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`["method.d_up=1/4,1/16", "model.rank=4,16"]` -> {key: [values]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        key, values = item.split("=", 1)
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ValueError(f"--grid {key}: no values")
    return grid


def _slug(point: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


def run_point(config: str | Path | None, overrides: list[str], out: Path,
              progress: bool = False) -> dict:
    """Run, resume or skip one point; returns its summary."""
    summary_path = out / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("finished"):
        return json.loads(summary_path.read_text())
    if rundir.has_checkpoint(out):
        return Simulation.resume(out, progress=progress).run()
    if (out / "metrics.jsonl").exists():  # died before its first checkpoint: start over
        for f in out.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    cfg = load_config(config, overrides)
    return Simulation(cfg, out, progress=progress).run()


def sweep(config: str | Path | None, grid: dict[str, list[str]], out: str | Path, *,
          seeds: int = 1, overrides: Sequence[str] = (), progress: bool = True) -> pd.DataFrame:
    """Run every point of `grid` x seeds into `out/<point>`; write and return results.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    for p in points:  # validate every point before spending any compute
        load_config(config, [*overrides, *(f"{k}={v}" for k, v in p.items())])
    rows = []
    todo = [(p, s) for p in points for s in range(seeds)]
    for point, seed in tqdm(todo, desc="sweep", unit="run", disable=not progress):
        full = {**point, "seed": str(seed)}
        run_dir = out / _slug(full)
        summary = run_point(config, [*overrides, *(f"{k}={v}" for k, v in full.items())],
                            run_dir)
        rows.append({**full, "run_dir": str(run_dir), **summary.get("final", {}),
                     "total_upload_bytes": summary["total_upload_bytes"],
                     "total_download_bytes": summary["total_download_bytes"],
                     "rounds": summary["rounds"]})
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    return table


def _fraction(d: float) -> str:
    return str(Fraction(d).limit_denominator(4096))


def search(config: str | Path | None, ranks: Sequence[int], densities: Sequence[float],
           out: str | Path, *, overrides: Sequence[str] = (), metric: str | None = None,
           target: float | None = None, progress: bool = True) -> dict[str, SearchResult]:
    """FLASC-S next to a LoRA-rank grid and a full rank x density grid, on real runs.

    Trials are shared: a (rank, density) point trains once, and every strategy that asks
    for it is charged its bytes. With `target`, a trial's utility is minus the upload bytes
    it needed to reach the target (never reached: -inf), i.e. "bytes to target".
    """
    out = Path(out)
    bar = tqdm(desc="search trials", unit="run", disable=not progress)

    def trial(rank: int, d_up: float) -> TrialResult:
        over = [*overrides, f"model.rank={rank}",
                *([f"method.d_up={_fraction(d_up)}"] if d_up < 1 else []),  # lora has no d_up
                "method.name=" + ("lora" if d_up >= 1 else "flasc")]
        run_dir = out / "trials" / f"r{rank}-d{_fraction(d_up).replace('/', '_')}"
        run_point(config, over, run_dir)
        bar.update(1)
        if target is None:
            return TrialResult.from_run_dir(run_dir, metric)
        run = load_run(run_dir)
        name, higher = choose_metric([run], metric)  # perplexity: lower wins
        hit = bytes_to_target(run.metrics, name, target, higher)
        return TrialResult(-math.inf if hit is None else -float(hit), run.total_upload_bytes,
                           str(run_dir))

    cache: dict = {}
    results = {"flasc_s": flasc_s(ranks, densities, trial, cache=cache),
               "lora_rank_grid": lora_rank_grid(ranks, trial, cache=cache),
               "full_grid": full_grid(ranks, densities, trial, cache=cache)}
    bar.close()
    for name, res in results.items():
        res.write(out / name)
    return results
