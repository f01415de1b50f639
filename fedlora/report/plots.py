"""The paper's figures from run directories and tuning ledgers (matplotlib, PNG).

* :func:`plot_utility_vs_upload` - Fig. 3: utility vs. cumulative upload bytes, min/mean/max
  band over seeds.
* :func:`plot_pareto` - Fig. 6 (left): final utility vs. total upload, color = rank,
  marker = density, with the Pareto front.
* :func:`plot_tuning` - Fig. 7: best utility so far vs. cumulative tuning bytes, one line per
  tuning strategy.
* :func:`plot_bytes_to_target` - Fig. 4: upload bytes needed to reach a target utility.

Bytes are decimal: 1 kB = 1e3 B, 1 MB = 1e6 B, 1 GB = 1e9 B. Figures are built with the
object API (``Figure`` renders through Agg), so importing this never switches the user's
pyplot backend and no global figure state leaks between calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fedlora.report.runs import (
    Run,
    SeedGroup,
    choose_metric,
    fmt_density,
    group_by_seed,
    metric_direction,
    read_per_client,
)
from fedlora.report.table import bytes_to_target

STYLE = {
    "figure.figsize": (7.0, 4.4),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "legend.frameon": False,
}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h"]
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "perplexity": "Perplexity",
    "micro_f1": "Micro-F1",
    "macro_f1": "Macro-F1",
    "loss": "Loss",
}


# ---------------------------------------------------------------------------- formatting


def human_bytes(x: float, _pos: Any = None) -> str:
    """1234567 -> '1.23 MB' (decimal units); used as a tick formatter too."""
    if x == 0 or not math.isfinite(x):
        return "0 B" if x == 0 else ""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(x) >= scale * 0.9995:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} B"


def metric_label(metric: str, higher_is_better: bool | None = None) -> str:
    if higher_is_better is None:
        higher_is_better = metric_direction(metric)
    name = METRIC_NAMES.get(metric, metric.replace("_", " "))
    return f"{name} ({'↑' if higher_is_better else '↓'})"


def format_bytes_axis(ax: Axes, axis: str = "x", log: bool = False) -> None:
    """Human-readable byte ticks; on log axes, label 1-2-5 steps when the span is short."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
        decades = math.log10(max(hi, 1) / max(lo, 1))
        subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0)
        target.set_major_locator(LogLocator(base=10, subs=subs))
        target.set_minor_formatter(NullFormatter())
    else:
        target.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    target.set_major_formatter(FuncFormatter(human_bytes))


def _want_log(values: Sequence[float], log: bool | None, span: float = 20) -> bool:
    """Auto log scale when positive values span more than a factor of ``span``."""
    if log is not None:
        return log
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return bool(pos) and max(pos) / min(pos) > span


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def _subtitle(groups: Sequence[SeedGroup]) -> str:
    tasks = {str((g.config.get("task") or {}).get("name", "")) for g in groups}
    tasks.discard("")
    return f"task: {tasks.pop()}" if len(tasks) == 1 else ""


def _title(ax: Axes, title: str, groups: Sequence[SeedGroup]) -> None:
    sub = _subtitle(groups)
    ax.set_title(f"{title}\n{sub}" if sub else title, loc="left")


def _groups(runs: Sequence[Run] | Sequence[SeedGroup]) -> list[SeedGroup]:
    if runs and isinstance(runs[0], SeedGroup):
        return list(runs)  # type: ignore[arg-type]
    return group_by_seed(runs)  # type: ignore[arg-type]


def _all_runs(groups: Sequence[SeedGroup]) -> list[Run]:
    return [r for g in groups for r in g.runs]


# ---------------------------------------------------------------------------- Fig. 3


def group_curve(group: SeedGroup, metric: str) -> pd.DataFrame:
    """Per evaluated round: mean upload bytes and min/mean/max of ``metric`` over seeds."""
    frames = [r.curve(metric) for r in group.runs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["round", "x", "mean", "min", "max", "n"])
    df = pd.concat(frames)
    agg = df.groupby("round").agg(
        x=("cum_upload_bytes", "mean"),
        mean=(metric, "mean"),
        min=(metric, "min"),
        max=(metric, "max"),
        n=(metric, "size"),
    )
    return agg.reset_index()


def plot_utility_vs_upload(
    runs: Sequence[Run] | Sequence[SeedGroup],
    out: str | Path,
    *,
    metric: str | None = None,
    logx: bool | None = None,
    title: str | None = None,
) -> Path:
    """Utility vs. cumulative upload bytes, one line per seed group (paper Fig. 3).

    Line = mean over seeds, shaded band = min..max over seeds. x is log-scaled when the
    runs span more than 20x in bytes (auto), which is how sparse methods shift left.
    """
    groups = _groups(runs)
    metric, higher = choose_metric(_all_runs(groups), metric)
    curves = [(g, group_curve(g, metric)) for g in groups]
    xs = [x for _, c in curves for x in c["x"]]
    log = _want_log(xs, logx)
    with matplotlib.rc_context(STYLE):
        fig = Figure()
        ax = fig.subplots()
        for i, (g, c) in enumerate(curves):
            if log:
                c = c[c["x"] > 0]
            if c.empty:
                continue
            color = f"C{i % 10}"
            nseeds = len(g.runs)
            label = g.label + (f" ({nseeds} seeds)" if nseeds > 1 else "")
            marker = "o" if len(c) <= 25 else None
            ax.plot(c["x"], c["mean"], color=color, marker=marker, ms=4, lw=1.8, label=label)
            if nseeds > 1:
                ax.fill_between(c["x"], c["min"], c["max"], color=color, alpha=0.2, lw=0)
        if log:
            ax.set_xscale("log")
        format_bytes_axis(ax, "x", log)
        ax.set_xlabel("Cumulative upload communication" + (" (log scale)" if log else ""))
        ax.set_ylabel(metric_label(metric, higher))
        _title(ax, title or f"{METRIC_NAMES.get(metric, metric)} vs. upload communication", groups)
        if not log:
            ax.set_xlim(left=0)
        ax.legend(loc="best")
        return _save(fig, out)


# ---------------------------------------------------------------------------- Fig. 6 (left)


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of points not dominated by a cheaper-or-equal point, sorted by cost."""
    order = sorted(
        range(len(points)), key=lambda i: (points[i][0], -_score(points[i][1], higher_is_better))
    )
    front, best = [], -math.inf
    for i in order:
        s = _score(points[i][1], higher_is_better)
        if s > best:
            front.append(i)
            best = s
    return front


def _score(y: float, higher_is_better: bool) -> float:
    if y is None or not math.isfinite(y):
        return -math.inf
    return y if higher_is_better else -y


def plot_pareto(
    runs: Sequence[Run] | Sequence[SeedGroup],
    out: str | Path,
    *,
    metric: str | None = None,
    logx: bool | None = None,
    title: str | None = None,
) -> Path:
    """Final utility vs. total upload per seed group (paper Fig. 6, left).

    Color = LoRA rank, marker = upload density; thin lines join the densities of one rank
    (LoRA counts as FLASC at density 1); the dashed line is the Pareto front (best utility
    for a given upload budget). Other methods are plotted too, labelled by name.
    """
    groups = _groups(runs)
    metric, higher = choose_metric(_all_runs(groups), metric)
    pts = [_pareto_point(g, metric) for g in groups]
    ranks = sorted({p["rank"] for p in pts if p["rank"] is not None})
    densities = sorted({p["density"] for p in pts}, reverse=True)
    cmap = matplotlib.colormaps["viridis"]
    # Stop short of viridis' pale yellow end, which vanishes on white.
    rank_color = {r: cmap(i / max(len(ranks) - 1, 1) * 0.78) for i, r in enumerate(ranks)}
    dens_marker = {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(densities)}
    log = _want_log([p["x"] for p in pts], logx, span=4)  # ranks and densities step by 2x

    with matplotlib.rc_context(STYLE):
        fig = Figure()
        ax = fig.subplots()
        for (_family, r), line in _by_family_rank(pts).items():
            if len(line) > 1:
                ax.plot(
                    [p["x"] for p in line],
                    [p["y"] for p in line],
                    color=rank_color.get(r, "gray"),
                    lw=1,
                    alpha=0.6,
                    zorder=1,
                )
        for p in pts:
            ax.errorbar(
                p["x"],
                p["y"],
                yerr=p["err"] or None,
                color=rank_color.get(p["rank"], "gray"),
                marker=dens_marker[p["density"]],
                ms=8,
                mec="black",
                mew=0.6,
                ls="none",
                capsize=2,
                zorder=3,
            )
            if p["family"] != "flasc":
                ax.annotate(
                    p["label"],
                    (p["x"], p["y"]),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize=7,
                    color="dimgray",
                )
        front = pareto_front([(p["x"], p["y"]) for p in pts], higher)
        ax.plot(
            [pts[i]["x"] for i in front],
            [pts[i]["y"] for i in front],
            ls="--",
            color="black",
            lw=1.2,
            zorder=2,
        )
        if log:
            ax.set_xscale("log")
            ax.margins(x=0.08)
        format_bytes_axis(ax, "x", log)
        ax.set_xlabel("Total upload communication per run" + (" (log scale)" if log else ""))
        ax.set_ylabel(f"Final {metric_label(metric, higher).lower()}")
        _title(ax, title or "Rank × density: utility vs. upload", groups)
        _pareto_legends(ax, rank_color, dens_marker)
        return _save(fig, out)


def _pareto_point(g: SeedGroup, metric: str) -> dict[str, Any]:
    finals = np.array([r.final(metric) for r in g.runs], dtype=float)
    finals = finals[~np.isnan(finals)]
    method = g.runs[0].method
    return {
        "x": float(np.mean([r.total_upload_bytes for r in g.runs])),
        "y": float(finals.mean()) if len(finals) else math.nan,
        "err": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "rank": g.rank,
        "density": g.density,
        "label": g.label,
        "family": "flasc" if method in ("flasc", "lora") else method,
    }


def _by_family_rank(pts: list[dict[str, Any]]) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    lines: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for p in sorted(pts, key=lambda p: p["x"]):
        lines.setdefault((p["family"], p["rank"]), []).append(p)
    return lines


def _pareto_legends(ax: Axes, rank_color: dict, dens_marker: dict) -> None:
    rank_handles = [
        Line2D([], [], color=c, marker="o", ls="-", label=f"r={r}") for r, c in rank_color.items()
    ]
    dens_handles = [
        Line2D([], [], color="gray", marker=m, ls="none", mec="black", label=f"d={fmt_density(d)}")
        for d, m in dens_marker.items()
    ]
    front = [Line2D([], [], color="black", ls="--", label="Pareto front")]
    leg = ax.legend(
        handles=rank_handles + front,
        title="LoRA rank",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.add_artist(leg)
    ax.legend(
        handles=dens_handles, title="Upload density", loc="lower left", bbox_to_anchor=(1.01, 0.0)
    )


# ---------------------------------------------------------------------------- Fig. 7


def ledger_frame(ledger: Any) -> pd.DataFrame:
    """Accept a SearchResult, a ledger DataFrame, a list of dicts, or a ledger.csv path."""
    if hasattr(ledger, "ledger_frame"):
        return ledger.ledger_frame()
    if isinstance(ledger, pd.DataFrame):
        return ledger
    if isinstance(ledger, (str, Path)):
        return pd.read_csv(ledger)
    return pd.DataFrame(list(ledger))


def _strategy_color(name: str, fallback: int) -> str:
    low = name.lower().replace("_", "-")
    if "flasc-s" in low:
        return "tab:green"
    if "lora" in low and "grid" in low or low.startswith("lora"):
        return "tab:blue"
    return ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink"][fallback % 5]


def plot_tuning(
    ledgers: Mapping[str, Any],
    out: str | Path,
    *,
    metric: str = "utility",
    higher_is_better: bool = True,
    logx: bool | None = None,
    title: str | None = None,
    bytes_to: float | None = None,
) -> Path:
    """Best utility found so far vs. cumulative tuning upload bytes (paper Fig. 7).

    Each strategy (FLASC-S, LoRA rank grid, full grid, ...) is a step line: the cost of
    tuning is every trial's upload, the payoff is the best configuration found so far.
    ``bytes_to``: the ledgers come from a search scored by bytes to reach this value of
    ``metric`` (utility = -bytes); the y axis then shows those bytes, lower is better.
    """
    frames = {name: ledger_frame(led) for name, led in ledgers.items()}
    if bytes_to is not None:
        frames = {name: f.assign(**{c: (-f[c]).replace(np.inf, np.nan)
                                    for c in ("utility", "best_utility") if c in f})
                  for name, f in frames.items()}
        higher_is_better = False
    xs = [x for f in frames.values() for x in f["cum_upload_bytes"]]
    log = _want_log(xs, logx)
    with matplotlib.rc_context(STYLE):
        fig = Figure()
        ax = fig.subplots()
        other = 0
        for name, f in frames.items():
            if f.empty:
                continue
            color = _strategy_color(name, other)
            other += color not in ("tab:green", "tab:blue")
            n = len(f)
            label = f"{name}: {n} trial{'s' if n != 1 else ''}{_best_config(f, higher_is_better)}"
            ax.step(
                f["cum_upload_bytes"],
                f["best_utility"],
                where="post",
                color=color,
                lw=2,
                label=label,
            )
            ax.plot(f["cum_upload_bytes"], f["best_utility"], "o", color=color, ms=4)
        if log:
            ax.set_xscale("log")
            ax.margins(x=0.08)
        format_bytes_axis(ax, "x", log)
        ax.set_xlabel("Cumulative tuning upload communication" + (" (log scale)" if log else ""))
        name = METRIC_NAMES.get(metric, metric).lower()
        if bytes_to is None:
            ax.set_ylabel(f"Best {name} so far ({'↑' if higher_is_better else '↓'})")
        else:
            format_bytes_axis(ax, "y", log)
            ax.set_ylabel(f"Best upload to reach {name} {bytes_to:g} so far (↓)")
        ax.set_title(title or "Tuning cost: best configuration vs. communication", loc="left")
        ax.legend(loc="best" if bytes_to is not None else
                  "lower right" if higher_is_better else "upper right")
        return _save(fig, out)


def _best_config(f: pd.DataFrame, higher_is_better: bool) -> str:
    """', best r=4 d=1/4': the configuration the strategy ends up choosing."""
    if not {"rank", "d_up", "utility"} <= set(f.columns):
        return ""
    util = f["utility"].to_numpy(dtype=float)
    if np.isnan(util).all():
        return ""
    row = f.iloc[int(np.nanargmax(util) if higher_is_better else np.nanargmin(util))]
    return f", best r={int(row['rank'])} d={fmt_density(float(row['d_up']))}"


# ---------------------------------------------------------------------------- Fig. 4


def plot_bytes_to_target(
    runs: Sequence[Run] | Sequence[SeedGroup],
    out: str | Path,
    *,
    metric: str | None = None,
    targets: float | Sequence[float],
    title: str | None = None,
) -> Path:
    """Upload bytes each seed group needs to first reach each target (paper Fig. 4).

    Bar = mean over the seeds that reach the target, whiskers = min..max over those seeds;
    the text gives the bytes and the ratio to the first group, groups that never reach a
    target are marked "not reached".
    """
    groups = _groups(runs)
    metric, higher = choose_metric(_all_runs(groups), metric)
    targets = [targets] if isinstance(targets, (int, float)) else list(targets)
    hits = np.full((len(groups), len(targets)), np.nan)
    lo, hi = hits.copy(), hits.copy()
    for gi, g in enumerate(groups):
        for ti, t in enumerate(targets):
            b = [bytes_to_target(r.metrics, metric, t, higher) for r in g.runs]
            b = [v for v in b if v is not None]
            if b:
                hits[gi, ti], lo[gi, ti], hi[gi, ti] = np.mean(b), min(b), max(b)

    height = 0.8 / len(targets)
    op = "≥" if higher else "≤"
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(groups) * len(targets) + 0.5))
        ax = fig.subplots()
        ypos = np.arange(len(groups))
        xmax = np.nanmax(hi) if np.isfinite(hi).any() else 1.0
        for ti, t in enumerate(targets):
            y = ypos - 0.4 + height * (ti + 0.5)
            w = np.nan_to_num(hits[:, ti])
            err = np.vstack([hits[:, ti] - lo[:, ti], hi[:, ti] - hits[:, ti]])
            ax.barh(
                y,
                w,
                height=height * 0.9,
                color=f"C{ti}",
                label=f"{METRIC_NAMES.get(metric, metric)} {op} {t:.4g}",
            )
            ok = np.isfinite(hits[:, ti]) & (hi[:, ti] > lo[:, ti])  # seeds disagree
            ax.errorbar(
                w[ok], y[ok], xerr=err[:, ok], fmt="none", ecolor="black", lw=0.8, capsize=2
            )
            ref = hits[0, ti]
            for gi in range(len(groups)):
                v = hits[gi, ti]
                text = "not reached" if np.isnan(v) else human_bytes(v)
                if np.isfinite(v) and np.isfinite(ref) and ref > 0:
                    text += f"  ({v / ref:.2g}×)"
                ax.text(
                    np.nan_to_num(hi[gi, ti]) + xmax * 0.01,
                    y[gi],
                    text,
                    va="center",
                    fontsize=8,
                    color="gray" if np.isnan(v) else "black",
                )
        ax.set_yticks(ypos, [g.label for g in groups])
        ax.invert_yaxis()
        ax.set_xlim(0, xmax * 1.3)
        ax.grid(axis="y", visible=False)
        format_bytes_axis(ax, "x", log=False)
        ax.set_xlabel("Upload communication to reach target (↓)")
        name = METRIC_NAMES.get(metric, metric).lower()
        ax.set_title(
            title
            or f"Upload needed to reach a target {name}\n(ratio relative to {groups[0].label})",
            loc="left",
        )
        ax.legend(loc="best")
        return _save(fig, out)


# ---------------------------------------------------------------------------- per client


def plot_client_histograms(
    runs: Sequence[Run] | Sequence[SeedGroup],
    out: str | Path,
    *,
    bins: int = 20,
) -> Path | None:
    """Histograms of per-client utility at each run's last per-client evaluation, one panel
    per seed group (clients pooled over seeds): the deployed model filled, the global model
    and the local-only reference as outlines. None when no run evaluated per client."""
    groups = _groups(runs)
    panels = []
    for g in groups:
        rows = [r for r in (read_per_client(run.path) for run in g.runs) if r]
        if rows:
            panels.append((g, rows))
    if not panels:
        return None
    metric = panels[0][1][0].get("metric", "accuracy")
    values = [v for _, rows in panels for r in rows for k in ("global", "deployed", "local")
              for v in r[k]]
    lo, hi = (0.0, 1.0) if metric == "accuracy" else (min(values), max(values))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (g, rows) in zip(axes, panels):
            pooled = {k: [v for r in rows for v in r[k]] for k in ("global", "deployed", "local")}
            ax.hist(pooled["deployed"], bins=edges, color="C0", alpha=0.6, label="deployed")
            ax.hist(pooled["global"], bins=edges, histtype="step", color="C1", lw=1.6,
                    label="global")
            ax.hist(pooled["local"], bins=edges, histtype="step", color="C2", lw=1.2, ls="--",
                    label="local-only")
            n = len(pooled["deployed"])
            ax.set_title(f"{g.label}\n{n} clients, {len(rows)} seed(s), round {rows[0]['round']}",
                         loc="left", fontsize=9)
            ax.set_xlabel(f"per-client {METRIC_NAMES.get(metric, metric)}")
            ax.set_ylabel("clients")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        axes[0].legend(loc="best", fontsize=8)
        return _save(fig, out)
