"""`fedlora predict` / `fedlora eval` on JSONL files, `datasets` folders and stdin; `datasets`
folders as text-file input; the Python API and `python -m fedlora`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from test_tasks_text import tiny_gpt2  # noqa: F401 (fixture)

from fedlora.cli import main
from fedlora.config import ConfigError, load_config
from fedlora.model.backbone import MissingResource


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    """One finished text-file run through the Python API, shared by the tests below."""
    from conftest import make_text_file

    import fedlora

    d = tmp_path_factory.mktemp("pred")
    data = make_text_file(d / "data.jsonl")
    over = dict(x.split("=", 1) for x in tiny_overrides(tiny_bert_dir, data, rounds=2))
    run = fedlora.run(None, d / "run", overrides=over)
    return run, data


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A real `datasets` DatasetDict saved with save_to_disk: ClassLabel labels, other column
    names than text-file's defaults, train and test splits."""
    datasets = pytest.importorskip("datasets")
    d = tmp_path_factory.mktemp("hfds") / "ds"
    words = {"animal": ["a dog that barks", "a small cat", "a large horse"],
             "food": ["sweet apple pie", "bread with butter", "hot soup"],
             "tool": ["a sharp knife", "heavy hammer", "a saw for wood"]}
    names = list(words)

    def part(lo: int, hi: int):
        rows = {"sentence": [], "topic": [], "user": []}
        for i in range(lo, hi):
            k = i % 3
            rows["sentence"].append(f"{words[names[k]][i % 3]} number {i}")
            rows["topic"].append(k)
            rows["user"].append(f"u{i % 5}")
        features = datasets.Features({"sentence": datasets.Value("string"),
                                      "topic": datasets.ClassLabel(names=names),
                                      "user": datasets.Value("string")})
        return datasets.Dataset.from_dict(rows, features=features)

    datasets.DatasetDict({"train": part(0, 90), "test": part(90, 120)}).save_to_disk(str(d))
    return d


def test_api_run_and_load_run(trained):
    import pandas as pd

    import fedlora
    from fedlora.config import Config

    run, _ = trained
    again = fedlora.load_run(run.dir)
    assert isinstance(again.config, Config) and again.config.rounds == 2
    assert isinstance(again.metrics, pd.DataFrame) and list(again.metrics["round"]) == [1, 2]
    assert again.metrics["accuracy"].iloc[-1] == run.summary["final"]["accuracy"]
    assert set(again.ledger.columns) >= {"round", "client", "upload_bytes", "download_bytes"}
    assert again.config.task.partition == "natural"  # written back: the file has users


def test_predict_jsonl_and_stdin(trained, tmp_path, capsys, monkeypatch):
    run, data = trained
    inp = tmp_path / "new.jsonl"
    inp.write_text('{"text": "a dog that barks loudly"}\n{"text": "hot soup tonight"}\n')
    assert main(["predict", str(run.dir), "--input", str(inp), "--out",
                 str(tmp_path / "p.jsonl")]) == 0
    preds = _rows(tmp_path / "p.jsonl")
    assert [p["text"] for p in preds] == ["a dog that barks loudly", "hot soup tonight"]
    for p in preds:
        assert p["label"] in ("animal", "food", "tool")
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["probability"] == max(p["probabilities"].values())
    monkeypatch.setattr(sys, "stdin", io.StringIO("a dog that barks loudly\n\nhot soup tonight\n"))
    capsys.readouterr()
    assert main(["predict", str(run.export_dir), "--input", "-"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["label"], round(x["probability"], 6)) for x in lines] == \
        [(p["label"], round(p["probability"], 6)) for p in preds]


def test_eval_on_the_held_out_rows_equals_the_runs_metrics(trained, tmp_path, capsys):
    from fedlora.tasks.base import label_map, train_test
    from fedlora.tasks.text_file import load_task_examples

    run, _ = trained
    cfg = run.config
    ex = load_task_examples(cfg)
    labels, _ = label_map(ex.labels)
    _, test_idx = train_test(cfg, len(labels), labels, ex.is_test)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": ex.inputs[i], "label": ex.labels[i]}) + "\n"
                            for i in test_idx))
    capsys.readouterr()
    assert main(["eval", str(run.dir), "--data", str(held)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["accuracy"] == run.summary["final"]["accuracy"]
    assert abs(got["loss"] - run.summary["final"]["loss"]) < 1e-9


def test_predict_and_eval_on_a_datasets_folder(trained, dataset_dir, capsys):
    run, _ = trained
    capsys.readouterr()
    assert main(["predict", str(run.dir), "--input", str(dataset_dir), "--text-column",
                 "sentence"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 30 and all(json.loads(x)["label"] in ("animal", "food", "tool")
                                    for x in lines)
    assert main(["eval", str(run.dir), "--data", str(dataset_dir), "--split", "train",
                 "--text-column", "sentence", "--label-column", "topic"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert 0.0 <= got["accuracy"] <= 1.0 and got["loss"] > 0


def test_errors_name_what_is_wrong(trained, tmp_path, capsys):
    run, _ = trained
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["predict", str(run.dir), "--input", str(empty)]) == 2
    assert "has no rows" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "x", "label": "food"}\n')
    assert main(["predict", str(run.dir), "--input", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "['body', 'label']" in err and "--text-column" in err
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"text": "a dog", "label": "animal"}\n{"text": "a car", "label": "car"}\n')
    assert main(["eval", str(run.dir), "--data", str(unseen)]) == 2
    err = capsys.readouterr().err
    assert "row 1 has label 'car'" in err and "never saw" in err and "'animal'" in err
    assert main(["predict", str(run.dir), "--input", "imdb"]) == 2
    assert "save_to_disk" in capsys.readouterr().err


def test_text_file_reads_a_datasets_folder(tiny_bert_dir, dataset_dir, tmp_path):
    from fedlora.engine import Simulation

    over = tiny_overrides(tiny_bert_dir, dataset_dir, **{
        "task.text_column": "sentence", "task.label_column": "topic",
        "task.client_column": "user"})
    over.remove("task.partition=natural")
    over.remove("task.test_size=24")
    cfg = load_config(None, over)
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    sim.run()
    data = sim.task.data
    assert len(data.test) == 30 and len(data.train) == 90  # the DatasetDict's own test split
    assert data.label_names == ["animal", "food", "tool"]  # ClassLabel names, not ints
    assert list(data.client_names) == [f"u{i}" for i in range(5)]
    assert cfg.task.partition == "natural"
    one = load_config(None, [*over, "task.split=train", "task.test_size=10"])
    assert len(Simulation(one, tmp_path / "one", progress=False).task.data.test) == 10


def test_datasets_folder_errors(tiny_bert_dir, dataset_dir, tmp_path):
    from fedlora.resolve import resolve_config
    from fedlora.tasks import build_task

    base = tiny_overrides(tiny_bert_dir, dataset_dir)
    with pytest.raises(ValueError, match=r"task.text_column: .* no column 'text' \(columns: "
                                         r"\['sentence', 'topic', 'user'\]\)"):
        build_task(resolve_config(load_config(None, base)))
    with pytest.raises(ValueError, match=r"no split 'dev' \(has: \['train', 'test'\]\)"):
        build_task(resolve_config(load_config(None, [*base, "task.split=dev"])))
    hub = tiny_overrides(tiny_bert_dir, Path("stanfordnlp/imdb"))
    with pytest.raises(MissingResource, match=r"save_to_disk\('DIR'\).*task.path=DIR"):
        build_task(resolve_config(load_config(None, hub)))
    with pytest.raises(ConfigError, match="task.label_column"):
        load_config(None, ["task.label_column= "])


def test_python_m_fedlora_is_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "fedlora", "export", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a run directory" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fedlora", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "predict" in out.stdout and "eval" in out.stdout


def test_cifar10_reads_a_datasets_folder_with_images(tmp_path):
    """An image task reads a save_to_disk folder too: Image structs, ClassLabel names."""
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    from fedlora.tasks import cifar10

    rng = np.random.default_rng(0)
    names = ["cat", "dog", "ship"]

    def part(n: int):
        imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                for _ in range(n)]
        feats = datasets.Features({"img": datasets.Image(),
                                   "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"img": imgs, "label": [i % 3 for i in range(n)]},
                                          features=feats)

    d = tmp_path / "cifar-hf"
    datasets.DatasetDict({"train": part(12), "test": part(6)}).save_to_disk(str(d))
    ex = cifar10.load_examples(str(d), size=32)
    assert ex.label_names == names and ex.images.shape == (18, 3, 32, 32)
    assert int(ex.is_test.sum()) == 6 and list(ex.labels[:4]) == [0, 1, 2, 0]
    only = cifar10.load_examples(str(d), size=32, split="test")
    assert len(only.labels) == 6 and only.is_test is None


def test_next_token_and_text_to_text_runs_predict_and_eval(tmp_path, request):
    """LM tasks: perplexity per text (+ generated text); text-to-text: the likeliest label."""
    import math

    from test_tasks_text import _comments, _jsonl

    gpt2 = request.getfixturevalue("tiny_gpt2")
    data = _jsonl(tmp_path / "c.jsonl", _comments(True))
    small = ["rounds=1", "clients_per_round=2", "client.max_steps=1", "client.batch_size=4",
             "model.rank=2", f"model.name={gpt2}", f"task.path={data}", "device=cpu"]
    import fedlora
    from fedlora.predict import evaluate, predict

    lm = fedlora.run(None, tmp_path / "lm", overrides=dict(
        x.split("=", 1) for x in [*small, "task.name=reddit"]))
    new = _jsonl(tmp_path / "new.jsonl", [{"text": "cute cat comment"}, {"text": "report"}])
    rows = predict(lm.dir, str(new), generate=3)
    assert all(r["perplexity"] > 1 and r["tokens"] >= 1 for r in rows)
    assert all(isinstance(r["generated"], str) for r in rows)
    got = evaluate(lm.dir, str(data))
    assert got["perplexity"] > 1 and math.isclose(got["perplexity"], math.exp(got["loss"]))
    tt = fedlora.run(None, tmp_path / "tt", overrides=dict(
        x.split("=", 1) for x in [*small, "task.name=subreddits",
                                  "task.formulation=text_to_text"]))
    rows = predict(tt.dir, str(new))
    assert all(r["label"] in ("aww", "news", "science") for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    held = _jsonl(tmp_path / "held.jsonl", [{"text": r["text"], "label": r["subreddit"]}
                                            for r in _comments(True) if r["split"] == "test"])
    assert evaluate(tt.dir, str(held))["accuracy"] == tt.summary["final"]["accuracy"]
