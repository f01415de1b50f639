"""A run's model is a peft adapter (or a full HF model): loaded by peft/transformers alone, in a
process that never imports fedlora, it scores what fedlora's own evaluation scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fedlora.config import load_config
from fedlora.engine import Simulation

# Runs in a fresh interpreter: transformers + peft only. Reads the export's files and the
# held-out texts, prints accuracy and mean loss exactly as fedlora defines them.
PEFT_ONLY = r'''
import json, sys
import torch, torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
torch.set_num_threads(1)

def score(folder, data):
    manifest = json.load(open(f"{folder}/fedlora_export.json"))
    if manifest["export"] == "peft_adapter":
        from peft import PeftConfig, PeftModel
        base_id = PeftConfig.from_pretrained(folder).base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(
            base_id, config=AutoConfig.from_pretrained(folder))
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in open(data)]
    label2id = model.config.label2id
    correct, loss = 0, 0.0
    with torch.inference_mode():
        for r in rows:
            enc = tok([r["text"]], truncation=True, max_length=manifest["max_length"],
                      return_tensors="pt")
            logits = model(**enc).logits.float()
            y = torch.tensor([label2id[str(r["label"])]])
            correct += int(logits.argmax(-1).item() == y.item())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return {"accuracy": correct / len(rows), "loss": loss / len(rows)}

args = sys.argv[1:]
out = [score(args[i], args[i + 1]) for i in range(0, len(args), 2)]
print(json.dumps({"scores": out,
                  "fedlora_imported": any(m.split(".")[0] == "fedlora" for m in sys.modules)}))
'''


@pytest.fixture(scope="module")
def bert_no_pooler(tmp_path_factory) -> Path:
    """A tiny BERT saved without its pooler, like all-MiniLM-L6-v2: the classifier's pooler
    is randomly initialized from the run's seed and must travel with the adapter."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedlora.model.backbone import minilm_dir

    out = tmp_path_factory.mktemp("bert-no-pooler")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _test_rows(cfg, path: Path) -> Path:
    """The run's held-out examples (same seed, same split rule) as JSONL text/label."""
    from fedlora.tasks import apply_defaults
    from fedlora.tasks.base import label_map, train_test
    from fedlora.tasks.text_file import load_task_examples

    apply_defaults(cfg)
    ex = load_task_examples(cfg)
    labels, _ = label_map(ex.labels)
    _, test_idx = train_test(cfg, len(labels), labels, ex.is_test)
    path.write_text("".join(json.dumps({"text": ex.inputs[i], "label": str(ex.labels[i])}) + "\n"
                            for i in test_idx))
    return path


def _peft_only(*pairs: tuple[Path, Path]) -> list[dict]:
    """Scores of export folders on JSONL data, from one fresh interpreter without fedlora."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    args = [str(x) for pair in pairs for x in pair]
    out = subprocess.run([sys.executable, "-c", PEFT_ONLY, *args], env=env,
                         capture_output=True, text=True, timeout=300, cwd=pairs[0][0])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fedlora_imported"] is False
    return got["scores"]


def _run(model_dir: Path, data: Path, out: Path, **extra):
    cfg = load_config(None, tiny_overrides(model_dir, data, **extra))
    sim = Simulation(cfg, out, progress=False)
    return sim, sim.run()


def test_flasc_adapter_loads_in_peft_alone_and_scores_the_same(bert_no_pooler, text_file,
                                                                tmp_path):
    sim, summary = _run(bert_no_pooler, text_file, tmp_path / "run", rounds=3,
                        **{"client.max_steps": 4, "server.lr": 0.05})
    assert sim.task.new_modules == ("bert.pooler.dense",)
    folder = tmp_path / "run" / "export"
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"] == str(bert_no_pooler)
    assert set(conf["modules_to_save"]) == {"classifier", "bert.pooler.dense"}
    assert (folder / "adapter_model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["animal", "food", "tool"]
    rows = _test_rows(sim.cfg, tmp_path / "test.jsonl")
    [got] = _peft_only((folder, rows))
    assert abs(got["accuracy"] - summary["final"]["accuracy"]) <= 1e-6
    assert abs(got["loss"] - summary["final"]["loss"]) <= 1e-5


def test_best_round_export_is_that_rounds_model(tiny_bert_dir, text_file, tmp_path):
    from fedlora.export import export
    from fedlora.rundir import read_jsonl

    sim, _ = _run(tiny_bert_dir, text_file, tmp_path / "run", rounds=4,
                  **{"server.lr": 0.05, "client.max_steps": 3})
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "accuracy" in r]
    best = max(evals, key=lambda r: r["accuracy"])  # first of the best: strict improvement
    info = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert info == {"round": best["round"], "accuracy": best["accuracy"]}
    folder = export(tmp_path / "run", tmp_path / "best-export", which="best")
    manifest = json.loads((folder / "fedlora_export.json").read_text())
    assert manifest["source"]["round"] == best["round"]
    [got] = _peft_only((folder, _test_rows(sim.cfg, tmp_path / "test.jsonl")))
    assert abs(got["accuracy"] - best["accuracy"]) <= 1e-6
    assert abs(got["loss"] - best["loss"]) <= 1e-5


def test_export_command_rebuilds_from_disk_identically(tiny_bert_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    from fedlora.cli import main

    _run(tiny_bert_dir, text_file, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
    a = load_file(str(tmp_path / "run" / "export" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# flora_two_stage with stage1_rounds=1 ends in Stage 2, where W is back at W0: an adapter.
W_CASES = {"full_finetune": ({}, "full_model"),
           "flora_stacking": ({"model.rank": 4, "het.tiers": 2, "het.r_base": 4}, "full_model"),
           "flora_two_stage": ({"method.stage1_rounds": 1}, "peft_adapter")}


def test_backbone_and_w_methods_export_what_peft_or_transformers_load(tiny_bert_dir, text_file,
                                                                      tmp_path):
    pairs, finals = [], []
    for method, (extra, kind) in W_CASES.items():
        sim, summary = _run(tiny_bert_dir, text_file, tmp_path / method, rounds=2,
                            **{"method.name": method, **extra})
        folder = tmp_path / method / "export"
        manifest = json.loads((folder / "fedlora_export.json").read_text())
        assert manifest["export"] == kind, (method, manifest["note"])
        pairs.append((folder, _test_rows(sim.cfg, tmp_path / f"{method}.jsonl")))
        finals.append(summary["final"])
    for method, got, final in zip(W_CASES, _peft_only(*pairs), finals):
        assert abs(got["accuracy"] - final["accuracy"]) <= 1e-6, method
        assert abs(got["loss"] - final["loss"]) <= 1e-4, method


def test_export_errors_say_what_to_do(tiny_bert_dir, text_file, tmp_path):
    from fedlora.export import ExportError, export

    with pytest.raises(ExportError, match="not a run directory"):
        export(tmp_path)
    _run(tiny_bert_dir, text_file, tmp_path / "run")
    (tmp_path / "run" / "best" / "adapter.safetensors").unlink()
    with pytest.raises(ExportError, match="use --round last"):
        export(tmp_path / "run", which="best")
