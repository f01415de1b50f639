"""`fedlora sweep | search | report` on real (tiny) runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from conftest import tiny_overrides

from fedlora.cli import main
from fedlora.rundir import read_jsonl
from fedlora.sweep import parse_grid, run_point, search, sweep


def test_sweep_runs_the_grid_and_resume_skips_finished(tmp_path, tiny_bert_dir, text_file):
    over = tiny_overrides(tiny_bert_dir, text_file, rounds=1)
    grid = parse_grid(["method.d_up=1/4,1/2"])
    table = sweep(None, grid, tmp_path / "sw", overrides=over, progress=False)
    assert len(table) == 2 and set(table["method.d_up"]) == {"1/4", "1/2"}
    assert (tmp_path / "sw" / "results.csv").exists()
    assert table.loc[0, "total_upload_bytes"] < table.loc[1, "total_upload_bytes"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").glob("*/summary.json")}
    again = sweep(None, grid, tmp_path / "sw", overrides=over, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing re-ran
    pd.testing.assert_frame_equal(table, again)


def test_unfinished_point_resumes(tmp_path, tiny_bert_dir, text_file):
    out = tmp_path / "p"
    run_point(None, tiny_overrides(tiny_bert_dir, text_file, rounds=1), out)
    cfg = (out / "config.yaml").read_text().replace("rounds: 1", "rounds: 2")
    (out / "config.yaml").write_text(cfg)
    summary = json.loads((out / "summary.json").read_text())
    summary["finished"] = False
    (out / "summary.json").write_text(json.dumps(summary))
    s = run_point(None, [], out)
    assert s["rounds"] == 2 and s["finished"]


def test_search_and_report_cli(tmp_path, tiny_bert_dir, text_file, capsys):
    args = ["search", "--ranks", "1,2", "--densities", "1/2,1", "--out", str(tmp_path / "s")]
    for item in tiny_overrides(tiny_bert_dir, text_file, rounds=1):
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "flasc_s" in out and "lora_rank_grid" in out and "full_grid" in out
    ledger = pd.read_csv(tmp_path / "s" / "flasc_s" / "ledger.csv")
    trials = json.loads((tmp_path / "s" / "flasc_s" / "search.json").read_text())["trials"]
    assert ledger["cum_upload_bytes"].iloc[-1] == sum(t["upload_bytes"] for t in trials)
    assert (tmp_path / "s" / "report" / "report.md").exists()
    assert main(["report", str(tmp_path / "s" / "trials"), "--out", str(tmp_path / "r")]) == 0
    assert list((tmp_path / "r").glob("*.png"))


def test_search_target_scores_bytes_to_target_in_the_metric_direction(
        tmp_path, tiny_bert_dir, text_file):
    over = tiny_overrides(tiny_bert_dir, text_file, rounds=2)
    plain = search(None, [1, 2], [0.5, 1.0], tmp_path, overrides=over, progress=False)
    loss = {(t.rank, t.d_up): read_jsonl(Path(t.run_dir) / "metrics.jsonl")
            for t in plain["full_grid"].trials}
    target = max(rows[0]["loss"] for rows in loss.values())  # every trial reaches it at once
    scored = search(None, [1, 2], [0.5, 1.0], tmp_path, overrides=over, metric="loss",
                    target=target, progress=False)  # finished trials: rescored, not rerun
    for t in scored["full_grid"].trials:
        first = next(r for r in loss[t.rank, t.d_up] if r["loss"] <= target)  # lower wins
        assert t.utility == -first["cum_upload_bytes"]
