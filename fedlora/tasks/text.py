"""Sequence classification on text with any transformers backbone plus peft LoRA."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.config import Config
from fedlora.data.federated import FederatedData, Split
from fedlora.data.partition import empty_clients
from fedlora.model.backbone import quiet_transformers
from fedlora.model.lora import add_lora
from fedlora.rng import torch_seed
from fedlora.tasks.base import Examples, label_map, partition_clients, train_test

# LoRA targets per architecture: the paper's Q,V for BERT-style, c_attn (K,V,Q) for GPT-2.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "roberta": ["query", "value"],
}
HEADS = ("classifier", "score")


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad once to the longest example; batches are trimmed to their own longest."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(enc), int(lengths.max(initial=1))), pad, dtype=np.int32)
    for i, row in enumerate(enc):
        ids[i, : len(row)] = row
    return {"input_ids": torch.from_numpy(ids), "lengths": torch.from_numpy(lengths)}


def trimmed(split: Split, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of `idx` cut to the batch's longest example, and the attention mask."""
    idx_t = torch.as_tensor(idx)
    lengths = split.inputs["lengths"][idx_t]
    width = int(lengths.max())
    ids = split.inputs["input_ids"][idx_t, :width].long()
    return ids, torch.arange(width)[None, :] < lengths[:, None]


class TextClassification:
    """A text classification task: data, model and metrics for one config."""

    utility = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: Config, examples: Examples, backbone: str, device: torch.device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        self.name = cfg.task.name
        labels, names = label_map(examples.labels)
        train_idx, test_idx = train_test(cfg, len(labels), labels, examples.is_test)
        clients = None if examples.clients is None else [examples.clients[i] for i in train_idx]
        parts, client_names = partition_clients(cfg, labels[train_idx], clients, cfg.seed)

        self.tokenizer = AutoTokenizer.from_pretrained(backbone)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        texts = examples.inputs

        def split(idx: np.ndarray) -> Split:
            enc = tokenize(self.tokenizer, [texts[i] for i in idx], cfg.task.max_length)
            return Split(enc, torch.from_numpy(labels[idx]))

        self.data = FederatedData(
            train=split(train_idx), test=split(test_idx), clients=parts,
            client_names=client_names, label_names=names,
            empty_clients=empty_clients(parts),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(cfg.seed, "init"))
            model, info = AutoModelForSequenceClassification.from_pretrained(
                backbone, num_labels=len(names), output_loading_info=True,
                id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            )
            model.config.pad_token_id = self.tokenizer.pad_token_id
            targets = DEFAULT_TARGETS.get(model.config.model_type, ["query", "value"])
            head = next((h for h in HEADS if hasattr(model, h)), None)
            fresh = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
            self.model = add_lora(model, cfg, targets, head, new=fresh).to(device)
            # Randomly initialized, frozen and outside P (e.g. a sentence-transformers
            # checkpoint's BERT pooler): an export must carry them (fedlora.export).
            self.new_modules = tuple(m for m in fresh if m != head)

    def batch(self, split: Split, idx: np.ndarray, device: torch.device,
              train: bool) -> dict[str, torch.Tensor]:
        ids, mask = trimmed(split, idx)
        return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device),
                "labels": split.labels[torch.as_tensor(idx)].to(device)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def losses(self, model: torch.nn.Module,
               batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each batch's mean loss from one forward over all of them, rows in batch order
        (lockstep training: each batch is another client's, fedlora/client/lockstep.py).
        Batches are right-padded to the widest; padding is masked out of attention."""
        width = max(int(b["input_ids"].shape[1]) for b in batches)
        pad = self.tokenizer.pad_token_id

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(t, (0, width - t.shape[1]), value=value)

        logits = model(input_ids=torch.cat([widen(b["input_ids"], pad) for b in batches]),
                       attention_mask=torch.cat([widen(b["attention_mask"], 0)
                                                 for b in batches])).logits
        out, start = [], 0
        for b in batches:  # the same reduction as the model's own loss (CrossEntropyLoss)
            rows = len(b["labels"])
            out.append(F.cross_entropy(logits[start:start + rows].view(-1, logits.shape[-1]),
                                       b["labels"].view(-1)))
            start += rows
        return out

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, split: Split, batch_size: int,
                 device: torch.device) -> dict[str, float]:
        model.eval()
        order = np.argsort(split.inputs["lengths"].numpy(), kind="stable")  # less padding
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            b = self.batch(split, order[start:start + batch_size], device, train=False)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum += float(F.cross_entropy(logits.float(), b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        n = len(split)
        return {"accuracy": correct / n, "loss": loss_sum / n}
