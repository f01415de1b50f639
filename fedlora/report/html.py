"""`index.html`: the report as one self-contained page that opens from disk.

Every plot is embedded as a `data:image/png;base64` URI, the styles are inline, and there
is no script and no external reference, so the file can be mailed or archived alone. It holds
the summary table (the same cells as report.md), every plot, and for each run its config
diff from the first run (dotted keys whose value differs).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedlora.report.runs import Run, SeedGroup, _flatten
from fedlora.report.table import table_cells

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 3px; }
.same { color: #888; }
"""


def config_diff(base: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in base, value in other) for every key whose value differs."""
    a, b = _flatten(base), _flatten(other)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(out: Path, groups: Sequence[SeedGroup], metric: str, higher: bool,
               table: pd.DataFrame, target: float | None, intro: list[str],
               figures: dict[str, str]) -> Path:
    """Write `out/index.html` from the report's parts; the PNGs in `figures` are embedded."""
    esc = html.escape
    header, rows = table_cells(table, metric, target, higher)
    parts = ["<h1>fedlora report</h1>", *(f"<p>{esc(p)}</p>" for p in intro),
             "<h2>Summary</h2>", _table(header, rows)]
    for i, (fname, caption) in enumerate(figures.items()):
        parts.append(f'<figure id="plot-{i}"><figcaption><h2>{esc(caption)}</h2></figcaption>'
                     f'<img class="plot" alt="{esc(caption)}" src="{_data_uri(out / fname)}">'
                     "</figure>")
    runs: list[Run] = [r for g in groups for r in g.runs]
    parts.append("<h2>Runs and their config diff from the first run</h2>")
    first = runs[0] if runs else None
    for r in runs:
        title = f"<h3>{esc(r.label)} <code>{esc(str(r.path))}</code></h3>"
        if r is first:
            parts.append(title + '<p class="same">the first run: the reference</p>')
            continue
        diff = config_diff(first.config, r.config)
        if not diff:
            parts.append(title + '<p class="same">same config as the first run</p>')
            continue
        parts.append(title + _table(["key", f"first run ({first.label})", "this run"],
                                    [[k, repr(a), repr(b)] for k, a, b in diff]))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>fedlora report</title><link rel=\"icon\" href=\"data:,\">"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
