"""Shared plumbing for the paper's text tasks: splits, partitions, tokenizers, backbones."""

from __future__ import annotations

import numpy as np

from fedlora.config import Config
from fedlora.model.backbone import resolve
from fedlora.tasks.base import (  # noqa: F401 (re-export)
    default_partition,
    partition_clients,
    train_test,
)

# The paper's text backbone (GPT-2 small, 124M). A hub id: `resolve` finds it in the local
# Hugging Face cache or says which folder to pass as model.name.
GPT2 = "gpt2"
# LoRA targets per architecture: K,V,Q (`c_attn`) for GPT-2 (paper B.3), Q,V elsewhere.
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
           "qwen2": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
           "bert": ["query", "value"], "roberta": ["query", "value"],
           "distilbert": ["q_lin", "v_lin"]}
SPLIT_VALUES = {"train": False, "test": True}


def gpt2_backbone(cfg: Config) -> str:
    """`model.name`, or GPT-2 small when unset; errors clearly when it is not on disk."""
    return resolve(cfg.model.name or GPT2, None)


def default_targets(model_type: str) -> list[str]:
    return TARGETS.get(model_type, ["q_proj", "v_proj"])


def partition(cfg: Config, n_train: int, train_labels: np.ndarray | None,
              train_clients: list | None) -> tuple[list[np.ndarray], list[str]]:
    """`task.partition` over the training examples; next-token tasks have no labels to skew."""
    default_partition(cfg, train_clients is not None, train_labels is not None)
    if train_labels is None:
        if cfg.task.partition == "dirichlet":
            raise ValueError(f"task.partition: task '{cfg.task.name}' is next-token prediction "
                             "and has no labels for a Dirichlet split; use natural (its own "
                             "users/roles), iid_mix or iid")
        train_labels = np.zeros(n_train, dtype=np.int64)
    return partition_clients(cfg, train_labels, train_clients, cfg.seed)


def split_column(values, where: str) -> np.ndarray:
    """An optional `split` column ("train"/"test") as a boolean is_test array."""
    out = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        key = str(v).strip().lower()
        if key not in SPLIT_VALUES:
            raise ValueError(f"task.path: {where} row {i} has split={v!r}; expected "
                             f"'train' or 'test'")
        out[i] = SPLIT_VALUES[key]
    return out


def load_tokenizer(backbone: str):
    """The backbone's tokenizer with a pad token (GPT-2 has none: its EOS is used; padding
    is masked by length everywhere, so the pad id never reaches a loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"model.name: the tokenizer of {backbone} has neither a pad nor an "
                             "EOS token")
        tok.pad_token = tok.eos_token
    return tok


def start_token(tok) -> int | None:
    """The token that starts every sequence, so the first real token is predicted too."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def pack(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 matrix (width = longest row) and the row lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), int(lengths.max(initial=1))), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths
