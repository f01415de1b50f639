"""`fedlora report` writes one self-contained index.html; a real headless chromium opens it
from disk, decodes every plot, logs no error, and renders a screenshot."""

from __future__ import annotations

import re

import pytest
from browser import chromium, inspect_page
from conftest import tiny_overrides

from fedlora.config import load_config
from fedlora.engine import Simulation

needs_chromium = pytest.mark.skipif(chromium() is None,
                                    reason="chromium is not installed (make install adds it)")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_bert_dir):
    from conftest import make_text_file

    from fedlora.report import report

    d = tmp_path_factory.mktemp("html")
    data = make_text_file(d / "data.jsonl")
    runs = []
    for name, extra in {"flasc": {}, "lora": {"method.name": "lora", "model.rank": 2}}.items():
        cfg = load_config(None, tiny_overrides(tiny_bert_dir, data, rounds=2, **extra))
        Simulation(cfg, d / "runs" / name, progress=False).run()
        runs.append(d / "runs" / name)
    report([d / "runs"], d / "report", target=0.0)
    return d / "report"


def test_index_html_is_self_contained(report_dir):
    page = (report_dir / "index.html").read_text()
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert len(pngs) == 3  # utility vs upload, pareto, bytes to target
    assert page.count('<img class="plot"') == len(pngs)
    assert page.count("src=\"data:image/png;base64,") == len(pngs)
    assert not re.search(r"""(src|href)="(?!data:)""", page)  # nothing outside the file
    assert "<script" not in page
    # the lora run's config diff from the first (flasc) run names what differs
    assert "method.name" in page and "model.rank" in page and "&#x27;lora&#x27;" in page


@needs_chromium
def test_chromium_renders_every_plot_without_errors(report_dir, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    seen = inspect_page(report_dir / "index.html", shot)
    assert seen["errors"] == []
    assert seen["title"] == "fedlora report"
    assert len(seen["images"]) == 3
    for img in seen["images"]:
        assert img["complete"] and img["width"] > 100 and img["height"] > 100, img
    im = Image.open(shot)
    assert im.width >= 1000 and im.height >= 1000
    assert len(im.convert("L").getcolors(1 << 16) or []) > 20  # not a blank page


@needs_chromium
def test_the_browser_check_catches_a_broken_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>x</title><link rel="icon" href="data:,">'
                   '</head><body><img alt="p" src="data:image/png;base64,AAAA">'
                   "<script>undefinedFunction()</script></body></html>")
    seen = inspect_page(bad, tmp_path / "bad.png")
    assert seen["images"][0]["width"] == 0
    assert any("undefinedFunction is not defined" in e for e in seen["errors"]), seen["errors"]
