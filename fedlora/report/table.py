"""The summary table: one row per seed group, numbers a reader can check by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from fedlora.report.runs import Run, SeedGroup, group_by_seed


def bytes_to_target(
    metrics_df: pd.DataFrame, metric: str, target: float, higher_is_better: bool = True
) -> int | None:
    """Cumulative upload bytes at the first evaluated round whose ``metric`` reaches ``target``.

    "Reaches" is ``>=`` (or ``<=`` when lower is better). None if the run never gets there.
    """
    if metric not in metrics_df or metrics_df.empty:
        return None
    df = metrics_df[metrics_df[metric].notna()].sort_values("round")
    hit = df[metric] >= target if higher_is_better else df[metric] <= target
    if not hit.any():
        return None
    return int(df.loc[hit.idxmax(), "cum_upload_bytes"])


def auto_target(runs: Sequence[Run], metric: str, higher_is_better: bool = True) -> float:
    """The best utility that *every* run reaches at some evaluated round.

    A common target all runs hit, so "bytes to target" is defined for each of them.
    """
    bests = []
    for run in runs:
        values = run.curve(metric)[metric]
        if len(values):
            bests.append(values.max() if higher_is_better else values.min())
    if not bests:
        return math.nan
    return float(min(bests) if higher_is_better else max(bests))


def summary_table(
    runs: Sequence[Run] | Sequence[SeedGroup],
    metric: str,
    target: float | None = None,
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """One row per seed group; byte columns are means over seeds, std is the sample std."""
    groups = _as_groups(runs)
    rows = [_group_row(g, metric, target, higher_is_better) for g in groups]
    return pd.DataFrame(rows)


def _group_row(
    group: SeedGroup, metric: str, target: float | None, higher_is_better: bool
) -> dict[str, Any]:
    finals = np.array([r.final(metric) for r in group.runs], dtype=float)
    finals = finals[~np.isnan(finals)]
    row: dict[str, Any] = {
        "label": group.label,
        "seeds": len(group.runs),
        "finished": sum(r.finished for r in group.runs),
        "final_mean": float(finals.mean()) if len(finals) else math.nan,
        "final_std": float(finals.std(ddof=1)) if len(finals) > 1 else math.nan,
        "upload_mb": float(np.mean([r.total_upload_bytes for r in group.runs])) / 1e6,
        "download_mb": float(np.mean([r.total_download_bytes for r in group.runs])) / 1e6,
        "rounds_min": min(r.rounds for r in group.runs),
        "rounds_max": max(r.rounds for r in group.runs),
    }
    if target is not None:
        hits = [bytes_to_target(r.metrics, metric, target, higher_is_better) for r in group.runs]
        reached = [h for h in hits if h is not None]
        row["to_target_mb"] = float(np.mean(reached)) / 1e6 if reached else math.nan
        row["reached"] = len(reached)
    return row


def to_markdown(
    table: pd.DataFrame, metric: str, target: float | None = None, higher_is_better: bool = True
) -> str:
    """Render :func:`summary_table` output as a GitHub markdown table."""
    header, rows = table_cells(table, metric, target, higher_is_better)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def table_cells(
    table: pd.DataFrame, metric: str, target: float | None = None, higher_is_better: bool = True
) -> tuple[list[str], list[list[str]]]:
    """The header and the formatted cells of :func:`summary_table` output (markdown, HTML)."""
    arrow = "↑" if higher_is_better else "↓"
    header = [
        "Run",
        "Seeds",
        f"Final {metric} {arrow} (mean ± std)",
        "Upload (MB)",
        "Download (MB)",
        "Rounds",
    ]
    if target is not None:
        op = "≥" if higher_is_better else "≤"
        header.append(f"Upload to {metric} {op} {target:.4g} (MB)")
    return header, [_cells(row, target is not None) for row in table.to_dict("records")]


def _cells(row: dict[str, Any], with_target: bool) -> list[str]:
    seeds = str(row["seeds"])
    if row["finished"] < row["seeds"]:
        seeds += f" ({row['seeds'] - row['finished']} unfinished)"
    final = _pm(row["final_mean"], row["final_std"])
    rounds = str(row["rounds_min"])
    if row["rounds_max"] != row["rounds_min"]:
        rounds = f"{row['rounds_min']}–{row['rounds_max']}"
    cells = [
        row["label"],
        seeds,
        final,
        f"{row['upload_mb']:.3f}",
        f"{row['download_mb']:.3f}",
        rounds,
    ]
    if with_target:
        if row["reached"] == 0:
            cells.append("not reached")
        else:
            cell = f"{row['to_target_mb']:.3f}"
            if row["reached"] < row["seeds"]:
                cell += f" ({row['reached']}/{row['seeds']} seeds)"
            cells.append(cell)
    return cells


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def _as_groups(runs: Sequence[Run] | Sequence[SeedGroup]) -> list[SeedGroup]:
    if runs and isinstance(runs[0], SeedGroup):
        return list(runs)  # type: ignore[arg-type]
    return group_by_seed(runs)  # type: ignore[arg-type]
