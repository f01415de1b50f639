"""Text classification as text-to-text (paper, Model Details and B.3): the causal LM learns to
write the label's name after the text; no head is trained, only LoRA.

Training sequence: `<start> text SEP " label" <eos>`, loss on the label tokens only.
Evaluation scores every label's text (sum of its token log-probabilities, EOS included)
and predicts the argmax. The text is run once with a KV cache that is then repeated for
the C labels, so scoring costs one pass plus C short continuations, not C full passes.
"""

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
from fedlora.tasks._text_common import (
    default_targets,
    load_tokenizer,
    pack,
    partition,
    start_token,
    train_test,
)
from fedlora.tasks.base import Examples, label_map
from fedlora.tasks.lm import shifted_ce
from fedlora.tasks.text import TextClassification

SEP = "\nLabel:"


class TextToTextClassification:
    """Classification through the frozen LM head; accuracy by scoring each label's text."""

    utility = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: Config, examples: Examples, backbone: str, device: torch.device):
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        self.name = cfg.task.name
        labels, names = label_map(examples.labels)
        tok = self.tokenizer = load_tokenizer(backbone)
        if tok.eos_token_id is None:
            raise ValueError(f"model.name: text_to_text needs an EOS token; {backbone} has none")
        label_rows = [tok(" " + n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                      for n in names]
        self.label_ids, ll = pack(label_rows, tok.pad_token_id)
        self.label_ids = torch.from_numpy(self.label_ids).long()
        self.label_lengths = torch.from_numpy(ll)
        self.max_length = cfg.task.max_length
        ids, lengths = self.encode_prompts(examples.inputs)

        train_idx, test_idx = train_test(cfg, len(labels), labels, examples.is_test)
        clients = None if examples.clients is None else [examples.clients[i] for i in train_idx]
        parts, client_names = partition(cfg, len(train_idx), labels[train_idx], clients)

        def split(idx: np.ndarray) -> Split:
            return Split({"input_ids": torch.from_numpy(ids[idx]),
                          "lengths": torch.from_numpy(lengths[idx])},
                         torch.from_numpy(labels[idx]))

        self.data = FederatedData(
            train=split(train_idx), test=split(test_idx), clients=parts,
            client_names=client_names, label_names=names,
            empty_clients=empty_clients(parts))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(cfg.seed, "init"))
            model = AutoModelForCausalLM.from_pretrained(backbone)
            model.config.pad_token_id = tok.pad_token_id
            targets = default_targets(model.config.model_type)
            self.model = add_lora(model, cfg, targets, None).to(device)

    def encode_prompts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`<start> text SEP` token ids per text (right-padded) and their lengths; the text is
        truncated so that the longest label still fits in `task.max_length`."""
        tok = self.tokenizer
        sep = tok(SEP, add_special_tokens=False)["input_ids"]
        first = start_token(tok)
        head = [first] if first is not None else []
        longest = int(self.label_lengths.max())
        room = self.max_length - len(head) - len(sep) - longest
        if room < 1:
            raise ValueError(f"task.max_length: {self.max_length} leaves no room for the text "
                             f"after the prompt and the longest label ({longest} tokens)")
        enc = tok(list(texts), add_special_tokens=False, truncation=True,
                  max_length=room)["input_ids"]
        return pack([head + list(r) + sep for r in enc], tok.pad_token_id)

    def batch(self, split: Split, idx: np.ndarray, device: torch.device,
              train: bool) -> dict[str, torch.Tensor]:
        """Prompt followed by its label's tokens; `labels` is -100 except on the label."""
        idx_t = torch.as_tensor(idx)
        plen = split.inputs["lengths"][idx_t][:, None]
        y = split.labels[idx_t]
        llen = self.label_lengths[y][:, None]
        width = int((plen + llen).max())
        prompt = split.inputs["input_ids"][idx_t, :width].long()
        prompt = F.pad(prompt, (0, width - prompt.shape[1]), value=self.tokenizer.pad_token_id)
        pos = torch.arange(width)[None, :]
        in_prompt, in_label = pos < plen, (pos >= plen) & (pos < plen + llen)
        j = (pos - plen).clamp(0, self.label_ids.shape[1] - 1)
        label_tok = torch.gather(self.label_ids[y], 1, j)
        ids = torch.where(in_prompt, prompt, torch.where(in_label, label_tok, prompt))
        mask = (in_prompt | in_label).long()
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "labels": ids.masked_fill(~in_label, -100).to(device)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the label tokens (the text itself is not a target)."""
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        return shifted_ce(logits, batch["labels"], "mean")

    @torch.no_grad()
    def label_scores(self, model: torch.nn.Module, split: Split, idx: np.ndarray,
                     device: torch.device) -> torch.Tensor:
        """log p(label text | prompt) for every example in idx and every label: (len(idx), C)."""
        idx_t = torch.as_tensor(idx)
        n, C = len(idx), self.label_ids.shape[0]
        plen = split.inputs["lengths"][idx_t]
        width = int(plen.max())
        ids = split.inputs["input_ids"][idx_t, :width].long().to(device)
        mask = (torch.arange(width)[None, :] < plen[:, None]).long().to(device)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        last = out.logits[torch.arange(n), (plen - 1).to(device)].float().log_softmax(-1)
        lab = self.label_ids.to(device)
        score = last[:, lab[:, 0]]  # first label token, (n, C)
        cache = out.past_key_values
        cache.batch_repeat_interleave(C)  # row r: example r // C, label r % C
        L = lab.shape[1]
        lab_rows = lab.repeat(n, 1)
        lab_mask = (torch.arange(L, device=device)[None, :]
                    < self.label_lengths.to(device)[:, None]).repeat(n, 1)
        full_mask = torch.cat([mask.repeat_interleave(C, 0), lab_mask.long()], 1)
        pos = plen.to(device).repeat_interleave(C)[:, None] + torch.arange(L, device=device)
        out2 = model(input_ids=lab_rows, attention_mask=full_mask, position_ids=pos,
                     past_key_values=cache, use_cache=True)
        logp = out2.logits[:, :-1].float().log_softmax(-1)
        tok = torch.gather(logp, 2, lab_rows[:, 1:, None])[..., 0] * lab_mask[:, 1:]
        return score + tok.sum(1).view(n, C)

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, split: Split, batch_size: int,
                 device: torch.device) -> dict[str, float]:
        model.eval()
        C = self.label_ids.shape[0]
        step = max(1, batch_size // C)  # the label pass has step * C rows
        order = np.argsort(split.inputs["lengths"].numpy(), kind="stable")
        correct, nll = 0, 0.0
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            scores = self.label_scores(model, split, idx, device)
            y = split.labels[torch.as_tensor(idx)].to(device)
            correct += int((scores.argmax(1) == y).sum())
            nll -= float(scores.gather(1, y[:, None]).sum())
        n = len(split)
        return {"accuracy": correct / n, "loss": nll / n}


def build_classifier(cfg: Config, examples: Examples, backbone: str, device: torch.device):
    """`task.formulation`: a classification head (default) or the paper's text-to-text."""
    if cfg.task.formulation == "text_to_text":
        return TextToTextClassification(cfg, examples, backbone, device)
    return TextClassification(cfg, examples, backbone, device)
