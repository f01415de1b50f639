"""Next-token prediction with any `AutoModelForCausalLM` plus peft LoRA (Reddit, Shakespeare).

Texts are tokenised once, with the tokenizer's start token in front so the first real
token is predicted too, truncated to `task.max_length` and right-padded; batches are
trimmed to their own longest row. Only LoRA is trained: the LM head stays frozen
(paper, B.3). The headline metric is perplexity, lower is better.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.config import Config
from fedlora.data.federated import FederatedData, Split
from fedlora.data.partition import empty_clients
from fedlora.model.backbone import quiet_transformers
from fedlora.model.lora import add_lora
from fedlora.rng import torch_seed
from fedlora.tasks._text_common import (
    default_targets,
    load_tokenizer,
    pack,
    partition,
    start_token,
    train_test,
)
from fedlora.tasks.text import trimmed

IGNORE = -100
# Largest logits block (elements) evaluated at once: eval batches are split so that
# rows * width * vocab stays under it (GPT-2: 128 x 256 x 50257 floats would be 6.6 GB).
EVAL_LOGITS_BUDGET = 1 << 28


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text: start token + text, at most `max_length` tokens in all."""
    first = start_token(tokenizer)
    room = max_length - (first is not None)
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True,
                    max_length=room)["input_ids"]
    return [([first] if first is not None else []) + list(row) for row in enc]


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of position t's logits against token t+1, ignoring -100. The labels are
    shifted, not the logits, so the (B, L, vocab) block is never copied."""
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


class CausalLM:
    """Next-token prediction: data, model and metrics. `build_causal_lm` makes one from texts;
    the constructor takes already-encoded data (benchmarks build it from random ids)."""

    utility = "perplexity"
    higher_is_better = False

    def __init__(self, name: str, data: FederatedData, model: torch.nn.Module, tokenizer=None):
        self.name, self.data, self.model, self.tokenizer = name, data, model, tokenizer
        self.vocab_size = int(model.config.vocab_size)

    def batch(self, split: Split, idx: np.ndarray, device: torch.device,
              train: bool) -> dict[str, torch.Tensor]:
        ids, mask = trimmed(split, idx)
        return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device),
                "labels": ids.masked_fill(~mask, IGNORE).to(device)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean token cross-entropy over the non-pad tokens of the batch."""
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        return shifted_ce(logits, batch["labels"], "mean")

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, split: Split, batch_size: int,
                 device: torch.device) -> dict[str, float]:
        """Perplexity = exp(total token CE / total predicted tokens) over the whole split."""
        model.eval()
        lengths = split.inputs["lengths"].numpy()
        order = np.argsort(lengths, kind="stable")  # less padding
        ce_sum, correct, tokens = 0.0, 0, 0
        start = 0
        while start < len(order):
            width = int(lengths[order[min(start + batch_size, len(order)) - 1]])
            rows = max(1, min(batch_size, EVAL_LOGITS_BUDGET // (width * self.vocab_size)))
            b = self.batch(split, order[start:start + rows], device, train=False)
            start += rows
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            target = b["labels"][:, 1:]
            ce_sum += float(shifted_ce(logits, b["labels"], "sum"))
            hit = (logits[:, :-1].argmax(-1) == target) & (target != IGNORE)
            correct += int(hit.sum())
            tokens += int((target != IGNORE).sum())
        loss = ce_sum / max(tokens, 1)
        return {"perplexity": math.exp(min(loss, 700.0)), "next_token_accuracy":
                correct / max(tokens, 1), "loss": loss, "tokens": tokens}


def build_causal_lm(cfg: Config, texts: list[str], clients: list | None,
                    is_test: np.ndarray | None, backbone: str,
                    device: torch.device) -> CausalLM:
    """Tokenise, split, partition and load `backbone` with LoRA (no head is trained)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    tokenizer = load_tokenizer(backbone)
    rows = encode(tokenizer, texts, cfg.task.max_length)
    # A sequence needs two tokens for one prediction; empty texts carry nothing to learn.
    keep = np.flatnonzero([len(r) >= 2 for r in rows])
    if len(keep) == 0:
        raise ValueError(f"task '{cfg.task.name}': no text has a token to predict")
    rows = [rows[i] for i in keep]
    clients = None if clients is None else [clients[i] for i in keep]
    is_test = None if is_test is None else np.asarray(is_test)[keep]
    ids, lengths = pack(rows, tokenizer.pad_token_id)
    train_idx, test_idx = train_test(cfg, len(rows), None, is_test)
    parts, names = partition(cfg, len(train_idx), None,
                             None if clients is None else [clients[i] for i in train_idx])

    def split(idx: np.ndarray) -> Split:
        return Split({"input_ids": torch.from_numpy(ids[idx]),
                      "lengths": torch.from_numpy(lengths[idx])},
                     torch.zeros(len(idx), dtype=torch.int64))  # no labels: the text is one

    data = FederatedData(train=split(train_idx), test=split(test_idx), clients=parts,
                         client_names=names, label_names=[],
                         empty_clients=empty_clients(parts))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(cfg.seed, "init"))
        model = AutoModelForCausalLM.from_pretrained(backbone)
        model.config.pad_token_id = tokenizer.pad_token_id
        model = add_lora(model, cfg, default_targets(model.config.model_type), None).to(device)
    return CausalLM(cfg.task.name, data, model, tokenizer)
