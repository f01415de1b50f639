"""Report: loading run dirs, seed groups, table numbers (checked by hand), PNGs render."""

import json
import warnings
from pathlib import Path

import pytest
import yaml

from fedlora.report import (
    bytes_to_target,
    group_by_seed,
    load_run,
    load_runs,
    plot_bytes_to_target,
    plot_pareto,
    plot_tuning,
    plot_utility_vs_upload,
    read_metrics,
    report,
    summary_table,
    to_markdown,
)
from fedlora.report.plots import human_bytes, pareto_front
from fedlora.report.runs import fmt_density, run_label
from fedlora.search import TrialResult, flasc_s, lora_rank_grid

# Accuracy at the evaluated rounds 2, 4, 5 (eval_every = 2, plus the final round).
ACC = {
    ("lora", 0): [0.50, 0.70, 0.75],
    ("lora", 1): [0.52, 0.71, 0.77],
    ("flasc", 0): [0.45, 0.65, 0.72],
    ("flasc", 1): [0.48, 0.69, 0.74],
}
UPLOAD = {"lora": 1_000_000, "flasc": 250_000}  # bytes per round
DOWNLOAD = 1_000_000


def write_run(
    root: Path,
    method: str,
    seed: int,
    rank: int = 16,
    *,
    acc=None,
    upload=None,
    rounds: int = 5,
    partial: bool = False,
    summary: bool = True,
    task: str = "wordnet-topics",
) -> Path:
    """A run directory as the engine writes it (every method field resolved, as config.py does:
    a LoRA run still carries d_up=0.25, which the report must not show)."""
    path = root / f"{method}-r{rank}-s{seed}"
    path.mkdir(parents=True)
    config = {
        "seed": seed,
        "rounds": rounds,
        "clients_per_round": 10,
        "eval_every": 2,
        "task": {"name": task, "num_clients": 100, "partition": "dirichlet", "alpha": 0.1},
        "model": {"rank": rank, "alpha": 16, "target_modules": ["query", "value"]},
        "method": {
            "name": method,
            "d_down": 1.0,
            "d_up": 0.25,
            "density": 0.25,
            "prune_ratio": 0.02,
            "prune_every": 1,
        },
        "client": {"lr": 0.01, "batch_size": 16, "epochs": 1, "max_steps": None},
        "server": {"optimizer": "fedadam", "lr": 0.001},
        "comm": {"values": "fp32"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    acc = acc if acc is not None else ACC[(method, seed)]
    upload = upload if upload is not None else UPLOAD[method]
    evals = dict(zip([2, 4, 5], acc, strict=True))
    lines = []
    for r in range(1, rounds + 1):
        rec = {
            "round": r,
            "upload_bytes": upload,
            "download_bytes": DOWNLOAD,
            "cum_upload_bytes": upload * r,
            "cum_download_bytes": DOWNLOAD * r,
            "train_loss": None if r == 1 else 0.5,
            "clients": 10,
            "aggregated": 10,
            "wall_s": 0.1,
        }
        if r == 3:
            rec["dropped"] = [4, 7]
        if r in evals:
            rec.update(accuracy=evals[r], loss=1 - evals[r])
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if partial:
        text += '{"round": 6, "upload_bytes": 25'  # crashed mid-write
    (path / "metrics.jsonl").write_text(text)
    if summary:
        (path / "summary.json").write_text(
            json.dumps(
                {
                    "utility": "accuracy",
                    "final": {"accuracy": acc[-1], "loss": 1 - acc[-1]},
                    "total_upload_bytes": upload * rounds,
                    "total_download_bytes": DOWNLOAD * rounds,
                    "rounds": rounds,
                    "finished": True,
                }
            )
        )
    return path


@pytest.fixture
def four_runs(tmp_path):
    """2 methods x 2 seeds; one run has a partial trailing line, one lacks summary.json."""
    root = tmp_path / "runs"
    return [
        write_run(root, "lora", 0),
        write_run(root, "lora", 1),
        write_run(root, "flasc", 0, partial=True),
        write_run(root, "flasc", 1, summary=False),
    ]


def assert_png(path: Path, min_bytes: int = 15_000):
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes, (path, len(data))


def test_partial_trailing_line_is_ignored_quietly(four_runs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_metrics(four_runs[2] / "metrics.jsonl")
    assert list(df["round"]) == [1, 2, 3, 4, 5]
    assert df["accuracy"].notna().sum() == 3


def test_malformed_middle_line_warns_and_repeated_rounds_keep_last(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        '{"round": 1, "cum_upload_bytes": 1}\n{"rou\n'
        '{"round": 2, "cum_upload_bytes": 2, "accuracy": 0.1}\n'
        '{"round": 2, "cum_upload_bytes": 2, "accuracy": 0.2}\n'
    )  # resumed run
    with pytest.warns(UserWarning, match="malformed"):
        df = read_metrics(p)
    assert list(df["round"]) == [1, 2] and df["accuracy"].iloc[-1] == 0.2


def test_load_run_and_missing_summary(four_runs):
    run = load_run(four_runs[3])
    assert run.label == "flasc r16 d_up=1/4"
    assert not run.finished  # rebuilt from metrics: crashed runs are never "finished"
    assert run.total_upload_bytes == 5 * 250_000 and run.rounds == 5
    assert run.final("accuracy") == 0.74
    assert load_run(four_runs[0]).label == "lora r16"
    with pytest.raises(FileNotFoundError):
        load_run(four_runs[0].parent / "nope")


def test_labels_read_only_the_methods_own_knobs(four_runs):
    lora = load_run(four_runs[0])
    assert lora.config["method"]["d_up"] == 0.25  # resolved default, unused by LoRA
    assert (lora.label, lora.density) == ("lora r16", 1.0)
    assert (
        run_label(
            {
                "method": {
                    "name": "adapter_lth",
                    "prune_ratio": 0.02,
                    "prune_every": 1,
                    "d_up": 0.25,
                },
                "model": {"rank": 4},
            }
        )
        == "adapter_lth r4 prune_ratio=0.02"
    )
    assert run_label({"method": {"name": "flasc", "d_down": 0.25, "d_up": 1 / 16}}) == (
        "flasc d_down=1/4 d_up=1/16"
    )


def test_seed_groups(four_runs):
    groups = group_by_seed(load_runs([four_runs[0].parent]))  # a folder of runs
    assert sorted(g.label for g in groups) == ["flasc r16 d_up=1/4", "lora r16"]
    assert all(g.seeds == [0, 1] for g in groups)


def test_colliding_labels_get_the_differing_key(tmp_path):
    a = write_run(tmp_path / "a", "lora", 0)
    b = write_run(tmp_path / "b", "lora", 0)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["client"]["lr"] = 0.1
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    labels = sorted(g.label for g in group_by_seed(load_runs([a, b])))
    assert labels == ["lora r16 lr=0.01", "lora r16 lr=0.1"]


def test_bytes_to_target_by_hand(four_runs):
    lora0, flasc0 = load_run(four_runs[0]), load_run(four_runs[2])
    # lora seed 0: acc 0.70 at round 4 -> 4 rounds x 1 MB.
    assert bytes_to_target(lora0.metrics, "accuracy", 0.70) == 4_000_000
    # flasc seed 0: 0.65 at round 4 misses, 0.72 at round 5 -> 5 x 250 kB.
    assert bytes_to_target(flasc0.metrics, "accuracy", 0.70) == 1_250_000
    assert bytes_to_target(lora0.metrics, "accuracy", 0.99) is None
    # lower is better: loss 0.5 at round 2 <= 0.5.
    assert bytes_to_target(lora0.metrics, "loss", 0.5, higher_is_better=False) == 2_000_000
    assert bytes_to_target(lora0.metrics, "perplexity", 1.0) is None


def test_table_numbers(four_runs):
    runs = load_runs(four_runs)
    table = summary_table(runs, "accuracy", target=0.70)
    lora = table.set_index("label").loc["lora r16"]
    flasc = table.set_index("label").loc["flasc r16 d_up=1/4"]
    assert lora["final_mean"] == pytest.approx(0.76)
    assert lora["final_std"] == pytest.approx(0.0141421356)  # sample std of 0.75, 0.77
    assert lora["upload_mb"] == 5.0 and lora["download_mb"] == 5.0
    assert lora["to_target_mb"] == 4.0  # both seeds reach 0.70 at round 4
    # flasc: both seeds first reach 0.70 at round 5 (0.72 / 0.74): 5 x 250 kB.
    assert flasc["to_target_mb"] == 1.25 and flasc["upload_mb"] == 1.25
    md = to_markdown(table, "accuracy", target=0.70)
    assert "| lora r16 | 2 | 0.76 ± 0.014 | 5.000 | 5.000 | 5 | 4.000 |" in md
    flasc_row = (
        "| flasc r16 d_up=1/4 | 2 (1 unfinished) | 0.73 ± 0.014 | 1.250 | 5.000 | 5 | 1.250 |"
    )
    assert flasc_row in md
    assert "Upload to accuracy ≥ 0.7 (MB)" in md

    unreachable = to_markdown(summary_table(runs, "accuracy", target=0.76), "accuracy", 0.76)
    assert "not reached" in unreachable and "| 5.000 (1/2 seeds) |" in unreachable


def test_report_renders_everything(four_runs, tmp_path):
    out = tmp_path / "report"
    ledgers = {
        "FLASC-S": flasc_s([1, 2, 4], [0.25, 0.5, 1], fake_trial),
        "LoRA rank grid": lora_rank_grid([1, 2, 4], fake_trial),
    }
    md_path = report(four_runs, out, ledgers=ledgers)
    md = md_path.read_text()
    for name in ("utility_vs_upload.png", "pareto.png", "bytes_to_target.png", "tuning.png"):
        assert_png(out / name)
        assert f"]({name})" in md
    # auto target: best accuracy every run reaches = min(0.75, 0.77, 0.72, 0.74) = 0.72
    assert "Target accuracy = 0.72 (the best value every run reaches)" in md
    # lora reaches 0.72 only at round 5 (0.70 / 0.71 at round 4): 5 x 1 MB.
    assert "| lora r16 | 2 | 0.76 ± 0.014 | 5.000 | 5.000 | 5 | 5.000 |" in md


def fake_trial(rank: int, d: float) -> TrialResult:
    return TrialResult(0.5 + 0.05 * rank * d**0.5, round(1e6 * rank * d))


def test_individual_plots(four_runs, tmp_path):
    runs = load_runs(four_runs)
    assert_png(plot_utility_vs_upload(runs, tmp_path / "u.png", metric="loss"))
    assert_png(plot_pareto(runs, tmp_path / "p.png"))
    assert_png(
        plot_bytes_to_target(runs, tmp_path / "b.png", metric="accuracy", targets=[0.6, 0.7, 0.76])
    )
    res = flasc_s([1, 2, 4], [0.25, 0.5, 1], fake_trial)
    res.write(tmp_path / "search")
    assert_png(plot_tuning({"FLASC-S": tmp_path / "search" / "ledger.csv"}, tmp_path / "t.png"))


def test_demo_two_single_seed_runs(tmp_path):
    dirs = [write_run(tmp_path, "lora", 0), write_run(tmp_path, "flasc", 0)]
    out = plot_utility_vs_upload(load_runs(dirs), tmp_path / "demo.png")
    assert_png(out)
    md = report(dirs, tmp_path / "rep", target=0.7).read_text()
    assert "Target accuracy = 0.7 (given)" in md


def test_helpers():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(1_250_000) == "1.25 MB"
    assert human_bytes(3e9) == "3 GB"
    assert fmt_density(0.0625) == "1/16" and fmt_density(0.3) == "0.3" and fmt_density(1) == "1"
    pts = [(1, 0.5), (2, 0.4), (3, 0.7), (4, 0.7), (5, 0.8)]
    assert pareto_front(pts) == [0, 2, 4]
    assert pareto_front(pts, higher_is_better=False) == [0, 1]
