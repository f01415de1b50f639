"""Plots and tables from run directories: ``fedlora.report.report(run_dirs, out_dir)``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.report.html import write_html
from fedlora.report.plots import (
    human_bytes,
    plot_bytes_to_target,
    plot_client_histograms,
    plot_pareto,
    plot_tuning,
    plot_utility_vs_upload,
)
from fedlora.report.runs import (
    Run,
    SeedGroup,
    choose_metric,
    group_by_seed,
    load_run,
    load_runs,
    read_metrics,
    read_per_client,
)
from fedlora.report.table import auto_target, bytes_to_target, summary_table, to_markdown

__all__ = [
    "Run",
    "SeedGroup",
    "auto_target",
    "bytes_to_target",
    "group_by_seed",
    "human_bytes",
    "load_run",
    "load_runs",
    "plot_bytes_to_target",
    "plot_client_histograms",
    "plot_pareto",
    "plot_tuning",
    "plot_utility_vs_upload",
    "read_metrics",
    "read_per_client",
    "report",
    "summary_table",
    "to_markdown",
]


def report(
    run_dirs: Sequence[str | Path | Run],
    out_dir: str | Path,
    *,
    metric: str | None = None,
    target: float | None = None,
    ledgers: Mapping[str, Any] | None = None,
    search_target: float | None = None,
) -> Path:
    """Write the PNGs, ``report.md`` and a self-contained ``index.html`` (plots embedded) for
    some runs; return the markdown path.

    ``run_dirs`` may name run directories or folders holding them. ``metric`` defaults to
    the first of accuracy / perplexity / micro_f1 the runs log; ``target`` defaults to the
    best value every run reaches. ``ledgers`` (name -> SearchResult / ledger.csv) adds the
    tuning-cost plot; ``search_target`` says its trials were scored by bytes to reach that
    value of ``metric`` (``fedlora search --target``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    groups = group_by_seed(runs)
    metric, higher = choose_metric(runs, metric)
    if target is None:
        target = auto_target(runs, metric, higher)
        auto = True
    else:
        auto = False
    target = None if math.isnan(target) else target

    figures = {"utility_vs_upload.png": "Utility vs. cumulative upload (paper Fig. 3)"}
    plot_utility_vs_upload(groups, out / "utility_vs_upload.png", metric=metric)
    if len(groups) > 1:
        plot_pareto(groups, out / "pareto.png", metric=metric)
        figures["pareto.png"] = "Rank × density, final utility vs. total upload (Fig. 6 left)"
    if target is not None:
        plot_bytes_to_target(groups, out / "bytes_to_target.png", metric=metric, targets=target)
        figures["bytes_to_target.png"] = "Upload needed to reach the target (Fig. 4)"
    if ledgers:
        plot_tuning(ledgers, out / "tuning.png", metric=metric, higher_is_better=higher,
                    bytes_to=search_target)
        figures["tuning.png"] = "Tuning cost: best utility vs. cumulative tuning upload (Fig. 7)"

    if plot_client_histograms(groups, out / "per_client.png") is not None:
        figures["per_client.png"] = "Per-client utility on each client's local test split"
    table = summary_table(groups, metric, target, higher)
    intro = _intro(groups, metric, higher, target, auto)
    md = _markdown(groups, intro, metric, higher, target, table, figures)
    path = out / "report.md"
    path.write_text(md)
    write_html(out, groups, metric, higher, table, target, intro, figures)  # index.html
    return path


def _intro(groups: list[SeedGroup], metric: str, higher: bool, target: float | None,
           auto: bool) -> list[str]:
    """The report's opening paragraphs (markdown and HTML alike)."""
    nruns = sum(len(g.runs) for g in groups)
    lines = [
        f"{nruns} run(s) in {len(groups)} seed group(s); utility metric: `{metric}` "
        f"({'higher' if higher else 'lower'} is better). Bytes are decimal "
        "(1 MB = 10^6 B); byte columns are means over seeds, ± is the sample std over seeds."
    ]
    if target is not None:
        how = "the best value every run reaches" if auto else "given"
        lines.append(
            f"Target {metric} = {target:.4g} ({how}); upload to target is the "
            "cumulative upload at the first evaluated round that reaches it."
        )
    return lines


def _markdown(
    groups: list[SeedGroup],
    intro: list[str],
    metric: str,
    higher: bool,
    target: float | None,
    table: Any,
    figures: dict[str, str],
) -> str:
    lines = ["# fedlora report", "", *intro]
    lines += ["", to_markdown(table, metric, target, higher)]
    for fname, caption in figures.items():
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    lines += ["## Runs", ""]
    for g in groups:
        lines.append(f"* **{g.label}**: " + ", ".join(f"`{r.path}`" for r in g.runs))
    return "\n".join(lines) + "\n"
