"""log.tensorboard / log.mlflow: the real writers, read back with their own readers."""

from __future__ import annotations

import importlib.util
import logging

import pytest
from conftest import tiny_overrides

from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.rundir import read_jsonl


def _run(tiny_bert_dir, text_file, out, *extra, rounds=3):
    cfg = load_config(None, [*tiny_overrides(tiny_bert_dir, text_file, rounds=rounds), *extra])
    Simulation(cfg, out, progress=False).run()
    return read_jsonl(out / "metrics.jsonl")


def test_tensorboard_events_hold_every_metric_and_bytes(tiny_bert_dir, text_file, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install "
                        "'fedlora[log]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _run(tiny_bert_dir, text_file, tmp_path / "run", "log.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"metrics/accuracy", "metrics/loss", "metrics/train_loss", "metrics/wall_s",
            "bytes/upload_bytes", "bytes/cum_upload_bytes", "bytes/download_bytes",
            "vs_upload_bytes/accuracy"} <= tags
    acc_events = acc.Scalars("metrics/accuracy")
    assert [e.step for e in acc_events] == [r["round"] for r in rows]
    assert [e.value for e in acc_events] == pytest.approx([r["accuracy"] for r in rows])
    up = acc.Scalars("bytes/cum_upload_bytes")
    assert [int(e.value) for e in up] == [r["cum_upload_bytes"] for r in rows]
    by_bytes = acc.Scalars("vs_upload_bytes/accuracy")
    assert [e.step for e in by_bytes] == [r["cum_upload_bytes"] for r in rows]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]  # the charts layout


def test_tensorboard_resume_does_not_repeat_rounds(tiny_bert_dir, text_file, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tiny_bert_dir, text_file, tmp_path / "run", "log.tensorboard=true", rounds=2)
    Simulation.resume(tmp_path / "run", rounds=3, progress=False).run()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("metrics/accuracy")] == [1, 2, 3]


@pytest.mark.slow  # importing mlflow and creating its SQLite store: ~20 s here
def test_mlflow_local_store(tiny_bert_dir, text_file, tmp_path):
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed; `pip install 'fedlora[log]'` adds it")
    import mlflow

    rows = _run(tiny_bert_dir, text_file, tmp_path / "run", "log.mlflow=true")
    from fedlora.logsinks import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path / "run"))
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.params["method.name"] == "flasc" and run.data.params["rounds"] == "3"
    hist = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == \
        [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert [m.value for m in client.get_metric_history(run_id, "cum_upload_bytes")] == \
        [float(r["cum_upload_bytes"]) for r in rows]


def test_mlflow_missing_is_a_warning_not_a_failure(tiny_bert_dir, text_file, tmp_path,
                                                   monkeypatch, caplog):
    from fedlora import logsinks

    monkeypatch.setattr(logsinks, "mlflow_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        rows = _run(tiny_bert_dir, text_file, tmp_path / "run", "log.mlflow=true", rounds=1)
    assert len(rows) == 1
    assert "mlflow is not installed" in caplog.text and "fedlora[log]" in caplog.text
